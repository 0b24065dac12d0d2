/**
 * Guests at the sizes operators run: the mixed workload scaled from 512 MiB to 2, 4 or 8 GiB, migrated on
 * loopback by plain QEMU and through vmprune send (and receive) as processes, with both oracles, send's and
 * receive's peak memory, and the judge's time per GiB. Not a test.
 *
 *   npm run bench:scale -- [--memory 2,4,8] [--kernel 6.1] [--qemu 10.0] [--vcpus 1] [--json]
 *                          [--report FILE.html]
 *
 * Per size, one guest (booted once, its workload run once: at 8 GiB under TCG that takes minutes): the mixed
 * workload's every amount times size / 512 MiB (scaleWorkload), its files as many and as much larger, on a data
 * disk made for it. Then the ideal (bench/ideal.ts: the source classified while paused), then three migrations of
 * the same guest state, each into a fresh destination held paused (-S), the source resumed between them:
 *   plain              source QEMU → destination QEMU;
 *   vmprune free       source → `vmprune send --drop free` → destination;
 *   vmprune free+cache source → `vmprune send --drop free,cache` → `vmprune receive` (the shared disk) → destination,
 *                      with send's default `--refs-when link-busy` (on loopback most cache pages then go whole).
 * send and receive run from the build (dist/), their own processes, as operators run them (bench/process-run.ts).
 * Oracle 1 after every row (src/lab/prune-oracle.ts): source and destination RAM compared page by page; every
 * page that differs must be free in the source's final classification (for plain: none may differ). Oracle 2
 * after the last row: its destination runs and the guest's own `vmwork verify` passes there. (Only the last one:
 * a destination that runs writes to the shared disk the source still has mounted.)
 * Figures per row, from both QEMUs' MIGRATION and STOP events (capability `events`, one host clock):
 *   loaded       `migrate` (the source's "setup") to the destination's "completed": all RAM and device state in;
 *   pause        the source's STOP to the destination's "completed" (the guest's pause, but for its resume);
 *   bytes        what left the source side: QEMU's ram.transferred for plain, the bytes send wrote for vmprune;
 *   send / receive peak RSS  the processes' own getrusage (target: 256 MB or less each, whatever the size);
 *   judge        send's time in the judge (struct pages read and classified), per GiB of guest RAM.
 * `--report FILE.html`: the HTML page of each size (FILE-8gib.html etc. when there are several): the rows' times
 * and pauses against plain, guest pages by how they travelled, and each row's throughput over time, read as the
 * bytes the source side sent, every 100 ms (the source QEMU's ram.transferred for plain, send's writes for
 * vmprune: /proc/PID/io wchar).
 * Logs go to stderr; stdout gets the table, or with --json the figures.
 */
import { randomBytes } from "node:crypto";
import { readFileSync } from "node:fs";
import { writeFile } from "node:fs/promises";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { dataFilePaths } from "../src/lab/data-disk.ts";
import { run } from "../src/lab/exec.ts";
import { isKernelId, type KernelId } from "../src/lab/kernels.ts";
import { LabPair } from "../src/lab/lab-vm.ts";
import { prunedRamOracle } from "../src/lab/prune-oracle.ts";
import { isQemuVersion, type QemuVersion } from "../src/lab/qemu-binaries.ts";
import { MIXED_512M, runMixedWorkload, scaleWorkload } from "../src/lab/workloads.ts";
import { prepareIncoming, runMigration, waitDestinationState } from "../src/qemu/migration.ts";
import type { MigrationInfo, QmpClient, QmpEvent } from "../src/qemu/qmp.ts";
import { pageTrafficOf } from "../src/report/page-traffic.ts";
import type { MigrationReportModel, PageTrafficBytes, ThroughputSample } from "../src/report/report-model.ts";
import { REPORT_WIDTH, table, wrap } from "../src/report/table.ts";
import {
  type CounterReading,
  DEFAULT_SAMPLE_INTERVAL_MS,
  ThroughputSampler,
  throughputOf,
} from "../src/report/throughput-sampler.ts";
import { reportJson } from "../src/report/version.ts";
import { requireSetup } from "./common.ts";
import { idealBytes } from "./ideal.ts";
import { migrateThroughProcesses } from "./process-run.ts";

