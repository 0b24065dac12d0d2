/**
 * The PostgreSQL guest (src/lab/debian-guest.ts: Debian 12, systemd, PostgreSQL 15; 2 GiB, 2 vCPUs) migrated live
 * while pgbench drives it from inside, by plain QEMU and by vmprune. Not a test.
 *
 *   npm run bench:postgres -- [--qemu 10.0] [--runs 1] [--link] [--rate-mbit 1000] [--disk qcow2|raw]
 *                              [--rows NAME,NAME] [--json]
 *
 * Without --link the migration runs on loopback (QEMU's max-bandwidth 8 GiB/s, LOOPBACK_PARAMETERS); with --link
 * it crosses the 1 Gbit/s link of bench/link.ts (src/lab/shaped-link.ts: two network namespaces, a veth pair
 * shaped with tbf): this process creates the link and re-runs itself inside its src namespace, the destination
 * QEMU and vmprune receive run in the dst namespace, max-bandwidth 10 Gbit/s so that the link limits.
 * Each run of each row boots a fresh pair (the system disk a qcow2 overlay over the cached image, shared by both
 * QEMUs; with --disk raw a sparse raw copy of it), reads the database into the page cache, starts pgbench (4 clients, 2 threads, progress every second)
 * and migrates once it has run BEFORE_S seconds. Rows:
 *   plain               source QEMU → destination QEMU;
 *   vmprune free        source QEMU → vmprune send --drop free (in this process) → destination QEMU;
 *   vmprune free+cache  source QEMU → vmprune send --drop free,cache (this process; the disk read through the
 *                       source QEMU's NBD export, or the raw copy itself) → vmprune receive (a process on the
 *                       destination's side, the overlay read through qemu-nbd, or the raw copy) → destination QEMU.
 * Figures, medians over --runs:
 *   bytes          what reached the destination's side: QEMU's ram.transferred for plain, what the relay wrote
 *                  towards the destination for vmprune; with --link also the frames that crossed the link;
 *   to resume      `migrate` to the destination's RESUME (total time − downtime + guest pause);
 *   guest pause    the source's STOP to the destination's RESUME (QMP events, one host clock);
 *   tps            pgbench's per-second rate before the migration, during it (from `migrate` to the guest
 *                  running on the destination, on the guest's clock) and after it, to pgbench's end;
 *   failed         pgbench's failed transactions (must be 0: the run is an error otherwise).
 *
 * Logs go to stderr; stdout gets the table, or with --json the figures.
 */

import { join } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import { parseArgs } from "node:util";
import { DEBIAN_GUEST_KERNEL, ensureDebianGuest } from "../src/lab/debian-guest.ts";
import { warmDatabaseCommand } from "../src/lab/debian-system.ts";
import { LabPair } from "../src/lab/lab-vm.ts";
import {
  guestClockS,
  pgbenchRun,
  startPgbenchCommand,
  type TpsPhases,
  tpsPhases,
  waitPgbench,
  waitPgbenchProgress,
} from "../src/lab/pgbench.ts";
import { ensureQemu, type QemuVersion } from "../src/lab/qemu-binaries.ts";
import { type LinkDescription, measureRateOf, txBytesOf } from "../src/lab/shaped-link.ts";
import { sweepStaleRuns } from "../src/lab/vm.ts";
import {
  guestPause,
  LOOPBACK_PARAMETERS,
  type MigrationResult,
  prepareIncoming,
  runMigration,
  tcpAddress,
  waitDestinationState,
} from "../src/qemu/migration.ts";
import { REPORT_WIDTH, table, wrap } from "../src/report/table.ts";
import { reportJson } from "../src/report/version.ts";
import { LAB_OPTIONS, labTarget, median, requireSetup } from "./common.ts";
import { linkOfThisProcess, runBehindLink } from "./linked-run.ts";
import { migrateThroughInProcessSend, migrateThroughSendAndReceive } from "./send-run.ts";

