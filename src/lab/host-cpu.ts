/**
 * Where the host's CPU went over a migration, for bench:link's trace and the demo's table: the whole host's busy
 * share (/proc/stat) and the CPU time of the processes a row runs (/proc/PID/stat), so a row that misses the
 * link's floor (or, on loopback, the baseline) shows whether the CPU, not the link, held it. Times are in the
 * kernel's clock ticks (proc(5): divide by sysconf(_SC_CLK_TCK), read with `getconf CLK_TCK`).
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

/** A process's CPU time so far (ms, user + system, all its threads: /proc/PID/stat fields 14 and 15); 0 once gone. */
export function processCpuMs(pid: number): number {
  return statCpuMs(`/proc/${pid}/stat`);
}

/**
 * One thread's CPU time so far (ms), by default the process's main thread (its TID is its PID): in Node, the event
 * loop; the rest of a Node process is V8's compiler and collector threads and libuv's pool. 0 once gone.
 */
export function threadCpuMs(pid: number, tid = pid): number {
  return statCpuMs(`/proc/${pid}/task/${tid}/stat`);
}

function statCpuMs(path: string): number {
  let stat: string;
  try {
    stat = readFileSync(path, "utf8");
  } catch {
    return 0;
  }
  // Field 2 (comm) is in parentheses and may hold spaces: count from the last ')'; field 3 is first after it.
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return ((Number(fields[11]) || 0) + (Number(fields[12]) || 0)) * msPerTick();
}

/** This process's CPU time (ms, user + system, all its threads) since `since` (process.cpuUsage), or so far. */
export function ownCpuMs(since?: NodeJS.CpuUsage): number {
  const u = process.cpuUsage(since);
  return (u.user + u.system) / 1000;
}

/** A process (or a thread of one: `partOf` names it, and its time is not counted twice) whose CPU is sampled. */
export interface SampledProcess {
  name: string;
  cpuMs: () => number;
  partOf?: string;
}

/** CPU used over a window (CpuSampler.usage): ms of wall time, of the host's CPUs (busy, all), per process. */
export interface CpuUsage {
  wallMs: number;
  busyMs: number;
  totalMs: number;
  processes: ReadonlyMap<string, number>;
}

/** One reading: when (Date.now(), the clock of QEMU's QMP event timestamps), the host's and each process's CPU. */
interface CpuReading {
  atMs: number;
  host: HostCpu;
  processes: Map<string, number>;
}

/**
 * Reads the host's CPU and the named processes' every `intervalMs`, so that a window known only afterwards (from
 * `migrate` to the destination's RESUME) can be cut out of it: the row's setup (the destination QEMU, receive's
 * start, send's preparation) would otherwise count as migration. `processes` is asked at each reading (a PID may
 * appear later: the destination QEMU); a process that is gone reads 0, so give only those that outlive the row.
 */
export class CpuSampler {
  private readonly readings: CpuReading[] = [];
  /** Names of threads sampled beside their process: shown, not added to the processes' sum. */
  private readonly parts = new Set<string>();
  private timer: NodeJS.Timeout | undefined;

  constructor(
    private readonly processes: () => Array<SampledProcess>,
    private readonly intervalMs = 20,
  ) {}

  start(): void {
    this.read();
    this.timer = setInterval(() => this.read(), this.intervalMs);
  }

  stop(): void {
    clearInterval(this.timer);
    this.read();
  }

  /**
   * The CPU used between the readings around `fromMs` and `toMs`: the host's (busy and all, ms summed over its
   * CPUs) and each sampled process's (threads named with `partOf` included, beside their process), or undefined
   * without readings on both sides.
   */
  usage(fromMs: number, toMs: number): CpuUsage | undefined {
    const first = [...this.readings].reverse().find((r) => r.atMs <= fromMs);
    const last = this.readings.find((r) => r.atMs >= toMs);
    if (!first || !last) return undefined;
    const processes = new Map<string, number>();
    // A process first read after `fromMs` (the destination QEMU, which a row starts just before `migrate`) counts
    // from its first reading: what it did before that is its start-up (with preallocated RAM, seconds of
    // clearing pages), not the window's work.
    for (const [name, ms] of last.processes) {
      const from =
        first.processes.get(name) ?? this.readings.find((r) => r.processes.has(name))?.processes.get(name);
      processes.set(name, ms - (from ?? 0));
    }
    return {
      wallMs: last.atMs - first.atMs,
      busyMs: last.host.busyMs - first.host.busyMs,
      totalMs: last.host.totalMs - first.host.totalMs,
      processes,
    };
  }

  /** "host CPU from migrate to RESUME (2500 ms): 4700 ms busy, 1.88 of 2 cores (94%): ...", or why not. */
  describe(fromMs: number, toMs: number): string {
    const used = this.usage(fromMs, toMs);
    if (!used) return "host CPU: no readings around the migration";
    const { wallMs, busyMs, totalMs } = used;
    const parts: string[] = [];
    let named = 0;
    for (const [name, ms] of used.processes) {
      if (!this.parts.has(name)) named += ms;
      parts.push(`${name} ${Math.round(ms)} ms`);
    }
    parts.push(`the rest (the kernel's network work, other processes) ${Math.round(busyMs - named)} ms`);
    return (
      `host CPU from migrate to RESUME (${Math.round(wallMs)} ms): ${Math.round(busyMs)} ms busy, ` +
      `${(busyMs / wallMs).toFixed(2)} of ${availableParallelism()} cores (${((100 * busyMs) / totalMs).toFixed(0)}%): ${parts.join(", ")}`
    );
  }

  /**
   * The same window over time, one step per `stepMs`: "ms after fromMs:host's busy cores/each process's cores"
   * (processes in the order given), e.g. to tell stretches where the CPU held the migration from stretches
   * where the link did.
   */
  timeline(fromMs: number, toMs: number, stepMs = 100): string {
    const names = [...(this.readings.at(-1)?.processes.keys() ?? [])];
    return `(host/${names.join("/")}) ${this.steps(fromMs, toMs, stepMs)}`;
  }

  private steps(fromMs: number, toMs: number, stepMs: number): string {
    const out: string[] = [];
    let prev: CpuReading | undefined;
    for (const r of this.readings) {
      if (r.atMs < fromMs - stepMs || r.atMs > toMs + stepMs) continue;
      if (prev && r.atMs - prev.atMs < stepMs) continue;
      if (prev) {
        const wallMs = r.atMs - prev.atMs;
        const cores = (ms: number, before: number) => ((ms - before) / wallMs).toFixed(1);
        const each = [...r.processes].map(([name, ms]) => cores(ms, prev?.processes.get(name) ?? ms));
        out.push(
          `${Math.round(r.atMs - fromMs)}:${cores(r.host.busyMs, prev.host.busyMs)}/${each.join("/")}`,
        );
      }
      prev = r;
    }
    return out.join(" ");
  }

  private read(): void {
    const processes = new Map<string, number>();
    const previous = this.readings.at(-1)?.processes;
    for (const p of this.processes()) {
      // A process that exited within the window reads 0 from then on: keep what it had used.
      processes.set(p.name, p.cpuMs() || (previous?.get(p.name) ?? 0));
      if (p.partOf) this.parts.add(p.name);
    }
    this.readings.push({ atMs: Date.now(), host: hostCpu(), processes });
  }
}