const MIB = 1024 * 1024;
const USAGE =
  "npm run bench:scale -- [--memory 2,4,8] [--kernel 6.1] [--qemu 10.0] [--vcpus 1] [--json] [--report FILE.html]";
/** The target of issue 14 for each of send and receive, whatever the guest's size. */
const PEAK_RSS_TARGET_MB = 256;
const ROWS = ["plain", "vmprune free", "vmprune free+cache"] as const;
type RowName = (typeof ROWS)[number];
const log = (line: string) => process.stderr.write(`${line}\n`);

const { values } = parseArgs({
  options: {
    memory: { type: "string", default: "2,4,8" },
    kernel: { type: "string", default: "6.1" },
    qemu: { type: "string", default: "10.0" },
    vcpus: { type: "string", default: "1" },
    json: { type: "boolean", default: false },
    report: { type: "string" },
  },
});
const sizesGiB = values.memory.split(",").map(Number);
if (sizesGiB.some((s) => !Number.isInteger(s) || s < 1 || s > 8))
  throw new Error(`--memory: whole GiB from 1 to 8, e.g. 2,4,8 (${USAGE})`);
if (!isKernelId(values.kernel)) throw new Error(`unknown kernel ${values.kernel} (${USAGE})`);
if (!isQemuVersion(values.qemu)) throw new Error(`unknown QEMU ${values.qemu} (${USAGE})`);
const vcpus = Number(values.vcpus);
if (!Number.isInteger(vcpus) || vcpus < 1) throw new Error(`--vcpus needs a positive integer (${USAGE})`);
const kernel: KernelId = values.kernel;
const qemu: QemuVersion = values.qemu;
requireSetup("bench:scale", { guests: [kernel], qemu: [qemu], commands: ["mkfs.ext4"] });

interface RowFigures {
  sizeGiB: number;
  row: RowName;
  loadedMs: number;
  pauseMs: number;
  bytes: number;
  /** Oracle 1: pages that differ between source and destination, and those of them not free (must be 0). */
  differing: number;
  differingNotFree: number;
  /** Oracle 2 (last row only): the destination's `vmwork verify` output, or null when not run. */
  verified: string | null;
  sendPeakRssMB: number | null;
  receivePeakRssMB: number | null;
  judgeMs: number | null;
  pagesPruned: number | null;
  refs: number | null;
  /** Cache pages sent whole because the link had room (send's default, --refs-when link-busy). */
  cacheWhole: number | null;
  refsNacked: number | null;
  /** Guest pages by how they travelled, and the source side's writes over time, for the HTML report. */
  pageBytes: PageTrafficBytes;
  throughput: ThroughputSample[];
}

interface SizeFigures {
  sizeGiB: number;
  bootMs: number;
  workloadMs: number;
  idealBytes: number;
  /** The ideal's classification: pages by kind. */
  idealCounts: string;
  rows: RowFigures[];
}

/** QMP event timestamps (host wall clock) in ms. */
const eventMs = (e: QmpEvent) => e.timestamp.seconds * 1000 + e.timestamp.microseconds / 1000;
const migrationEvent = (status: string) => (e: QmpEvent) =>
  (e.data as { status?: string } | undefined)?.status === status;

/**
 * `migrate` (the source's MIGRATION "setup"), the source's STOP and the destination's MIGRATION "completed"
 * since `sinceMs`: when this migration started, paused the guest, and was wholly in.
 */