const MEMORY_MIB = 2048;
const VCPUS = 2;
/** pgbench seconds before the migration starts, and its whole run (the migration and a rate after it fit in). */
const BEFORE_S = 15;
const PGBENCH_S = 120;
/** 10 Gbit/s in bytes per second: far above the 1 Gbit/s link, so the link limits (as bench/link.ts). */
const LINK_MAX_BANDWIDTH = 1_250_000_000;
const log = (line: string) => process.stderr.write(`${line}\n`);

export const ROW_NAMES = ["plain", "vmprune free", "vmprune free+cache"] as const;
export type RowName = (typeof ROW_NAMES)[number];
const isRowName = (name: string): name is RowName => (ROW_NAMES as readonly string[]).includes(name);
/** The system disk of each pair: a qcow2 overlay over the cached image (default), or a sparse raw copy. */
type DiskFormat = "qcow2" | "raw";
const isDiskFormat = (name: string): name is DiskFormat => name === "qcow2" || name === "raw";

export interface RunFigures {
  /** What reached the destination's side (QEMU's ram.transferred, or the relay's bytes towards it). */
  streamBytes: number;
  /** With --link: the frames the src end of the link sent during the migration. */
  linkBytes?: number;
  totalTimeMs: number;
  downtimeMs: number;
  guestPauseMs: number;
  toResumeMs: number;
  tpsBefore: number;
  tpsDuring: number;
  tpsAfter: number;
  /** pgbench's transactions in the whole run, and the failed ones. */
  transactions: number;
  failed: number;
  prunedPages?: number;
  cacheRefs?: number;
}

/** Where the migration goes: the destination's address and QEMU's bandwidth cap for it. */
interface Route {
  link?: LinkDescription;
  diskFormat: DiskFormat;
  dstHost: string;
  parameters: Record<string, unknown>;
}

type RowMigration = {
  result: MigrationResult;
  streamBytes: number;
  prunedPages?: number;
  cacheRefs?: number;
};

async function migratePlain(pair: LabPair, route: Route): Promise<RowMigration> {
  const dst = await pair.startDestination();
  const uri = await prepareIncoming(dst.monitor, { incomingUri: `tcp:${route.dstHost}:0` });
  const result = await runMigration(pair.src.monitor, uri, { parameters: route.parameters });
  await waitDestinationState(dst.monitor, "running");
  return { result, streamBytes: result.info.ram?.transferred ?? 0 };
}

async function migrateVmpruneFree(pair: LabPair, route: Route): Promise<RowMigration> {
  const dst = await pair.startDestination();
  const uri = await prepareIncoming(dst.monitor, { incomingUri: `tcp:${route.dstHost}:0` });
  const run = await migrateThroughInProcessSend(pair, dst, {
    listen: { host: "127.0.0.1" },
    to: { host: route.dstHost, port: tcpAddress(uri).port },
    drop: ["free"],
    parameters: route.parameters,
  });
  return { result: run.result, streamBytes: run.wireBytes, prunedPages: run.prunedPages };
}

/**
 * qcow2: send finds cache pages through the source QEMU's read-only NBD export of the system disk (no --disk);
 * receive, a process on the destination's side, reads the same overlay through qemu-nbd. raw: both read the copy.
 */
async function migrateVmpruneFreeCache(pair: LabPair, route: Route): Promise<RowMigration> {
  const dst = await pair.startDestination();
  const uri = await prepareIncoming(dst.monitor, { incomingUri: "tcp:127.0.0.1:0" });
  const raw = join(pair.diskDir, "data.img");
  const run = await migrateThroughSendAndReceive(pair, dst, {
    ...(route.link ? { netns: route.link.dstNetns } : {}),
    listenHost: route.dstHost,
    destination: `127.0.0.1:${tcpAddress(uri).port}`,
    receiveDisk: route.diskFormat === "raw" ? raw : `qcow2:${join(pair.diskDir, "data.qcow2")}`,
    send: {
      listen: { host: "127.0.0.1" },
      drop: ["free", "cache"],
      parameters: route.parameters,
      ...(route.diskFormat === "raw" ? { disk: raw } : {}),
    },
    log,
  });
  return {
    result: run.result,
    streamBytes: run.wireBytes,
    prunedPages: run.prunedPages,
    cacheRefs: run.refsResolved,
  };
}

