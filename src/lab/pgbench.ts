/**
 * pgbench in the Debian guest: the command that starts it detached (so it runs on through a migration, whatever
 * becomes of the agent's connection), the parser of its log (per-second progress and the final summary, as
 * PostgreSQL 15's pgbench prints them), the transaction rate before / during / after a migration, and the
 * integrity check (pg_amcheck) of the database it worked on.
 */

import { PGBENCH_DATABASE, POSTGRES } from "./debian-system.ts";
import type { GuestAgent } from "./guest-agent.ts";

export interface PgbenchRun {
  clients: number;
  threads: number;
  durationS: number;
  /**
   * Tries per transaction (pgbench --max-tries, PostgreSQL 15+): a serialization or deadlock failure is retried
   * and, if it keeps failing, counted as a failed transaction instead of aborting its client; other errors
   * still abort the client, which the summary then says.
   */
  maxTries: number;
}

/** 4 clients on 2 threads (one per vCPU) for `durationS` seconds. */
export function pgbenchRun(durationS: number): PgbenchRun {
  return { clients: 4, threads: 2, durationS, maxTries: 10 };
}

/** The log in the guest's /run (tmpfs: RAM, which migrates with the guest). */
export const PGBENCH_LOG = "/run/pgbench.log";
/** Last line of the log, written by the shell that ran pgbench: its exit status. */
const EXIT_MARKER = "PGBENCH-EXIT";

/**
 * The guest command starting pgbench in its own session (setsid -f), as the postgres user, progress every second
 * with Unix timestamps (--progress-timestamp, so each line says when on the guest's clock), all into PGBENCH_LOG.
 */
export function startPgbenchCommand(run: PgbenchRun): string {
  const pgbench = [
    `${POSTGRES.bin}/pgbench`,
    `-c ${run.clients}`,
    `-j ${run.threads}`,
    `-T ${run.durationS}`,
    "-P 1",
    "--progress-timestamp",
    `--max-tries=${run.maxTries}`,
    PGBENCH_DATABASE.name,
  ].join(" ");
  const script = `cd /tmp; runuser -u postgres -- ${pgbench} > ${PGBENCH_LOG} 2>&1; echo "${EXIT_MARKER} $?" >> ${PGBENCH_LOG}`;
  // The log exists (empty) before the command returns: a reader right after it must not race the detached shell.
  return `: > ${PGBENCH_LOG}; setsid -f sh -c '${script}' < /dev/null > /dev/null 2>&1; echo started`;
}

export interface PgbenchProgress {
  /** The guest's clock at the end of the interval (seconds since the epoch). */
  atS: number;
  tps: number;
  latencyMs: number;
  failed: number;
}

export interface PgbenchSummary {
  transactions: number;
  /** "number of failed transactions" (PostgreSQL 15+). */
  failed: number;
  tps: number;
}

export interface PgbenchLog {
  progress: PgbenchProgress[];
  /** Absent until pgbench has finished. */
  summary?: PgbenchSummary;
  /** pgbench's exit status (0: ran to the end; 2: a client aborted), once it has finished. */
  exitStatus?: number;
  /** Lines saying a client aborted or an error occurred. */
  errors: string[];
}

/**
 * Parses pgbench's output: `progress: 1733390000.123 s, 123.4 tps, lat 8.123 ms stddev 2.345, 0 failed[, ...]`
 * lines (pgbench.c printProgressReport, 15), the summary's `number of transactions actually processed: N`,
 * `number of failed transactions: N (x%)` and `tps = X (without initial connection time)`, and our exit marker.
 */
export function parsePgbenchLog(text: string): PgbenchLog {
  const progress: PgbenchProgress[] = [];
  const errors: string[] = [];
  let transactions: number | undefined;
  let failed: number | undefined;
  let tps: number | undefined;
  let exitStatus: number | undefined;
  for (const line of text.split("\n")) {
    const p =
      /^progress: ([\d.]+) s, ([\d.]+) tps, lat ([\d.]+) ms stddev (?:[\d.]+|NaN)(?:, (\d+) failed)?/.exec(
        line,
      );
    if (p) {
      progress.push({
        atS: Number(p[1]),
        tps: Number(p[2]),
        latencyMs: Number(p[3]),
        failed: Number(p[4] ?? 0),
      });
      continue;
    }
    const processed = /^number of transactions actually processed: (\d+)/.exec(line);
    if (processed) transactions = Number(processed[1]);
    const failures = /^number of failed transactions: (\d+)/.exec(line);
    if (failures) failed = Number(failures[1]);
    const rate = /^tps = ([\d.]+) \(without initial connection time\)/.exec(line);
    if (rate) tps = Number(rate[1]);
    const exit = new RegExp(`^${EXIT_MARKER} (\\d+)`).exec(line);
    if (exit) exitStatus = Number(exit[1]);
    if (/aborted|error:|FATAL|PANIC/.test(line)) errors.push(line.trim());
  }
  const summary =
    transactions !== undefined && tps !== undefined ? { transactions, failed: failed ?? 0, tps } : undefined;
  return {
    progress,
    ...(summary ? { summary } : {}),
    ...(exitStatus !== undefined ? { exitStatus } : {}),
    errors,
  };
}