async function timeline(
  src: QmpClient,
  dst: QmpClient,
  sinceMs: number,
): Promise<{ loadedMs: number; pauseMs: number; migrateAtMs: number }> {
  const after = (e: QmpEvent) => eventMs(e) >= sinceMs;
  const setup = src.events().find((e) => e.event === "MIGRATION" && after(e) && migrationEvent("setup")(e));
  const stops = src.events().filter((e) => e.event === "STOP" && after(e));
  const stop = stops[stops.length - 1];
  if (!setup || !stop) throw new Error("the source sent no MIGRATION setup or STOP event for this migration");
  const completed = await dst.waitEvent(
    "MIGRATION",
    (e) => after(e) && migrationEvent("completed")(e),
    60_000,
  );
  return {
    loadedMs: eventMs(completed) - eventMs(setup),
    pauseMs: eventMs(completed) - eventMs(stop),
    migrateAtMs: eventMs(setup),
  };
}

/** Bytes a process wrote so far (sockets included): `wchar` of /proc/PID/io. */
function bytesWrittenBy(pid: number): number {
  const m = /^wchar:\s+(\d+)$/m.exec(readFileSync(`/proc/${pid}/io`, "utf8"));
  if (!m?.[1]) throw new Error(`/proc/${pid}/io has no wchar`);
  return Number(m[1]);
}

/** One size's rows as the HTML report's model. */
function scaleReportModel(s: SizeFigures): MigrationReportModel {
  return {
    title: `vmprune bench:scale: ${s.sizeGiB} GiB guest, mixed workload`,
    context: [
      `${s.sizeGiB} GiB guest (kernel ${kernel}, QEMU ${qemu}, ${vcpus} vCPU), the 512 MiB mixed workload scaled ` +
        `${s.sizeGiB * 2} times; loopback, one run per row, each into a destination held paused.`,
    ],
    rows: s.rows.map((r) => ({
      name: r.row,
      toResumeMs: r.loadedMs,
      guestPauseMs: r.pauseMs,
      linkBytes: r.bytes,
      pageBytes: r.pageBytes,
      throughput: r.throughput,
      pause: { fromMs: r.loadedMs - r.pauseMs, toMs: r.loadedMs },
    })),
    baseline: "plain",
    ideal: { bytes: s.idealBytes },
    throughputNote: `bytes the source side sent, every ${DEFAULT_SAMPLE_INTERVAL_MS} ms, from \`migrate\`: QEMU's ram.transferred for plain, what send wrote for vmprune (/proc/PID/io wchar)`,
    notes: [
      "Time to resume here is `migrate` to the destination's MIGRATION completed: the destination is held paused (-S) for the RAM-compare oracle, so it never resumes; the pause is the source's STOP to that moment.",
    ],
  };
}

/** FILE.html for one size, FILE-8gib.html for each of several. */
function reportPath(path: string, sizeGiB: number): string {
  if (sizesGiB.length === 1) return path;
  return /\.html?$/i.test(path)
    ? path.replace(/(\.html?)$/i, `-${sizeGiB}gib$1`)
    : `${path}-${sizeGiB}gib.html`;
}