const MIGRATORS: Record<RowName, (pair: LabPair, route: Route) => Promise<RowMigration>> = {
  plain: migratePlain,
  "vmprune free": migrateVmpruneFree,
  "vmprune free+cache": migrateVmpruneFreeCache,
};

let accelUsed = "";

async function runOnce(row: RowName, qemu: QemuVersion, route: Route): Promise<RunFigures> {
  const pair = await LabPair.boot({
    guest: "debian",
    kernel: DEBIAN_GUEST_KERNEL,
    qemu,
    memoryMiB: MEMORY_MIB,
    vcpus: VCPUS,
    storage: { format: route.diskFormat },
    ...(route.link ? { netns: { src: route.link.srcNetns, dst: route.link.dstNetns } } : {}),
  });
  accelUsed = pair.accel;
  try {
    log(
      `  ${row}: booted in ${Math.round(pair.bootMs)} ms; ${(await pair.src.agent.run(warmDatabaseCommand(), 300_000)).replace(/\s+/g, " ")}`,
    );
    await pair.src.agent.run(startPgbenchCommand(pgbenchRun(PGBENCH_S)), 30_000);
    await waitPgbenchProgress(pair.src.agent, BEFORE_S, 120_000);
    const before = route.link ? await txBytesOf(route.link) : undefined;
    const startedS = await guestClockS(pair.src.agent);
    const startedAtMs = Date.now();
    const migration = await MIGRATORS[row](pair, route);
    const after = route.link ? await txBytesOf(route.link) : undefined;
    const dst = pair.dst;
    if (!dst) throw new Error("no destination after the migration");
    const resumedS = await guestClockS(dst.agent);
    const pause = await guestPause(pair.src.monitor, dst.monitor, startedAtMs);
    const pauseMs = pause.resumedAtMs - pause.stoppedAtMs;
    const info = migration.result.info;
    const run = await waitPgbench(dst.agent, (PGBENCH_S + 120) * 1000);
    if (run.exitStatus !== 0 || !run.summary || run.errors.length > 0)
      throw new Error(
        `${row}: pgbench did not run to its end (${run.exitStatus}): ${run.errors.join(" | ")}`,
      );
    const phases: TpsPhases = tpsPhases(run.progress, startedS, resumedS);
    return {
      streamBytes: migration.streamBytes,
      ...(before && after ? { linkBytes: after.toDst - before.toDst } : {}),
      totalTimeMs: info["total-time"] ?? Math.round(migration.result.wallMs),
      downtimeMs: info.downtime ?? 0,
      guestPauseMs: pauseMs,
      toResumeMs: (info["total-time"] ?? migration.result.wallMs) - (info.downtime ?? 0) + pauseMs,
      tpsBefore: phases.before.meanTps,
      tpsDuring: phases.during.meanTps,
      tpsAfter: phases.after.meanTps,
      transactions: run.summary.transactions,
      failed: run.summary.failed,
      ...(migration.prunedPages !== undefined ? { prunedPages: migration.prunedPages } : {}),
      ...(migration.cacheRefs !== undefined ? { cacheRefs: migration.cacheRefs } : {}),
    };
  } finally {
    await pair.stop();
  }
}

export interface RowResult {
  row: RowName;
  runs: RunFigures[];
  median: RunFigures;
}

export interface PostgresBenchResult {
  qemu: QemuVersion;
  accel: string;
  memoryMiB: number;
  vcpus: number;
  route: "loopback" | "link";
  diskFormat: DiskFormat;
  link?: LinkDescription & { measuredGbitPerSecond: number };
  build: { buildMs: number; imageBytes: number; allocatedBytes: number };
  runs: number;
  rows: RowResult[];
}

