/**
 * What `vmprune send` costs in CPU per page, away from the link and from QEMU's own pace. Not a test.
 *
 *   node --import tsx bench/send-cpu.ts [--kernel 6.1] [--qemu 7.2] [--runs 3] [--chunk 65536] [--json]
 *
 * A 512 MiB lab guest runs the mixed workload; its migration stream is captured to a file and the guest is left
 * paused, so its RAM (the shared-memory file) and its data disk stay as the stream saw them. The stream is then
 * fed, in chunks of `--chunk` bytes as a socket would deliver them, through send's main-channel processor in
 * this process, three ways:
 *   passthrough   the parser alone (send's passthrough, and what every pruning row pays too);
 *   free          pruning free pages (judging every batch against the paused guest's RAM, invariant 1's reads);
 *   free+cache    also cache pages as references (the locator on the data disk, SHA-256 of every referenced page).
 * Figures are CPU time of this process (user + system) and wall time, the best of `--runs`; per PAGE record of
 * the stream and as a rate of stream bytes. Being CPU time on one thread, they hold on a busy host too, unlike
 * migration times, and they say what the pipeline can do at most per core: a row's MB/s below the link's rate
 * means send, not the link, sets the pace.
 *
 * Logs go to stderr; stdout gets the table, or with --json the figures.
 */
