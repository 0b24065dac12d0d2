/**
 * The QEMU process of a running libvirt domain, from the PID file libvirt writes when it starts QEMU
 * (src/qemu/qemu_process.c, `<stateDir>/<name>.pid`): stateDir is /run/libvirt/qemu for the system daemon and
 * $XDG_RUNTIME_DIR/libvirt/qemu/run for a session daemon (src/qemu/qemu_conf.c, virQEMUDriverConfigNew). The PID
 * is trusted only if that process's command line names the domain (`-name guest=NAME,...`), so a stale file and
 * a reused PID are never taken for the domain's QEMU.
 */
import { readFileSync, statSync } from "node:fs";
import { dirname, join } from "node:path";

/** The system daemon's QEMU state directory (qemu_conf.c: RUNSTATEDIR "/libvirt/qemu"). */
export const SYSTEM_STATE_DIR = "/run/libvirt/qemu";

/**
 * Where to look for `<name>.pid`, most specific first: a session URI that names its socket
 * (`?socket=<runtime>/libvirt/libvirt-sock`), the caller's $XDG_RUNTIME_DIR, then the system daemon's.
 */
export function pidFileCandidates(domain: string, uri: string | undefined, env = process.env): string[] {
  const dirs: string[] = [];
  const socket = uri ? /[?&]socket=([^&]+)/.exec(uri)?.[1] : undefined;
  const session = uri?.includes("/session");
  if (socket && session) dirs.push(join(dirname(decodeURIComponent(socket)), "qemu", "run"));
  if (session && env.XDG_RUNTIME_DIR) dirs.push(join(env.XDG_RUNTIME_DIR, "libvirt", "qemu", "run"));
  if (!session) dirs.push(SYSTEM_STATE_DIR);
  return dirs.map((dir) => join(dir, `${domain}.pid`));
}

/** QEMU's `-name guest=NAME,...` (how libvirt names the process, qemu_command.c qemuBuildNameCommandLine). */
export function cmdlineNamesDomain(cmdline: readonly string[], domain: string): boolean {
  for (let i = 0; i + 1 < cmdline.length; i++) {
    if (cmdline[i] !== "-name") continue;
    const value = cmdline[i + 1] ?? "";
    const guest = /(?:^|,)guest=((?:[^,]|,,)*)/.exec(value)?.[1] ?? value.split(",")[0];
    if (guest?.replaceAll(",,", ",") === domain) return true;
  }
  return false;
}

export interface DomainProcess {
  pid: number;
  pidFile: string;
  uid: number;
  gid: number;
}

export function findDomainProcess(domain: string, candidates: readonly string[]): DomainProcess {
  const tried: string[] = [];
  for (const pidFile of candidates) {
    let pid: number;
    try {
      pid = Number.parseInt(readFileSync(pidFile, "utf8"), 10);
    } catch {
      tried.push(`${pidFile} (absent)`);
      continue;
    }
    let cmdline: string[];
    try {
      cmdline = readFileSync(`/proc/${pid}/cmdline`, "utf8").split("\0");
    } catch {
      tried.push(`${pidFile} (PID ${pid} not running)`);
      continue;
    }
    if (!cmdlineNamesDomain(cmdline, domain)) {
      tried.push(`${pidFile} (PID ${pid} is not domain ${domain}'s QEMU)`);
      continue;
    }
    const stats = statSync(`/proc/${pid}`);
    return { pid, pidFile, uid: stats.uid, gid: stats.gid };
  }
  throw new Error(
    `cannot find domain ${domain}'s QEMU: tried ${tried.join(", ")}. Is the domain running on this host? Give its PID file with --pid-file`,
  );
}