export function medianFigures(list: readonly RunFigures[]): RunFigures {
  const m = (key: keyof RunFigures) => median(list.flatMap((r) => (r[key] === undefined ? [] : [r[key]])));
  const figures: RunFigures = {
    streamBytes: m("streamBytes"),
    totalTimeMs: m("totalTimeMs"),
    downtimeMs: m("downtimeMs"),
    guestPauseMs: m("guestPauseMs"),
    toResumeMs: m("toResumeMs"),
    tpsBefore: m("tpsBefore"),
    tpsDuring: m("tpsDuring"),
    tpsAfter: m("tpsAfter"),
    transactions: m("transactions"),
    failed: Math.max(...list.map((r) => r.failed)),
  };
  for (const key of ["linkBytes", "prunedPages", "cacheRefs"] as const)
    if (list.some((r) => r[key] !== undefined)) figures[key] = m(key);
  return figures;
}

async function benchPostgres(options: {
  qemu: QemuVersion;
  runs: number;
  rows: readonly RowName[];
  diskFormat: DiskFormat;
  link?: LinkDescription;
}): Promise<PostgresBenchResult> {
  const image = await ensureDebianGuest();
  const measured = options.link ? await measureRateOf(options.link) : undefined;
  if (options.link && measured)
    log(
      `link ${options.link.srcIp} → ${options.link.dstIp}: measured ${measured.gbitPerSecond.toFixed(3)} Gbit/s`,
    );
  const route: Route = options.link
    ? {
        link: options.link,
        diskFormat: options.diskFormat,
        dstHost: options.link.dstIp,
        parameters: { "max-bandwidth": LINK_MAX_BANDWIDTH },
      }
    : { diskFormat: options.diskFormat, dstHost: "127.0.0.1", parameters: LOOPBACK_PARAMETERS };
  const runs = new Map<RowName, RunFigures[]>(options.rows.map((r) => [r, []]));
  for (let i = 0; i < options.runs; i++) {
    for (const row of options.rows) {
      const f = await runOnce(row, options.qemu, route);
      runs.get(row)?.push(f);
      log(
        `run ${i + 1}/${options.runs} ${row}: ${f.streamBytes} B${f.linkBytes !== undefined ? ` (link ${f.linkBytes} B)` : ""}, ` +
          `${Math.round(f.toResumeMs)} ms to resume, paused ${Math.round(f.guestPauseMs)} ms, tps ` +
          `${f.tpsBefore.toFixed(1)} / ${f.tpsDuring.toFixed(1)} / ${f.tpsAfter.toFixed(1)}, ` +
          `${f.transactions} transactions, ${f.failed} failed`,
      );
    }
  }
  return {
    qemu: options.qemu,
    accel: accelUsed,
    memoryMiB: MEMORY_MIB,
    vcpus: VCPUS,
    route: options.link ? "link" : "loopback",
    diskFormat: options.diskFormat,
    ...(options.link && measured
      ? { link: { ...options.link, measuredGbitPerSecond: measured.gbitPerSecond } }
      : {}),
    build: image.build,
    runs: options.runs,
    rows: options.rows.map((row) => {
      const list = runs.get(row) ?? [];
      return { row, runs: list, median: medianFigures(list) };
    }),
  };
}