import { readFileSync, rmSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";
import { parseArgs } from "node:util";
import type { Category } from "../src/introspect/classifier.ts";
import { LabPair } from "../src/lab/lab-vm.ts";
import { captureStream } from "../src/lab/stream-capture.ts";
import { RUN_ROOT } from "../src/lab/vm.ts";
import { runMixedWorkload } from "../src/lab/workloads.ts";
import { openGuestJudge } from "../src/migrate/guest-judge.ts";
import { IntrospectionJudge } from "../src/prune/page-judge.ts";
import { ALL_REFS, PruningProcessor } from "../src/prune/pruning-processor.ts";
import { table } from "../src/report/table.ts";
import { reportJson } from "../src/report/version.ts";
import { RawFileDevice } from "../src/storage/block-device.ts";
import { CacheReferences } from "../src/storage/cache-references.ts";
import { PageLocator } from "../src/storage/page-locator.ts";
import { LAB_OPTIONS, labTarget, requireSetup } from "./common.ts";

const USAGE = "bench/send-cpu.ts [--kernel 6.1] [--qemu 7.2] [--runs 3] [--chunk 65536] [--json]";

export interface SendCpuRow {
  row: "passthrough" | "free" | "free+cache";
  cpuMs: number;
  wallMs: number;
  pages: number;
  pruned: number;
  refs: number;
  batches: number;
  judgeMs: number;
}

const log = (line: string) => process.stderr.write(`${line}\n`);

/** Feeds `stream` in `chunk`-byte slices through a processor; CPU and wall time of the whole feed. */
function feed(
  stream: Buffer,
  chunk: number,
  processor: PruningProcessor,
  segments: boolean,
): { cpuMs: number; wallMs: number } {
  const cpu = process.cpuUsage();
  const started = performance.now();
  let sink = 0;
  for (let at = 0; at < stream.length; at += chunk) {
    const slice = stream.subarray(at, Math.min(stream.length, at + chunk));
    if (segments) sink += processor.pushSegments(slice, ALL_REFS).length;
    else sink += processor.push(slice).length;
  }
  sink += segments ? processor.endSegments(ALL_REFS).length : processor.end().length;
  const used = process.cpuUsage(cpu);
  if (sink < 0) log("unreachable");
  return { cpuMs: (used.user + used.system) / 1000, wallMs: performance.now() - started };
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      ...LAB_OPTIONS,
      qemu: { type: "string", default: "7.2" },
      chunk: { type: "string", default: "65536" },
      json: { type: "boolean", default: false },
    },
  });
  const { kernel, qemu, runs } = labTarget(values, USAGE);
  const chunk = Number(values.chunk);
  if (!Number.isInteger(chunk) || chunk < 64) throw new Error(`--chunk needs an integer >= 64 (${USAGE})`);
  requireSetup("bench:send-cpu", { guests: [kernel], qemu: [qemu] });

  const streamPath = join(RUN_ROOT, `${process.pid}-send-cpu.stream`);
  const pair = await LabPair.boot({ kernel, qemu, memoryMiB: 512 });
  const rows: SendCpuRow[] = [];
  try {
    log(`booted ${kernel} on QEMU ${qemu} (${pair.accel}); mixed workload`);
    await runMixedWorkload(pair.src.agent);
    const captured = await captureStream(pair.src, streamPath, { resume: false });
    log(`captured ${(captured.bytes / 2 ** 20).toFixed(1)} MiB; the guest stays paused`);
    const stream = readFileSync(streamPath);
    const device = await RawFileDevice.open(join(pair.diskDir, "data.img"));
    try {
      for (const row of ["passthrough", "free", "free+cache"] as const) {
        let best: SendCpuRow | undefined;
        for (let run = 0; run < runs; run++) {
          const drop: Category[] = row === "passthrough" ? [] : row === "free" ? ["free"] : ["free", "cache"];
          const opened =
            drop.length > 0 ? await openGuestJudge({ guestMemory: { path: pair.src.ramPath } }) : undefined;
          try {
            const judge = opened?.judge ?? "passthrough: nothing to drop";
            let references: CacheReferences | undefined;
            let locator: PageLocator | undefined;
            if (row === "free+cache" && judge instanceof IntrospectionJudge && judge.guest.types) {
              locator = await PageLocator.open({
                kernel: judge.guest.kernel,
                types: judge.guest.types,
                layout: judge.guest.layout,
                disks: [{ id: "data", device }],
              });
              references = new CacheReferences({ locator, singleDisk: true });
            }
            const processor = new PruningProcessor(judge, {
              drop,
              ...(references ? { cacheIndex: references } : {}),
            });
            const timing = feed(stream, chunk, processor, row === "free+cache");
            const report = processor.report();
            const result: SendCpuRow = {
              row,
              ...timing,
              pages: report.pages.seen,
              pruned: report.pages.pruned,
              refs: report.refs,
              batches: report.batches,
              judgeMs: report.judgeMs,
            };
            log(
              `${row} run ${run + 1}: ${result.cpuMs.toFixed(0)} ms CPU, ${result.wallMs.toFixed(0)} ms wall, ` +
                `${result.pruned} pruned, ${result.refs} refs, ${result.batches} batches` +
                (locator ? `; locator ${JSON.stringify(locator.stats())}` : ""),
            );
            if (!best || result.cpuMs < best.cpuMs) best = result;
          } finally {
            opened?.close();
          }
        }
        if (best) rows.push(best);
      }
    } finally {
      await device.close();
    }
    const pages = rows[0]?.pages ?? 0;
    const baseCpu = rows[0]?.cpuMs ?? 1;
    if (values.json) {
      process.stdout.write(reportJson({ kernel, qemu, chunk, streamBytes: stream.length, rows }));
      return;
    }
    process.stdout.write(
      table(
        [
          "row",
          "CPU ms",
          "µs / page",
          "stream MB/s per core",
          "× passthrough",
          "pruned",
          "refs",
          "batches",
          "judge ms",
        ],
        rows.map((r) => [
          r.row,
          r.cpuMs.toFixed(0),
          ((1000 * r.cpuMs) / Math.max(1, pages)).toFixed(2),
          (stream.length / 1e3 / Math.max(1e-3, r.cpuMs)).toFixed(0),
          (r.cpuMs / baseCpu).toFixed(2),
          String(r.pruned),
          String(r.refs),
          String(r.batches),
          String(r.judgeMs),
        ]),
      ),
    );
    process.stdout.write(
      `\n${(stream.length / 2 ** 20).toFixed(1)} MiB stream, ${pages} PAGE records, fed in ${chunk}-byte chunks; best of ${runs}.\n`,
    );
  } finally {
    await pair.stop();
    rmSync(streamPath, { force: true });
  }
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? "").href) {
  main().catch((error: unknown) => {
    log(error instanceof Error ? (error.stack ?? error.message) : String(error));
    process.exitCode = 1;
  });
}
