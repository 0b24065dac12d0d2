/**
 * What dropping free pages saves, against plain QEMU and against QEMU's own free-page hinting, on one guest and
 * workload in one run. Not a test.
 *
 *   node --import tsx bench/prune.ts [--kernel 6.1|6.12] [--qemu 7.2|10.0] [--runs 3] [--json]
 *
 * A 512 MiB lab guest (1 vCPU) runs the mixed workload (src/lab/workloads.ts), then live-migrates on loopback
 * (LOOPBACK_PARAMETERS, QEMU's other defaults) in one of three ways:
 *   plain                 source QEMU → destination QEMU (LabPair.migratePlain);
 *   free-page-hint        the same, both VMs with virtio-balloon-pci,free-page-hint=on (VmConfig.balloon): during
 *                         precopy QEMU asks the guest's virtio_balloon driver for free page blocks and skips them;
 *   vmprune --drop free   source QEMU → `vmprune send --drop free` (startSend, in this process, judging pages
 *                         through the source's tool QMP socket) → destination QEMU.
 * Every run boots a fresh pair, so each migration starts from a comparable guest state; runs of the three rows
 * alternate, so drift on the host spreads over all of them. After each migration the destination must run and
 * pass `verify`. Figures are medians over `--runs`:
 *   wire bytes   what reached the destination QEMU: QEMU's `ram.transferred` for plain and free-page-hint (the
 *                source writes straight to the destination), the relay's bytes to the destination, summed over
 *                its channels, for vmprune;
 *   ram.transferred, total time and downtime as the source QEMU's query-migrate reports them (for vmprune,
 *                `ram.transferred` counts what the source sent to the relay, before pruning);
 *   free pages   the guest's MemFree / 4 KiB just before the migration.
 *
 * Logs go to stderr; stdout gets the table, or with --json the figures.
 */

import { pathToFileURL } from "node:url";
import { parseArgs } from "node:util";
import { guestBalloon } from "../src/lab/balloon.ts";
import type { KernelId } from "../src/lab/kernels.ts";
import { LabPair } from "../src/lab/lab-vm.ts";
import type { QemuVersion } from "../src/lab/qemu-binaries.ts";
import { sweepStaleRuns } from "../src/lab/vm.ts";
import { guestMeminfo, runMixedWorkload } from "../src/lab/workloads.ts";
import { type MigrationResult, prepareIncoming, tcpAddress } from "../src/qemu/migration.ts";
import { REPORT_WIDTH, table, wrap } from "../src/report/table.ts";
import { reportJson } from "../src/report/version.ts";
import { LAB_OPTIONS, labTarget, median, requireSetup } from "./common.ts";
import { migrateThroughInProcessSend } from "./send-run.ts";

export const ROWS = ["plain", "free-page-hint", "vmprune --drop free"] as const;
export type Row = (typeof ROWS)[number];

export interface RunFigures {
  wireBytes: number;
  ramTransferredBytes: number;
  totalTimeMs: number;
  downtimeMs: number;
  freePages: number;
  /** vmprune only: PAGE records it turned into ZERO records. */
  prunedPages?: number;
}

export interface RowResult {
  row: Row;
  runs: RunFigures[];
  median: RunFigures;
  /** Median wire bytes / the plain row's. */
  wireRatioToPlain: number;
}

export interface PruneBenchResult {
  kernel: KernelId;
  qemu: QemuVersion;
  accel: string;
  memoryMiB: number;
  runs: number;
  rows: RowResult[];
  /** The target: vmprune's median wire bytes at most free-page-hint's. */
  vmpruneAtMostFreePageHint: boolean;
}

const MEMORY_MIB = 512;
const HOST = "127.0.0.1";
const log = (line: string) => process.stderr.write(`${line}\n`);

function figuresOf(result: MigrationResult, wireBytes: number, freePages: number): RunFigures {
  return {
    wireBytes,
    ramTransferredBytes: result.info.ram?.transferred ?? 0,
    totalTimeMs: result.info["total-time"] ?? Math.round(result.wallMs),
    downtimeMs: result.info.downtime ?? 0,
    freePages,
  };
}

/** Source → `vmprune send --drop free` (in this process) → a fresh destination. */
async function migrateThroughSend(pair: LabPair, freePages: number): Promise<RunFigures> {
  const dst = await pair.startDestination();
  const dstUri = await prepareIncoming(dst.monitor, { incomingUri: `tcp:${HOST}:0` });
  const run = await migrateThroughInProcessSend(pair, dst, {
    listen: { host: HOST },
    to: tcpAddress(dstUri),
    drop: ["free"],
  });
  return { ...figuresOf(run.result, run.wireBytes, freePages), prunedPages: run.prunedPages };
}