export function formatTable(result: PostgresBenchResult): string {
  const mib = (bytes: number | undefined) => (bytes === undefined ? "-" : (bytes / (1 << 20)).toFixed(1));
  const seconds = (ms: number) => (ms / 1000).toFixed(2);
  const plain = result.rows.find((r) => r.row === "plain")?.median;
  const ratio = (x: number, base: number | undefined) => (base ? (x / base).toFixed(3) : "-");
  const lines = result.rows.map((r) => {
    const m = r.median;
    return [
      r.row,
      mib(m.streamBytes),
      ratio(m.streamBytes, plain?.streamBytes),
      mib(m.linkBytes),
      seconds(m.toResumeMs),
      ratio(m.toResumeMs, plain?.toResumeMs),
      String(Math.round(m.guestPauseMs)),
      m.tpsBefore.toFixed(1),
      m.tpsDuring.toFixed(1),
      m.tpsAfter.toFixed(1),
      String(m.failed),
    ];
  });
  const where =
    result.route === "link" && result.link
      ? `over a ${result.link.rateMbit} Mbit/s link (veth + tbf, measured ${result.link.measuredGbitPerSecond.toFixed(3)} Gbit/s)`
      : "on loopback";
  const head = [
    `PostgreSQL guest (Debian 12, PostgreSQL 15, kernel ${DEBIAN_GUEST_KERNEL}, ${result.diskFormat} system ` +
      `disk), ${result.memoryMiB} MiB, ` +
      `${result.vcpus} vCPUs, QEMU ${result.qemu} (${result.accel}), migrated ${where} while pgbench runs ` +
      `(4 clients); medians of ${result.runs} run(s) per row. Image: ${mib(result.build.allocatedBytes)} MiB ` +
      `allocated (${mib(result.build.imageBytes)} MiB nominal), built in ${seconds(result.build.buildMs)} s.`,
  ];
  const notes = [
    "bytes: what reached the destination's side (QEMU's ram.transferred, or what vmprune's relay wrote towards " +
      "it); link: frames that crossed the link; to resume: `migrate` to the destination's RESUME; pause: the " +
      "source's STOP to the destination's RESUME; tps: pgbench's mean per-second rate before the migration, " +
      "during it (until the guest ran on the destination, guest clock) and after it; failed: pgbench's failed " +
      "transactions.",
  ];
  return [
    ...head.flatMap((t) => wrap(t, REPORT_WIDTH)),
    "",
    table(
      [
        "",
        "MiB",
        "/plain",
        "link MiB",
        "resume s",
        "/plain",
        "pause ms",
        "tps before",
        "during",
        "after",
        "failed",
      ],
      lines,
    ),
    "",
    ...notes.flatMap((t) => wrap(t, REPORT_WIDTH)),
  ].join("\n");
}

async function main(argv: string[]): Promise<void> {
  const usage =
    "usage: bench/postgres.ts [--qemu 7.2|10.0] [--runs 1] [--link] [--rate-mbit 1000] [--disk qcow2|raw] " +
    "[--rows NAME,NAME] [--json]";
  const { values } = parseArgs({
    args: argv,
    options: {
      qemu: LAB_OPTIONS.qemu,
      runs: { type: "string", default: "1" },
      link: { type: "boolean", default: false },
      "rate-mbit": { type: "string", default: "1000" },
      disk: { type: "string", default: "qcow2" },
      rows: { type: "string" },
      json: { type: "boolean", default: false },
    },
  });
  const { qemu, runs } = labTarget(
    { kernel: DEBIAN_GUEST_KERNEL, qemu: values.qemu, runs: values.runs },
    usage,
  );
  const rows = values.rows?.split(",").map((name) => name.trim()) ?? [...ROW_NAMES];
  const unknown = rows.find((name) => !isRowName(name));
  if (unknown !== undefined)
    throw new Error(`unknown row ${unknown}: rows are ${ROW_NAMES.join(", ")} (${usage})`);
  const diskFormat = values.disk;
  if (!isDiskFormat(diskFormat)) throw new Error(`--disk is qcow2 or raw, not ${diskFormat} (${usage})`);
  const rateMbit = Number(values["rate-mbit"]);
  if (!(rateMbit > 0)) throw new Error(`--rate-mbit needs a positive number (${usage})`);
  requireSetup("bench:postgres", {
    qemu: [qemu],
    commands: ["mmdebstrap", "qemu-img", "qemu-nbd", ...(values.link ? ["ip", "tc"] : [])],
    root: values.link,
  });
  const link = await linkOfThisProcess();
  if (values.link && !link) {
    process.exitCode = await runBehindLink({
      file: fileURLToPath(import.meta.url),
      argv,
      rateMbit,
      prepare: () => Promise.all([ensureQemu(qemu), ensureDebianGuest()]),
      log,
    });
    return;
  }
  sweepStaleRuns();
  const result = await benchPostgres({
    qemu,
    runs,
    rows: rows.filter(isRowName),
    diskFormat,
    ...(link ? { link } : {}),
  });
  process.stdout.write(values.json ? reportJson(result) : `${formatTable(result)}\n`);
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  main(process.argv.slice(2)).catch((error: unknown) => {
    process.stderr.write(`${error instanceof Error ? error.stack : String(error)}\n`);
    process.exitCode = 1;
  });
}
