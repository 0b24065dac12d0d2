/**
 * The benchmarks' vmprune as operators run it: `vmprune send` and, for cache references, `vmprune receive` as
 * their own processes from the build (dist/, `npm run build` first), so that their peak memory (their reports'
 * `vmprune.peakRssBytes`, getrusage) is theirs alone, not the benchmark's or tsx's. Shared by bench:storage and
 * bench:scale. Both processes are stopped by PID however the migration ends.
 */
import type { LabPair } from "../src/lab/lab-vm.ts";
import { SendProcess } from "../src/lab/send-process.ts";
import type { SendReport } from "../src/migrate/send.ts";
import { type MigrationOptions, type MigrationResult, runMigration } from "../src/qemu/migration.ts";

/** What every report of the CLI carries (src/report/version.ts). */
interface Versioned {
  vmprune: { version: string; peakRssBytes: number };
}

/** receive's report (src/migrate/link-receive.ts ReceiveReport, as JSON). */
export interface ReceivedReport extends Versioned {
  refs: { refsResolved: number; refsNacked: number } & Record<string, number>;
}

export interface ProcessRun {
  result: MigrationResult;
  send: SendReport & Versioned;
  /** null without cache references (no receive). */
  receive: ReceivedReport | null;
}

export async function migrateThroughProcesses(
  pair: LabPair,
  /** Where the destination QEMU listens (prepareIncoming's URI). */
  dstUri: string,
  options: {
    drop: "free" | "free,cache";
    /** The link's pre-shared key file; needed with cache references. */
    key?: string;
    /** The shared disk send places cache pages on and receive reads them from. */
    disk?: string;
    cacheRefs?: "locator" | "index";
    migration?: Partial<MigrationOptions>;
    /** How long send may take to listen (the content index reads the whole image first). */
    startTimeoutMs?: number;
    /** How long each process may take to exit after the migration. */
    exitTimeoutMs?: number;
    /** Called with send's PID once it listens, before the migration starts (e.g. to sample its writes). */
    onSendStarted?: (pid: number) => void;
  },
): Promise<ProcessRun> {
  const linked = options.drop === "free,cache";
  if (linked && (!options.key || !options.disk))
    throw new Error("cache references need the link's key file and the shared disk");
  const receive = linked
    ? await SendProcess.start({
        command: "receive",
        to: dstUri,
        extraArgs: ["--link-key", options.key ?? "", "--disk", options.disk ?? ""],
        built: true,
      })
    : null;
  let send: SendProcess | undefined;
  try {
    send = await SendProcess.start({
      to: receive ? `${receive.listen.host}:${receive.listen.port}` : dstUri,
      extraArgs: [
        ...["--drop", options.drop, "--qmp", pair.src.toolQmpPath],
        ...(linked ? ["--link-key", options.key ?? "", "--disk", options.disk ?? ""] : []),
        ...(options.cacheRefs ? ["--cache-refs", options.cacheRefs] : []),
      ],
      built: true,
      ...(options.startTimeoutMs ? { startTimeoutMs: options.startTimeoutMs } : {}),
    });
    options.onSendStarted?.(send.pid);
    const result = await runMigration(pair.src.monitor, send.uri, options.migration ?? {});
    const exitMs = options.exitTimeoutMs ?? 120_000;
    const [sent, received] = await Promise.all([send.wait(exitMs), receive?.wait(exitMs)]);
    const report = sent.report as (SendReport & Versioned) | null;
    if (!report?.prune) throw new Error(`vmprune send printed no report: ${sent.stderr.slice(-500)}`);
    if (report.relay.error) throw new Error(`vmprune send: ${report.relay.error}`);
    let receiveReport: ReceivedReport | null = null;
    if (received) {
      try {
        receiveReport = JSON.parse(received.stdout) as ReceivedReport;
      } catch {
        throw new Error(`vmprune receive printed no report: ${received.stderr.slice(-500)}`);
      }
    }
    return { result, send: report, receive: receiveReport };
  } finally {
    await send?.stop();
    await receive?.stop();
  }
}
