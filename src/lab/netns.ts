/**
 * Named network namespaces for the lab (`ip netns`), owned by this process and never outliving it.
 *
 * - Names are `vmprune-<pid>-<role>-<random>`: the PID of the owner, so `sweepStaleNamespaces()` can tell which
 *   ones a dead run left behind (the same rule as `sweepStaleRuns()` for VMs), and a random part so two lab
 *   objects in one process never collide. Nothing outside namespaces made here is ever configured.
 * - Deleting a namespace destroys its interfaces (a veth pair goes when either end goes) and their qdiscs, once
 *   no process runs in it any more: the lab stops its QEMUs first.
 * - Normal teardown is `delete()`, in a `finally`. For every other ending (an uncaught error, SIGINT, SIGKILL) a
 *   guard process holds the read end of a pipe from this process and deletes the namespace when the pipe
 *   closes, which the kernel does whenever this process ends, however it ends. The guard runs in its own session
 *   (a terminal's ^C does not reach it), is not in the cleanup registry (src/lab/cleanup.ts would SIGKILL it
 *   before it could do its job), and exits on its own once `delete()` closed its pipe.
 */
import { type ChildProcess, spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import { Socket } from "node:net";
import { setTimeout as sleep } from "node:timers/promises";
import { processAlive } from "./cleanup.ts";
import { run } from "./exec.ts";

/** Every namespace the lab creates starts with this, then the owner's PID and a dash. */
export const NETNS_PREFIX = "vmprune-";

export function isLabNamespace(name: string): boolean {
  return /^vmprune-\d+-[\w-]+$/.test(name);
}

/** Names of all named network namespaces (`ip netns list`), ours or not. */
export async function listNamespaces(): Promise<string[]> {
  const out = await run("ip", ["netns", "list"]);
  return out
    .split("\n")
    .map((line) => line.trim().split(/\s+/)[0] ?? "")
    .filter((name) => name.length > 0);
}

/**
 * Deletes lab namespaces whose owner process is gone (should the guard itself have been killed). Never touches a
 * name without the lab prefix, nor a namespace whose owner still runs.
 */
export async function sweepStaleNamespaces(): Promise<string[]> {
  const removed: string[] = [];
  for (const name of await listNamespaces()) {
    if (!isLabNamespace(name)) continue;
    const owner = Number.parseInt(name.slice(NETNS_PREFIX.length), 10);
    if (!Number.isFinite(owner) || owner === process.pid || processAlive(owner)) continue;
    await run("ip", ["netns", "delete", name]).catch(() => undefined);
    removed.push(name);
  }
  return removed;
}

/** Deletes the named namespaces when its standard input reaches EOF (see the module comment). */
function startGuard(names: readonly string[]): ChildProcess {
  // The names are ours (checked by isLabNamespace), so they need no quoting.
  const deletes = names.map((name) => `ip netns delete ${name} 2>/dev/null`).join("; ");
  const child = spawn("sh", ["-c", `trap '' INT HUP TERM; while read -r _; do :; done; ${deletes}; exit 0`], {
    stdio: ["pipe", "ignore", "ignore"],
    detached: true,
  });
  child.unref();
  // The pipe must not keep this process alive; it stays open (and the guard waiting) until we end or close it.
  if (child.stdin instanceof Socket) child.stdin.unref();
  return child;
}

export class NetNamespace {
  private deleted = false;

  private constructor(
    readonly name: string,
    private readonly guard: ChildProcess,
  ) {}

  /** Creates `vmprune-<pid>-<role>-<hex>` with its loopback up. */
  static async create(role: string): Promise<NetNamespace> {
    const name = `${NETNS_PREFIX}${process.pid}-${role}-${randomBytes(2).toString("hex")}`;
    if (!isLabNamespace(name)) throw new Error(`bad namespace role '${role}': use letters, digits, '-'`);
    // The guard first: from the moment the namespace exists, something will delete it.
    const guard = startGuard([name]);
    const ns = new NetNamespace(name, guard);
    try {
      await run("ip", ["netns", "add", name]);
      await ns.ip(["link", "set", "lo", "up"]);
    } catch (error) {
      await ns.delete();
      throw error;
    }
    return ns;
  }

  /** `ip -n NAME ARGS...`: an ip command applied inside this namespace. */
  ip(args: readonly string[]): Promise<string> {
    return run("ip", ["-n", this.name, ...args]);
  }

  /** `tc -n NAME ARGS...`. */
  tc(args: readonly string[]): Promise<string> {
    return run("tc", ["-n", this.name, ...args]);
  }

  /** The argv prefix that runs a command inside this namespace (it execs, so the PID is the command's). */
  execPrefix(): string[] {
    return ["ip", "netns", "exec", this.name];
  }

  /**
   * Deletes the namespace (its interfaces and qdiscs with it) and ends the guard. Processes still inside keep
   * the (then nameless) namespace alive until they exit: stop them first. Safe to call twice.
   */
  async delete(): Promise<void> {
    if (this.deleted) return;
    this.deleted = true;
    const exited = new Promise<void>((resolve) => {
      if (this.guard.exitCode !== null || this.guard.signalCode !== null) resolve();
      else this.guard.once("exit", () => resolve());
    });
    let error: unknown;
    try {
      if ((await listNamespaces()).includes(this.name)) await run("ip", ["netns", "delete", this.name]);
    } catch (e) {
      error = e;
    }
    // EOF on the guard's pipe: it runs its (now no-op) delete and exits.
    this.guard.stdin?.end();
    const inTime = await Promise.race([exited.then(() => true), sleep(5_000).then(() => false)]);
    if (!inTime && this.guard.pid !== undefined) {
      try {
        process.kill(this.guard.pid, "SIGKILL");
      } catch {
        // exited meanwhile
      }
    }
    if (error) throw error;
  }
}