async function runOnce(
  row: Row,
  kernel: KernelId,
  qemu: QemuVersion,
): Promise<RunFigures & { accel: string }> {
  const pair = await LabPair.boot({
    kernel,
    qemu,
    memoryMiB: MEMORY_MIB,
    ...(row === "free-page-hint" ? { balloon: "free-page-hint" as const } : {}),
  });
  try {
    if (row === "free-page-hint") {
      const balloon = await guestBalloon(pair.src.agent);
      if (balloon?.driver !== "virtio_balloon" || !balloon.freePageHint)
        throw new Error(`the guest's balloon has no free page hinting: ${JSON.stringify(balloon)}`);
    }
    await runMixedWorkload(pair.src.agent);
    const freePages = Math.floor(((await guestMeminfo(pair.src.agent)).MemFree ?? 0) / 4);
    let figures: RunFigures;
    if (row === "vmprune --drop free") figures = await migrateThroughSend(pair, freePages);
    else {
      const result = await pair.migratePlain();
      figures = figuresOf(result, result.info.ram?.transferred ?? 0, freePages);
    }
    const dst = pair.dst;
    if (!dst) throw new Error("no destination after the migration");
    const verified = await LabPair.verify(dst);
    if (!/^OK/m.test(verified)) throw new Error(`${row}: verify on the destination: ${verified.trim()}`);
    return { ...figures, accel: pair.accel };
  } finally {
    await pair.stop();
  }
}

export async function benchPrune(options: {
  kernel: KernelId;
  qemu: QemuVersion;
  runs: number;
}): Promise<PruneBenchResult> {
  const runs = new Map<Row, RunFigures[]>(ROWS.map((row) => [row, []]));
  let accel = "";
  for (let i = 0; i < options.runs; i++) {
    for (const row of ROWS) {
      const started = performance.now();
      const { accel: a, ...figures } = await runOnce(row, options.kernel, options.qemu);
      accel = a;
      runs.get(row)?.push(figures);
      log(
        `run ${i + 1}/${options.runs} ${row}: ${figures.wireBytes} B on the wire, ` +
          `ram.transferred ${figures.ramTransferredBytes} B, ${figures.totalTimeMs} ms total, ` +
          `${figures.downtimeMs} ms down, ${figures.freePages} free pages` +
          `${figures.prunedPages !== undefined ? `, ${figures.prunedPages} pages pruned` : ""} ` +
          `(${Math.round((performance.now() - started) / 1000)} s with boot and workload)`,
      );
    }
  }
  const medianOf = (list: RunFigures[]): RunFigures => {
    const m: RunFigures = {
      wireBytes: median(list.map((r) => r.wireBytes)),
      ramTransferredBytes: median(list.map((r) => r.ramTransferredBytes)),
      totalTimeMs: median(list.map((r) => r.totalTimeMs)),
      downtimeMs: median(list.map((r) => r.downtimeMs)),
      freePages: median(list.map((r) => r.freePages)),
    };
    const pruned = list.flatMap((r) => (r.prunedPages === undefined ? [] : [r.prunedPages]));
    if (pruned.length > 0) m.prunedPages = median(pruned);
    return m;
  };
  const plainWire = medianOf(runs.get("plain") ?? []).wireBytes;
  const rows = ROWS.map((row): RowResult => {
    const list = runs.get(row) ?? [];
    const m = medianOf(list);
    return { row, runs: list, median: m, wireRatioToPlain: plainWire > 0 ? m.wireBytes / plainWire : 0 };
  });
  const wireOf = (row: Row) => rows.find((r) => r.row === row)?.median.wireBytes ?? 0;
  return {
    kernel: options.kernel,
    qemu: options.qemu,
    accel,
    memoryMiB: MEMORY_MIB,
    runs: options.runs,
    rows,
    vmpruneAtMostFreePageHint: wireOf("vmprune --drop free") <= wireOf("free-page-hint"),
  };
}

/** One line per row, figures right-aligned with their units in the header (report/table.ts); bytes in MiB. */
export function formatTable(result: PruneBenchResult): string {
  const mib = (bytes: number) => (bytes / (1 << 20)).toFixed(1);
  const whole = (x: number | undefined) => (x === undefined ? "-" : String(Math.round(x)));
  const title =
    `${result.memoryMiB} MiB guest, mixed workload, kernel ${result.kernel}, QEMU ${result.qemu} (${result.accel}), ` +
    `medians of ${result.runs} runs per row`;
  const rows = result.rows.map(({ row, median: m, wireRatioToPlain }) => [
    row,
    mib(m.wireBytes),
    wireRatioToPlain.toFixed(3),
    mib(m.ramTransferredBytes),
    (m.totalTimeMs / 1000).toFixed(2),
    whole(m.downtimeMs),
    whole(m.freePages),
    whole(m.prunedPages),
  ]);
  return [
    ...wrap(title, REPORT_WIDTH),
    table(["row", "wire MiB", "/ plain", "QEMU MiB", "total s", "down ms", "free pages", "pruned"], rows),
    "wire: what reached the destination QEMU; QEMU: its ram.transferred (for vmprune, before pruning).",
    `target vmprune wire bytes <= free-page-hint: ${result.vmpruneAtMostFreePageHint ? "met" : "NOT met"}`,
  ].join("\n");
}

async function main(argv: string[]): Promise<void> {
  const usage = "usage: bench/prune.ts [--kernel 6.1|6.12] [--qemu 7.2|10.0] [--runs 3] [--json]";
  const { values } = parseArgs({
    args: argv,
    options: { ...LAB_OPTIONS, json: { type: "boolean", default: false } },
  });
  const target = labTarget(values, usage);
  requireSetup("bench:prune", { guests: [target.kernel], qemu: [target.qemu] });
  sweepStaleRuns();
  const result = await benchPrune(target);
  process.stdout.write(values.json ? reportJson(result) : `${formatTable(result)}\n`);
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  main(process.argv.slice(2)).catch((error: unknown) => {
    process.stderr.write(`${error instanceof Error ? error.stack : String(error)}\n`);
    process.exitCode = 1;
  });
}
