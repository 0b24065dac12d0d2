/**
 * Last-resort cleanup of what this process started: QEMU processes (by PID) and their files (RAM files in
 * /dev/shm, run folders). Normal teardown is each owner's `stop()`; this runs on process exit and on SIGINT/
 * SIGTERM so that an interrupted test or demo leaves nothing behind. QEMU is also started under
 * `setpriv --pdeathsig SIGKILL`, so a SIGKILLed parent takes its QEMUs with it.
 */
import { rmSync } from "node:fs";

const pids = new Set<number>();
const paths = new Set<string>();
let installed = false;

function cleanupNow(): void {
  for (const pid of pids) {
    try {
      process.kill(pid, "SIGKILL");
    } catch {
      // already gone
    }
  }
  pids.clear();
  for (const path of paths) rmSync(path, { recursive: true, force: true });
  paths.clear();
}

function install(): void {
  if (installed) return;
  installed = true;
  process.on("exit", cleanupNow);
  for (const signal of ["SIGINT", "SIGTERM", "SIGHUP"] as const) {
    process.once(signal, () => {
      cleanupNow();
      process.kill(process.pid, signal);
    });
  }
}

export function trackProcess(pid: number): void {
  install();
  pids.add(pid);
}

export function untrackProcess(pid: number): void {
  pids.delete(pid);
}

export function trackPath(path: string): void {
  install();
  paths.add(path);
}

export function untrackPath(path: string): void {
  paths.delete(path);
}

/** PIDs and paths still tracked (for tests of the cleanup itself). */
export function tracked(): { pids: number[]; paths: string[] } {
  return { pids: [...pids], paths: [...paths] };
}

/** Whether a process with this PID exists (signal 0: nothing is sent). */
export function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}