async function migrateRow(
  pair: LabPair,
  row: RowName,
  sizeGiB: number,
  key: string,
  last: boolean,
): Promise<RowFigures> {
  const timeoutMs = 120_000 * sizeGiB;
  const dst = await pair.startDestination({ paused: true });
  const dstUri = await prepareIncoming(dst.monitor, {
    incomingUri: "tcp:127.0.0.1:0",
    capabilities: { events: true },
  });
  const migration = { capabilities: { events: true }, timeoutMs };
  const sinceMs = Date.now();
  // What the source side sent: QEMU's own count for plain (its socket writes are sendmsg, which /proc/PID/io
  // does not count), the bytes send wrote for vmprune (node writes with write/writev, which it counts).
  const startedMs = performance.now();
  let bytes: number;
  let info: MigrationInfo;
  let samples: ThroughputSample[] = [];
  let vmprune: Awaited<ReturnType<typeof migrateThroughProcesses>> | null = null;
  if (row === "plain") {
    const transferred: CounterReading[] = [];
    const result = await runMigration(pair.src.monitor, dstUri, {
      ...migration,
      onProgress: (progress) =>
        transferred.push({ atMs: performance.now(), bytes: progress.ram?.transferred ?? 0 }),
    });
    bytes = result.info.ram?.transferred ?? 0;
    info = result.info;
    samples = throughputOf(transferred, startedMs);
  } else {
    let writer: number | undefined;
    const sampler = new ThroughputSampler(() => (writer === undefined ? 0 : bytesWrittenBy(writer)));
    sampler.start();
    vmprune = await migrateThroughProcesses(pair, dstUri, {
      drop: row === "vmprune free" ? "free" : "free,cache",
      key,
      disk: join(pair.diskDir, "data.img"),
      migration,
      onSendStarted: (pid) => {
        writer = pid;
      },
    }).finally(() => {
      samples = sampler.stop();
    });
    bytes = vmprune.send.relay.channels.reduce((sum, c) => sum + c.bytesToDestination, 0);
    info = vmprune.result.info;
  }
  const times = await timeline(pair.src.monitor, dst.monitor, sinceMs);
  // The samples count from the sampler's start (before send started); the report counts from `migrate`.
  const shiftMs = times.migrateAtMs - sinceMs;
  const throughput = samples.map((s) => ({ ...s, tMs: s.tMs - shiftMs })).filter((s) => s.tMs >= 0);
  await waitDestinationState(dst.monitor, "paused", 60_000);
  log(`  ${row}: loaded in ${Math.round(times.loadedMs)} ms, ${bytes} B; comparing RAM`);
  const oracle = await prunedRamOracle(pair.src, dst);
  let verified: string | null = null;
  if (last) {
    await dst.monitor.execute("cont");
    await waitDestinationState(dst.monitor, "running");
    verified = (await LabPair.verify(dst, 300_000 * sizeGiB)).trim();
  }
  await dst.stop();
  if (!last) {
    // The source still owns the guest (the destination never ran): it runs again for the next row.
    await pair.src.monitor.execute("cont");
    await waitDestinationState(pair.src.monitor, "running");
  }
  const prune = vmprune?.send.prune;
  const { migrateAtMs: _, ...figures } = times;
  return {
    sizeGiB,
    row,
    ...figures,
    bytes,
    differing: oracle.differing,
    differingNotFree: oracle.differingNotFree.length,
    verified,
    sendPeakRssMB: vmprune ? vmprune.send.vmprune.peakRssBytes / MIB : null,
    receivePeakRssMB: vmprune?.receive ? vmprune.receive.vmprune.peakRssBytes / MIB : null,
    judgeMs: prune?.judgeMs ?? null,
    pagesPruned: prune ? prune.pages.pruned : null,
    refs: prune ? prune.refs : null,
    cacheWhole: prune ? prune.cacheWhole : null,
    pageBytes: pageTrafficOf(info, prune ?? null),
    throughput,
    refsNacked: vmprune?.receive ? vmprune.receive.refs.refsNacked : null,
  };
}

async function measureSize(sizeGiB: number): Promise<SizeFigures> {
  const memoryMiB = sizeGiB * 1024;
  const scaled = scaleWorkload(MIXED_512M, memoryMiB);
  log(
    `bench:scale: ${sizeGiB} GiB guest (kernel ${kernel}, QEMU ${qemu}, ${vcpus} vCPU), mixed workload x${scaled.factor}: ` +
      `${JSON.stringify(scaled.sizes)}, data disk ${JSON.stringify(scaled.layout)}`,
  );
  const pair = await LabPair.boot({
    kernel,
    qemu,
    memoryMiB,
    vcpus,
    storage: { dataLayout: scaled.layout },
    bootTimeoutMs: 600_000,
  });
  try {
    log(`  booted in ${Math.round(pair.bootMs)} ms`);
    const workloadStarted = performance.now();
    for (const line of await runMixedWorkload(pair.src.agent, scaled.sizes, dataFilePaths(scaled.layout)))
      log(`  guest: ${line}`);
    const workloadMs = performance.now() - workloadStarted;
    const ideal = await idealBytes(pair);
    log(`  workload ${Math.round(workloadMs)} ms; ideal ${ideal.ideal} B ${ideal.counts}`);
    const key = join(pair.diskDir, "link.key");
    await writeFile(key, randomBytes(32), { mode: 0o600 });
    const rows: RowFigures[] = [];
    for (const [i, row] of ROWS.entries()) {
      const figures = await migrateRow(pair, row, sizeGiB, key, i === ROWS.length - 1);
      log(`  ${JSON.stringify(figures)}`);
      rows.push(figures);
    }
    return {
      sizeGiB,
      bootMs: pair.bootMs,
      workloadMs,
      idealBytes: ideal.ideal,
      idealCounts: ideal.counts,
      rows,
    };
  } finally {
    await pair.stop();
  }
}