export async function readPgbenchLog(agent: GuestAgent): Promise<PgbenchLog> {
  return parsePgbenchLog(await agent.run(`cat ${PGBENCH_LOG}`, 30_000));
}

/** Polls the log until pgbench has exited (its exit marker), for at most `timeoutMs`. */
export async function waitPgbench(agent: GuestAgent, timeoutMs: number): Promise<PgbenchLog> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const log = await readPgbenchLog(agent);
    if (log.exitStatus !== undefined) return log;
    if (Date.now() > deadline)
      throw new Error(
        `pgbench did not finish within ${timeoutMs} ms (${log.progress.length} progress lines so far): is the guest running?`,
      );
    await new Promise((resolve) => setTimeout(resolve, 2_000));
  }
}

/** Waits until pgbench has printed `lines` progress lines (it runs at full rate by then). */
export async function waitPgbenchProgress(
  agent: GuestAgent,
  lines: number,
  timeoutMs: number,
): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const log = await readPgbenchLog(agent);
    if (log.progress.length >= lines) return;
    if (log.exitStatus !== undefined)
      throw new Error(
        `pgbench exited (${log.exitStatus}) before ${lines} seconds: ${log.errors.join(" | ")}`,
      );
    if (Date.now() > deadline)
      throw new Error(
        `pgbench printed ${log.progress.length} of ${lines} progress lines within ${timeoutMs} ms`,
      );
    await new Promise((resolve) => setTimeout(resolve, 1_000));
  }
}

/** The guest's clock in seconds since the epoch (the clock pgbench's progress timestamps use). */
export async function guestClockS(agent: GuestAgent): Promise<number> {
  return Number((await agent.run("date +%s.%N", 30_000)).trim());
}

export interface TpsPhase {
  /** Progress lines (seconds) in the phase. */
  seconds: number;
  meanTps: number;
  minTps: number;
}

export interface TpsPhases {
  before: TpsPhase;
  during: TpsPhase;
  after: TpsPhase;
}

function phase(lines: readonly PgbenchProgress[]): TpsPhase {
  const rates = lines.map((l) => l.tps);
  return {
    seconds: rates.length,
    meanTps: rates.length > 0 ? rates.reduce((a, b) => a + b, 0) / rates.length : 0,
    minTps: rates.length > 0 ? Math.min(...rates) : 0,
  };
}

/**
 * The transaction rate before, during and after a migration, on the guest's clock: a progress line belongs to
 * the phase its interval (the second before its timestamp) ends in; "during" runs from `startedS` (the guest's
 * clock when the migration was started) to `resumedS` (its clock once the destination ran it).
 */
export function tpsPhases(
  progress: readonly PgbenchProgress[],
  startedS: number,
  resumedS: number,
): TpsPhases {
  return {
    before: phase(progress.filter((l) => l.atS <= startedS)),
    during: phase(progress.filter((l) => l.atS > startedS && l.atS <= resumedS + 1)),
    after: phase(progress.filter((l) => l.atS > resumedS + 1)),
  };
}

/**
 * pg_amcheck on the pgbench database: every table's heap checked, and with --heapallindexed every index entry
 * checked against its heap; exit status 0 and no output when nothing is corrupt.
 */
export function amcheckCommand(): string {
  return `cd /tmp; runuser -u postgres -- ${POSTGRES.bin}/pg_amcheck --heapallindexed -d ${PGBENCH_DATABASE.name} 2>&1; echo "AMCHECK-EXIT $?"`;
}

export interface AmcheckResult {
  ok: boolean;
  output: string;
}

export async function runAmcheck(agent: GuestAgent, timeoutMs: number): Promise<AmcheckResult> {
  const output = await agent.run(amcheckCommand(), timeoutMs);
  const status = /AMCHECK-EXIT (\d+)/.exec(output)?.[1];
  const report = output.replace(/AMCHECK-EXIT \d+\s*$/, "").trim();
  return { ok: status === "0" && report === "", output: report };
}
