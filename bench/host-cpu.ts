/**
 * Where the host's CPU went over a migration, for bench:link's trace: the whole host's busy share (/proc/stat)
 * and the CPU time of the processes a row runs (/proc/PID/stat), so a row that misses the link's floor shows
 * whether the CPU, not the link, held it. Times are in the kernel's clock ticks (proc(5): divide by
 * sysconf(_SC_CLK_TCK), read with `getconf CLK_TCK`).
 */
import { execFileSync } from "node:child_process";
import { readFileSync } from "node:fs";
import { availableParallelism } from "node:os";

let ticksPerSecond: number | undefined;

function msPerTick(): number {
  ticksPerSecond ??= Number.parseInt(execFileSync("getconf", ["CLK_TCK"], { encoding: "utf8" }), 10);
  return 1000 / ticksPerSecond;
}

/** The host's CPU time so far (ms, summed over its CPUs): busy, and all. */
export interface HostCpu {
  busyMs: number;
  totalMs: number;
}

/**
 * /proc/stat's first line: user nice system idle iowait irq softirq steal (guest time is inside user). Busy is
 * all but idle and iowait.
 */
export function hostCpu(): HostCpu {
  const line = readFileSync("/proc/stat", "utf8").split("\n")[0] ?? "";
  const [user, nice, system, idle, iowait, irq, softirq, steal] = line
    .trim()
    .split(/\s+/)
    .slice(1, 9)
    .map((x) => Number.parseInt(x, 10) || 0);
  const busy = (user ?? 0) + (nice ?? 0) + (system ?? 0) + (irq ?? 0) + (softirq ?? 0) + (steal ?? 0);
  return { busyMs: busy * msPerTick(), totalMs: (busy + (idle ?? 0) + (iowait ?? 0)) * msPerTick() };
}

/** A process's CPU time so far (ms, user + system: /proc/PID/stat fields 14 and 15); 0 once it is gone. */
export function processCpuMs(pid: number): number {
  let stat: string;
  try {
    stat = readFileSync(`/proc/${pid}/stat`, "utf8");
  } catch {
    return 0;
  }
  // Field 2 (comm) is in parentheses and may hold spaces: count from the last ')'; field 3 is first after it.
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return ((Number(fields[11]) || 0) + (Number(fields[12]) || 0)) * msPerTick();
}

/** "busy 1.93 of 2 cores (97%): src QEMU 1210 ms, ..., the rest 300 ms", over `wallMs`. */
export function describeCpu(
  before: HostCpu,
  after: HostCpu,
  wallMs: number,
  processes: Array<{ name: string; ms: number }>,
): string {
  const busyMs = after.busyMs - before.busyMs;
  const cores = availableParallelism();
  const named = processes.reduce((sum, p) => sum + p.ms, 0);
  const parts = processes.map((p) => `${p.name} ${Math.round(p.ms)} ms`);
  parts.push(`the rest ${Math.round(busyMs - named)} ms`);
  return (
    `host CPU over ${Math.round(wallMs)} ms: ${Math.round(busyMs)} ms busy, ${(busyMs / wallMs).toFixed(2)} of ` +
    `${cores} cores (${((100 * busyMs) / (after.totalMs - before.totalMs)).toFixed(0)}%): ${parts.join(", ")}`
  );
}