// send and receive run as installed (dist/), not through tsx, so that their memory is theirs.
await run("npm", ["run", "-s", "build"]);
const sizes: SizeFigures[] = [];
for (const sizeGiB of sizesGiB) sizes.push(await measureSize(sizeGiB));

const failures = sizes.flatMap((s) =>
  s.rows.flatMap((r) => [
    ...(r.differingNotFree > 0
      ? [`${s.sizeGiB} GiB ${r.row}: ${r.differingNotFree} differing pages are not free`]
      : []),
    ...(r.row === "plain" && r.differing > 0 ? [`${s.sizeGiB} GiB plain: ${r.differing} pages differ`] : []),
  ]),
);

if (values.json) {
  process.stdout.write(reportJson({ kernel, qemu, vcpus, sizes, failures }));
} else {
  const mb = (bytes: number) => `${(bytes / MIB).toFixed(0)} MiB`;
  const s1 = (ms: number) => `${(ms / 1000).toFixed(1)} s`;
  const mbOrDash = (x: number | null) => (x === null ? "-" : `${x.toFixed(0)} MB`);
  const lines = sizes.flatMap((s) => {
    const plain = s.rows.find((r) => r.row === "plain");
    return s.rows.map((r) => [
      `${s.sizeGiB} GiB`,
      r.row,
      `${mb(r.bytes)}${plain && r !== plain ? ` (${(r.bytes / plain.bytes).toFixed(2)}x)` : ""}`,
      `${s1(r.loadedMs)}${plain && r !== plain ? ` (${(r.loadedMs / plain.loadedMs).toFixed(2)}x)` : ""}`,
      `${Math.round(r.pauseMs)} ms`,
      `${r.differing}/${r.differingNotFree}${r.verified === null ? "" : ", verify ok"}`,
      `${mbOrDash(r.sendPeakRssMB)} / ${mbOrDash(r.receivePeakRssMB)}`,
      r.judgeMs === null ? "-" : `${Math.round(r.judgeMs / s.sizeGiB)} ms`,
    ]);
  });
  process.stdout.write(
    `${table(
      [
        "guest",
        "row",
        "bytes (vs plain)",
        "loaded (vs plain)",
        "pause",
        "differ/not free",
        "send/receive RSS",
        "judge per GiB",
      ],
      lines,
    )}\n`,
  );
  const notes = sizes.map(
    (s) =>
      `${s.sizeGiB} GiB: boot ${s1(s.bootMs)}, workload ${s1(s.workloadMs)}, ideal ${mb(s.idealBytes)} ${s.idealCounts}`,
  );
  for (const note of notes) process.stdout.write(`${wrap(note, REPORT_WIDTH).join("\n")}\n`);
  process.stdout.write(
    `${wrap(`peak RSS target: ${PEAK_RSS_TARGET_MB} MB each; oracle failures: ${failures.length === 0 ? "none" : failures.join("; ")}`, REPORT_WIDTH).join("\n")}\n`,
  );
}
if (values.report) {
  // Loaded here: vega takes about half a second to load.
  const { htmlReport } = await import("../src/report/html-report.ts");
  for (const s of sizes) {
    const path = reportPath(values.report, s.sizeGiB);
    await writeFile(path, await htmlReport(scaleReportModel(s)));
    log(`bench:scale: wrote ${path}`);
  }
}
if (failures.length > 0) process.exitCode = 1;
