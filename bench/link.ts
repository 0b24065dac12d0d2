/**
 * One guest and workload, migrated over an emulated 1 Gbit/s link by plain QEMU, QEMU's own options and
 * vmprune, against the ideal and the link's floor. Not a test.
 *
 *   npm run bench:link -- [--kernel 6.1|6.12] [--qemu 7.2|10.0] [--runs 3] [--rate-mbit 1000] [--json]
 *                         [--report FILE.html] [--destination-ram on-demand|preallocated]
 *
 * The link (src/lab/shaped-link.ts): two network namespaces, `vmprune-<pid>-src-*` and `vmprune-<pid>-dst-*`,
 * joined by a veth pair shaped with tbf to 1 Gbit/s on both ends, 10.77.0.1/30 (src) and 10.77.0.2/30 (dst).
 * Where everything runs:
 *   src namespace   the source QEMU, vmprune send (startSend, in this process) and this benchmark itself: the
 *                   process re-runs itself inside the src namespace (`ip netns exec`) after creating the link,
 *                   so the relay's sockets are on the source side of the link; the outer process only creates
 *                   the link, waits, and deletes it (also when the inner one fails or is interrupted);
 *   dst namespace   the destination QEMU, listening on 10.77.0.2 (and, once it exists, vmprune receive).
 * QMP and agent sockets are files, so VM control works across namespaces. Nothing is configured outside the
 * two namespaces, and nothing but the link's two addresses is ever contacted.
 *
 * The hops on one host (source QEMU → send, receive → destination QEMU) are unix sockets, as `vmprune migrate` and
 * the libvirt integration lay them out. With loopback TCP there instead, each hop's kernel buffers (several MB,
 * autotuned) held bytes neither QEMU nor the relay counts, and a burst from receive's side met a destination QEMU
 * busy loading: free+cache's guest pause on anon was 145-460 ms (10 runs), against 166-255 ms (5 runs) with unix
 * sockets, plain QEMU 102-182 ms.
 * Destinations' guest RAM is anonymous memory (VmConfig.anonymousRam), as production guests have it; the source's
 * is the lab's /dev/shm file, which send reads. With a /dev/shm file at the destination too, a read of an untouched
 * page allocates and clears it, and QEMU reads every page a ZERO record names: half of the destination QEMU's CPU
 * (perf, cache-heavy free+cache), and free+cache's pause there was 321-412 ms against 136-181 ms with anonymous RAM.
 * `--destination-ram preallocated` has the destinations clear all their RAM when they start, before `migrate`,
 * instead of on each page's first write during it. On this lab's host that clearing is slow and uneven
 * (VmConfig.preallocateRam), so the default (on-demand, as QEMU runs unless told otherwise) measures the host as
 * much as the pipeline; preallocated compares pipelines.
 * A 512 MiB lab guest (1 vCPU) runs the mixed workload (src/lab/workloads.ts); a fresh pair per migration, rows
 * alternating within each run. Migration `max-bandwidth` is 10 Gbit/s, so the link, not QEMU's cap, limits.
 * Rows:
 *   plain            source QEMU → destination QEMU;
 *   free-page-hint   both with virtio-balloon free-page-hint=on (LabPair `balloon`);
 *   xbzrle           capability xbzrle on both ends, QEMU's default cache size;
 *   multifd          capability multifd on both ends, 2 channels (libvirt's --parallel default), no compression;
 *   multifd+zstd     capability multifd on both ends, multifd-compression zstd (zlib, labelled, if this QEMU
 *                    lacks zstd), multifd-channels 2 (QEMU 8.0+ only);
 *   vmprune free     source QEMU → vmprune send --drop free (a unix socket in the pair's folder, src namespace)
 *                    → the link → destination QEMU;
 *   vmprune free multifd  the same with multifd on (2 channels): free pages pruned on the multifd channels
 *                    (moved to the packets' zero lists; QEMU 9.0+);
 *   vmprune free+cache  source QEMU → vmprune send --drop free,cache (src namespace) → the link → vmprune receive
 *                    (a process in the dst namespace, rebuilding cache pages from the shared disk) → destination QEMU
 *                    (`-incoming unix:`);
 *   vmprune free+cache refs always  the same with `--refs-when always`: every placeable cache page a reference,
 *                    whether or not bytes queue for the link (send's default, link-busy, sends them whole while
 *                    the link has room);
 *   vmprune free+cache multifd  the same with multifd on (2 channels): free pages moved to the packets' zero
 *                    lists, cache pages inside packets as references (link 1.3);
 *   ideal            bytes of the guest's RAM pages that are neither free, nor clean page cache, nor all zero,
 *                    from a classification of the source (classifyGuest on its RAM file, guest paused for it)
 *                    right before each migration; the median over every run of every row.
 * Figures per row are medians over --runs of:
 *   link bytes       frames the src end of the veth sent during the migration (src → dst): every byte that
 *                    crossed the link, for every row the same way (multifd channels and compression included);
 *   stream bytes     QEMU's ram.transferred (vmprune: what the relay wrote to the destination);
 *   total time, downtime  as the source QEMU's query-migrate reports them. With a relay between, QEMU's
 *                    figures end when the source wrote its last byte into the relay, not when the destination
 *                    runs, so two more, from both QEMUs' QMP events (one host clock):
 *   guest pause      the source's STOP to the destination's RESUME: the downtime the guest lived through;
 *   to resume        `migrate` to the destination's RESUME (total time − downtime + guest pause);
 *   send prep        vmprune rows: startSend's work before `migrate` (disk index, opening introspection);
 *   QEMU waited      vmprune rows: how long send left the source QEMU's stream unread because the link (or receive
 *                    behind it) held the relay's bound, or receive's settling of references held the link's window
 *                    (stream/relay.ts sourceHeldMs): the destination side's share of the pace;
 *   receive waited   rows with receive: how long it left the link unread because the destination QEMU held its
 *                    bound: the destination QEMU's share (both run at once when the destination holds up the link);
 *   host CPU         the host's busy CPU time (/proc/stat, summed over its cores) from `migrate` to RESUME: both
 *                    hosts' work, since both are this machine; "destination side" is the destination QEMU's and
 *                    receive's part of it, "destination QEMU" the destination QEMU's own (loading the stream, most
 *                    of it the kernel clearing the pages it lands in), "/ cores" the least time the cores needed
 *                    for it all (a row cannot resume sooner than the larger of that and the floor);
 *   operator wait    from the start of the command to the destination's RESUME: send prep + to resume for
 *                    vmprune, to resume for QEMU's own rows (their command is `migrate`). What an operator
 *                    waits for; vmprune receive, like the destination's `-incoming`, is started beforehand.
 *   / floor          time to resume over the floor: the ideal bytes at the link's measured rate (the slower of
 *                    the measurements before and after), the least time any migration can take.
 * Workloads (--workload): mixed (default), cache-heavy, idle-after-work (the papers' kind of guest: it read
 * ~150 MiB of files and used and freed ~200 MiB, then went quiet) and anon (nothing dispensable).
 * Goals (issue 12), per workload, on the medians (GOAL_NAMES, goalApplies): guest pause no longer than plain's
 * and link bytes within 10% of the ideal everywhere; mixed and cache-heavy: vmprune free+cache resumes within
 * 1.2 x the floor; idle-after-work: vmprune resumes 75% sooner than plain and sends 92% fewer bytes; anon:
 * vmprune resumes at most 3% later than plain. After each migration the destination must run and pass `verify`.
 * With VMPRUNE_BENCH_TRACE=1 in the environment, each migration also logs the link's use every 50 ms, the host's
 * CPU from `migrate` to RESUME (busy cores; source and destination QEMU, send and receive each with its main
 * thread apart, as the rest of a Node process is V8's compiler and collector threads; src/lab/host-cpu.ts), and
 * vmprune rows send's judging (pages, batches, time in the judge, references).
 *
 * Logs go to stderr; stdout gets the table, or with --json the figures.
 */

import { execFileSync } from "node:child_process";
import { readFileSync } from "node:fs";
import { writeFile } from "node:fs/promises";
import { availableParallelism } from "node:os";
import { join } from "node:path";
import { performance } from "node:perf_hooks";
import { fileURLToPath, pathToFileURL } from "node:url";
import { parseArgs } from "node:util";
import { guestBalloon } from "../src/lab/balloon.ts";
import { ensureGuestImage } from "../src/lab/guest-image.ts";
import { CpuSampler, ownCpuMs, processCpuMs, threadCpuMs } from "../src/lab/host-cpu.ts";
import type { KernelId } from "../src/lab/kernels.ts";
import { LabPair } from "../src/lab/lab-vm.ts";
import { ensureQemu, type QemuVersion } from "../src/lab/qemu-binaries.ts";
import {
  type LinkDescription,
  measureRateOf,
  type RateMeasurement,
  SRC_IFNAME,
  txBytesOf,
} from "../src/lab/shaped-link.ts";
import { sweepStaleRuns } from "../src/lab/vm.ts";
import {
  ANON_512M,
  CACHE_HEAVY_512M,
  guestMeminfo,
  IDLE_AFTER_WORK_512M,
  MIXED_512M,
  type MixedWorkloadSizes,
  runMixedWorkload,
} from "../src/lab/workloads.ts";
import type { RefsWhen } from "../src/migrate/link-send.ts";
import type { PruneReport } from "../src/prune/pruning-processor.ts";
import {
  guestPause,
  type MigrationResult,
  prepareIncoming,
  runMigration,
  tcpAddress,
  waitDestinationState,
} from "../src/qemu/migration.ts";
import { pageTrafficOf } from "../src/report/page-traffic.ts";
import {
  type MigrationReportModel,
  PAGE_TRAFFIC_CATEGORIES,
  type PageTrafficBytes,
  type ThroughputSample,
} from "../src/report/report-model.ts";
import { REPORT_WIDTH, table, wrap } from "../src/report/table.ts";
import { DEFAULT_SAMPLE_INTERVAL_MS, ThroughputSampler } from "../src/report/throughput-sampler.ts";
import { reportJson } from "../src/report/version.ts";
import { LAB_OPTIONS, labTarget, median, requireSetup } from "./common.ts";
import { idealBytes } from "./ideal.ts";
import { linkOfThisProcess, runBehindLink } from "./linked-run.ts";
import { migrateThroughInProcessSend, migrateThroughSendAndReceive, type SendRun } from "./send-run.ts";

const MEMORY_MIB = 512;
/**
 * The guests this benchmark can migrate: the mixed guest, the page-cache-heavy one, the papers' kind of guest
 * (it read and freed a lot, then went quiet), and one with nothing dispensable (vmprune's pure overhead).
 */
const WORKLOADS = {
  mixed: MIXED_512M,
  "cache-heavy": CACHE_HEAVY_512M,
  "idle-after-work": IDLE_AFTER_WORK_512M,
  anon: ANON_512M,
} as const satisfies Record<string, MixedWorkloadSizes>;
export type WorkloadName = keyof typeof WORKLOADS;
const isWorkloadName = (name: string): name is WorkloadName => Object.hasOwn(WORKLOADS, name);
/** 10 Gbit/s in bytes per second: far above the link, so the link limits (QEMU's default is 128 MiB/s). */
const MAX_BANDWIDTH = 1_250_000_000;
const log = (line: string) => process.stderr.write(`${line}\n`);

/** What one migration of one row measured. */
export interface RunFigures {
  linkBytes: number;
  /** The dst → src direction (return path, TCP acknowledgements). */
  linkReturnBytes: number;
  streamBytes: number;
  totalTimeMs: number;
  downtimeMs: number;
  /** The source's STOP to the destination's RESUME (QMP event timestamps, one host clock): the pause the guest
   *  lived through, relay and link included. */
  guestPauseMs: number;
  /**
   * `migrate` on the source to the destination's RESUME: total time − downtime + guest pause (QEMU's total time
   * runs from `migrate` to the source's end, its downtime from STOP to that end). vmprune's preparation before
   * `migrate` (disk index, introspection) is not in it, as QEMU's setup before `migrate` is not either.
   */
  toResumeMs: number;
  /** Ideal bytes of this run's guest (see idealBytes). */
  idealBytes: number;
  /** Pages neither free nor zero (what dropping free pages alone could reach), in bytes. */
  idealFreeOnlyBytes: number;
  freePages: number;
  /** vmprune rows: PAGE records turned into ZERO records. */
  prunedPages?: number;
  /**
   * vmprune rows: send's preparation before `migrate` (disk index, opening the guest's introspection), which
   * `toResumeMs` leaves out; an operator waits for it too.
   */
  prepMs?: number;
  /** From the start of the command to the destination's RESUME: prepMs (0 for QEMU's own rows) + toResumeMs. */
  operatorWaitMs: number;
  /**
   * vmprune rows: how long send left the source QEMU's stream unread because the link (or receive behind it) held
   * the relay's bound, or receive had not yet settled the references of the link's window: the time the destination
   * side, not QEMU and send, set the pace. (send's log gives the window's share.)
   */
  sourceHeldMs?: number;
  /** vmprune rows with receive: how long receive left the link unread because the destination QEMU held its bound. */
  receiveHeldMs?: number;
  /**
   * The host's CPU from `migrate` to the destination's RESUME (ms summed over its cores, /proc/stat busy): with
   * both hosts on one machine, the work of both QEMUs, vmprune and the kernel's network stack, which these cores
   * had to do within the time to resume.
   */
  hostCpuMs?: number;
  /**
   * Of it, the destination side's (destination QEMU and receive): what a destination host does to take the guest
   * in, whatever the link. Most of the destination QEMU's is the kernel zeroing the anonymous memory pages land
   * in: perf on a plain cache-heavy run's destination QEMU found 57% of its CPU in clear_page under
   * do_huge_pmd_anonymous_page one day, 87% another (QEMU asks for transparent huge pages, so a page's first write
   * zeroes its 2 MiB).
   */
  destinationCpuMs?: number;
  /**
   * Of that, the destination QEMU's own: loading the stream, most of it the kernel clearing the pages it lands in
   * (see VmConfig.preallocateRam for how slow and uneven that is on this lab's host).
   */
  destinationQemuCpuMs?: number;
  /** Guest pages by how they travelled (QEMU's page counters, send's pruning), for the HTML report. */
  pageBytes?: PageTrafficBytes;
  /** The src end of the veth's tx bytes per interval, ms from `migrate`, for the HTML report. */
  throughput?: ThroughputSample[];
  /** The source's STOP and the destination's RESUME in ms from `migrate`. */
  pause?: { fromMs: number; toMs: number };
}

/** Everything a row's migration gets: the booted pair (workload done) and the link it must cross. */
export interface RowContext {
  pair: LabPair;
  link: LinkDescription;
  qemu: QemuVersion;
  /** A row that runs `vmprune receive` says its PID here, for the CPU trace. */
  onReceiveStarted?: (pid: number) => void;
}

/** A row's migration: from the source of `ctx.pair` to a destination it starts in the dst namespace. */
export type RowMigrator = (ctx: RowContext) => Promise<
  Pick<RunFigures, "streamBytes" | "prunedPages" | "prepMs"> & {
    result: MigrationResult;
    /** vmprune rows: send's pruning report. */
    prune?: PruneReport;
  } & Pick<RunFigures, "sourceHeldMs" | "receiveHeldMs">
>;

interface RowSpec {
  name: string;
  balloon?: "free-page-hint";
  migrate: RowMigrator;
}

/** Source QEMU straight to a destination QEMU in the dst namespace, with capabilities and parameters on both. */
async function migrateDirect(
  ctx: RowContext,
  capabilities: Record<string, boolean> = {},
  parameters: Record<string, unknown> = {},
): Promise<{ streamBytes: number; result: MigrationResult }> {
  const dst = await ctx.pair.startDestination();
  const uri = await prepareIncoming(dst.monitor, {
    incomingUri: `tcp:${ctx.link.dstIp}:0`,
    capabilities,
    ...(Object.keys(parameters).length > 0 ? { parameters } : {}),
  });
  const result = await runMigration(ctx.pair.src.monitor, uri, {
    capabilities,
    parameters: { "max-bandwidth": MAX_BANDWIDTH, ...parameters },
  });
  await waitDestinationState(dst.monitor, "running");
  return { streamBytes: result.info.ram?.transferred ?? 0, result };
}

/** multifd channels of the multifd rows: libvirt's default for --parallel (qemu_migration_params.c). */
const MULTIFD_CHANNELS = 2;

/** multifd's compression: zstd when this QEMU has it (probed once per process on a destination), else zlib. */
let multifdCompression: "zstd" | "zlib" | undefined;

async function migrateMultifd(ctx: RowContext): Promise<{ streamBytes: number; result: MigrationResult }> {
  if (ctx.qemu === "7.2") throw new Error("multifd compression needs QEMU 8.0+: run with --qemu 10.0");
  if (!multifdCompression) {
    const probe = await ctx.pair.startDestination();
    try {
      await probe.monitor.execute("migrate-set-parameters", { "multifd-compression": "zstd" });
      multifdCompression = "zstd";
    } catch (error) {
      log(`multifd-compression zstd refused (${String(error)}): using zlib`);
      multifdCompression = "zlib";
    }
    await probe.stop();
  }
  return migrateDirect(
    ctx,
    { multifd: true },
    { "multifd-compression": multifdCompression, "multifd-channels": MULTIFD_CHANNELS },
  );
}

/** A vmprune row's figures: what the relay wrote towards the destination is its stream. */
function rowFigures(run: SendRun): Awaited<ReturnType<RowMigrator>> {
  return {
    streamBytes: run.wireBytes,
    prunedPages: run.prunedPages,
    prepMs: run.prepMs,
    result: run.result,
    prune: run.prune,
    sourceHeldMs: run.sourceHeldMs,
    ...(run.receiveHeldMs !== undefined ? { receiveHeldMs: run.receiveHeldMs } : {}),
  };
}

/**
 * Source QEMU → vmprune send --drop free (startSend in this process, listening on a unix socket in the pair's
 * folder, judging pages through the source's tool QMP socket) → the link → destination QEMU.
 */
async function migrateVmpruneFree(ctx: RowContext, multifd = false): ReturnType<RowMigrator> {
  const capabilities: Record<string, boolean> = multifd ? { multifd: true } : {};
  const parameters: Record<string, unknown> = multifd ? { "multifd-channels": MULTIFD_CHANNELS } : {};
  const dst = await ctx.pair.startDestination();
  const dstUri = await prepareIncoming(dst.monitor, {
    incomingUri: `tcp:${ctx.link.dstIp}:0`,
    capabilities,
    ...(multifd ? { parameters } : {}),
  });
  const run = await migrateThroughInProcessSend(ctx.pair, dst, {
    listen: { path: join(ctx.pair.diskDir, "send.sock") },
    to: { host: ctx.link.dstIp, port: tcpAddress(dstUri).port },
    drop: ["free"],
    parameters: { "max-bandwidth": MAX_BANDWIDTH, ...parameters },
    capabilities,
  });
  return rowFigures(run);
}

/**
 * Source QEMU → vmprune send --drop free,cache (in this process, src namespace) → the link → `vmprune receive`
 * (a process in the dst namespace: it must sit on the destination's side of the link) → destination QEMU on a
 * unix socket in the pair's folder. Cache pages found on the shared data disk cross the link as references.
 */
async function migrateVmpruneFreeCache(
  ctx: RowContext,
  multifd = false,
  refsWhen: RefsWhen = "link-busy",
): ReturnType<RowMigrator> {
  const capabilities: Record<string, boolean> = multifd ? { multifd: true } : {};
  const parameters: Record<string, unknown> = multifd ? { "multifd-channels": MULTIFD_CHANNELS } : {};
  const dst = await ctx.pair.startDestination();
  const incoming = join(ctx.pair.diskDir, "incoming.sock");
  await prepareIncoming(dst.monitor, {
    incomingUri: `unix:${incoming}`,
    capabilities,
    ...(multifd ? { parameters } : {}),
  });
  const disk = join(ctx.pair.diskDir, "data.img");
  const run = await migrateThroughSendAndReceive(ctx.pair, dst, {
    netns: ctx.link.dstNetns,
    listenHost: ctx.link.dstIp,
    destination: `unix:${incoming}`,
    receiveDisk: disk,
    send: {
      listen: { path: join(ctx.pair.diskDir, "send.sock") },
      drop: ["free", "cache"],
      parameters: { "max-bandwidth": MAX_BANDWIDTH, ...parameters },
      capabilities,
      disk,
      refsWhen,
    },
    log,
    ...(ctx.onReceiveStarted ? { onReceiveStarted: ctx.onReceiveStarted } : {}),
  });
  return rowFigures(run);
}

const ROWS: readonly RowSpec[] = [
  { name: "plain", migrate: (ctx) => migrateDirect(ctx) },
  { name: "free-page-hint", balloon: "free-page-hint", migrate: (ctx) => migrateDirect(ctx) },
  { name: "xbzrle", migrate: (ctx) => migrateDirect(ctx, { xbzrle: true }) },
  {
    name: "multifd",
    migrate: (ctx) => migrateDirect(ctx, { multifd: true }, { "multifd-channels": MULTIFD_CHANNELS }),
  },
  { name: "multifd+zstd", migrate: migrateMultifd },
  { name: "vmprune free", migrate: (ctx) => migrateVmpruneFree(ctx) },
  { name: "vmprune free multifd", migrate: (ctx) => migrateVmpruneFree(ctx, true) },
  { name: "vmprune free+cache", migrate: (ctx) => migrateVmpruneFreeCache(ctx) },
  {
    name: "vmprune free+cache refs always",
    migrate: (ctx) => migrateVmpruneFreeCache(ctx, false, "always"),
  },
  { name: "vmprune free+cache multifd", migrate: (ctx) => migrateVmpruneFreeCache(ctx, true) },
];

/**
 * Samples the src veth's tx counter every 50 ms (sysfs of this namespace) for a timeline of the link's use, and
 * this namespace's TCP retransmission counters before and after (a stalled link: loss, or nothing to send?).
 */
function startLinkTrace(dstNetns: string): {
  stop(startMs: number, pause: { stoppedAtMs: number; resumedAtMs: number }): string;
  /** Stops sampling (stop() may still format what was sampled). */
  cancel(): void;
} {
  const path = `/sys/class/net/${SRC_IFNAME}/statistics/tx_bytes`;
  const samples: [number, number][] = [];
  /** The named counters of a /proc/net/{snmp,netstat} text's lines starting with `prefix`. */
  const counters = (text: string, prefix: string, names: string[]) => {
    const lines = text.split("\n").filter((l) => l.startsWith(prefix));
    const keys = (lines[0] ?? "").split(" ");
    const values = (lines[1] ?? "").split(" ");
    return names.map((n) => `${n} ${values[keys.indexOf(n)] ?? "?"}`).join(" ");
  };
  // The receiving end's drops, in the destination's namespace: a socket over its receive buffer (RcvQDrop,
  // pruning), its backlog full while the reader holds the lock, out-of-order data; and the host's per-CPU input
  // backlogs (softnet_stat's second column: a veth delivers through them).
  const receiverSide = () => {
    const netstat = execFileSync("ip", ["netns", "exec", dstNetns, "cat", "/proc/net/netstat"], {
      encoding: "utf8",
    });
    const softnetDrops = readFileSync("/proc/net/softnet_stat", "utf8")
      .split("\n")
      .filter((l) => l.trim())
      .reduce((n, l) => n + Number.parseInt(l.split(" ")[1] ?? "0", 16), 0);
    return (
      `receiver ${counters(netstat, "TcpExt:", ["TCPRcvQDrop", "TCPBacklogDrop", "PruneCalled", "RcvPruned", "TCPOFOQueue", "TCPOFODrop", "TCPZeroWindowDrop", "TCPRcvCoalesce"])} ` +
      `softnet drops ${softnetDrops}`
    );
  };
  const tcp = () => {
    const snmp = readFileSync("/proc/net/snmp", "utf8");
    const ext = readFileSync("/proc/net/netstat", "utf8");
    const qdisc = /dropped (\d+)/.exec(
      execFileSync("tc", ["-s", "qdisc", "show", "dev", SRC_IFNAME], { encoding: "utf8" }),
    )?.[1];
    return (
      `${counters(snmp, "Tcp:", ["RetransSegs"])} ` +
      `${counters(ext, "TcpExt:", ["TCPTimeouts", "TCPLostRetransmit", "TCPLossProbes", "TCPFastRetrans", "TCPSackRecovery", "TCPDSACKRecv", "TCPSpuriousRTOs"])} ` +
      `qdisc drops ${qdisc ?? "?"}; ${receiverSide()}`
    );
  };
  const tcpBefore = tcp();
  const sample = () => samples.push([Date.now(), Number(readFileSync(path, "utf8"))]);
  sample();
  const timer = setInterval(sample, 50);
  return {
    cancel() {
      clearInterval(timer);
    },
    stop(startMs, pause) {
      clearInterval(timer);
      sample();
      const first = samples[0]?.[1] ?? 0;
      const parts = samples.map(([t, b]) => `${t - startMs}:${((b - first) / 1e6).toFixed(0)}`);
      return `  tcp before: ${tcpBefore}; after: ${tcp()}\n  trace from ${startMs} (ms:MB) stop@${pause.stoppedAtMs - startMs} resume@${pause.resumedAtMs - startMs} ${parts.join(" ")}`;
    },
  };
}

/** The accelerator the lab VMs ran with (all of them: one host, one probe). */
let accelUsed = "";

/** The CPU sampler's names for the destination side's processes (RunFigures.destinationCpuMs adds them up). */
const DESTINATION_QEMU = "destination QEMU";
const RECEIVE = "receive";

async function runOnce(spec: RowSpec, migrate: RowMigrator, options: BenchOptions): Promise<RunFigures> {
  const { link } = options;
  const pair = await LabPair.boot({
    kernel: options.kernel,
    qemu: options.qemu,
    memoryMiB: MEMORY_MIB,
    netns: { src: link.srcNetns, dst: link.dstNetns },
    // Destinations in anonymous memory, as production guests have it (VmConfig.anonymousRam): no oracle here reads
    // their RAM, and a /dev/shm file made every ZERO record cost the destination a page allocation.
    anonymousDestinationRam: true,
    ...(options.destinationRam === "preallocated" ? { preallocateDestinationRam: true } : {}),
    ...(spec.balloon ? { balloon: spec.balloon } : {}),
  });
  accelUsed = pair.accel;
  try {
    if (spec.balloon === "free-page-hint") {
      const balloon = await guestBalloon(pair.src.agent);
      if (balloon?.driver !== "virtio_balloon" || !balloon.freePageHint)
        throw new Error(`the guest's balloon has no free page hinting: ${JSON.stringify(balloon)}`);
    }
    await runMixedWorkload(pair.src.agent, WORKLOADS[options.workload]);
    const freePages = Math.floor(((await guestMeminfo(pair.src.agent)).MemFree ?? 0) / 4);
    const ideal = await idealBytes(pair);
    log(`  ${spec.name}: ideal ${ideal.ideal} B, pages ${ideal.counts}`);
    const before = await txBytesOf(link);
    const startedAtMs = Date.now();
    const trace = process.env.VMPRUNE_BENCH_TRACE ? startLinkTrace(link.dstNetns) : undefined;
    // This process's CPU and event loop over the migration: vmprune send runs here (the rows' other work is small).
    const cpuBefore = process.cpuUsage();
    let receivePid: number | undefined;
    // Where the host's CPU went from `migrate` to RESUME, for every run (the table's CPU lines), in detail with the
    // trace. A reading is a few /proc files every 20 ms.
    const cpuSampler = new CpuSampler(() => {
      const dst = pair.dst; // started inside the row's migrate: read again at each reading
      const receive = receivePid;
      return [
        { name: "source QEMU", cpuMs: () => processCpuMs(pair.src.pid) },
        ...(dst ? [{ name: DESTINATION_QEMU, cpuMs: () => processCpuMs(dst.pid) }] : []),
        { name: "this process (send)", cpuMs: () => ownCpuMs() },
        // The rest of a Node process is V8's compiler and collector threads (and libuv's pool).
        {
          name: "send's main thread",
          cpuMs: () => threadCpuMs(process.pid),
          partOf: "this process (send)",
        },
        ...(receive
          ? [
              { name: RECEIVE, cpuMs: () => processCpuMs(receive) },
              { name: "receive's main thread", cpuMs: () => threadCpuMs(receive), partOf: RECEIVE },
            ]
          : []),
      ];
    });
    cpuSampler.start();
    const loopBefore = performance.eventLoopUtilization();
    // The link's use over time for the HTML report: the same counter as linkBytes, read on a timer.
    const sampler = new ThroughputSampler(
      () => Number(readFileSync(`/sys/class/net/${SRC_IFNAME}/statistics/tx_bytes`, "utf8")),
      DEFAULT_SAMPLE_INTERVAL_MS,
    );
    sampler.start();
    const { result, streamBytes, prunedPages, prepMs, prune, sourceHeldMs, receiveHeldMs } = await migrate({
      pair,
      link,
      qemu: options.qemu,
      onReceiveStarted: (pid) => {
        receivePid = pid;
      },
    }).finally(() => {
      sampler.stop();
      // A failed migration must not leave the trace's timer keeping this process alive.
      trace?.cancel();
      cpuSampler.stop();
    });
    const throughput = sampler.stop();
    if (sampler.failure) log(`  ${spec.name}: ${sampler.failure}`);
    const after = await txBytesOf(link);
    const dst = pair.dst;
    if (!dst) throw new Error("no destination after the migration");
    const pause = await guestPause(pair.src.monitor, dst.monitor, startedAtMs);
    const pauseMs = pause.resumedAtMs - pause.stoppedAtMs;
    const toResumeMs = (result.info["total-time"] ?? result.wallMs) - (result.info.downtime ?? 0) + pauseMs;
    if (trace) log(trace.stop(startedAtMs, pause));
    if (trace) {
      const cpu = process.cpuUsage(cpuBefore);
      const loop = performance.eventLoopUtilization(loopBefore);
      // Where the host's CPU went from `migrate` to the destination's RESUME: whether the CPU, not the link, held it.
      log(`  ${cpuSampler.describe(pause.resumedAtMs - toResumeMs, pause.resumedAtMs)}`);
      log(
        `  busy cores per 100 ms from migrate ${cpuSampler.timeline(pause.resumedAtMs - toResumeMs, pause.resumedAtMs)}`,
      );
      log(
        `  this process (send) over the migration: ${Math.round((cpu.user + cpu.system) / 1000)} ms CPU ` +
          `(${Math.round(cpu.system / 1000)} ms system), event loop busy ${(100 * loop.utilization).toFixed(0)}% of ${Math.round(loop.idle + loop.active)} ms`,
      );
    }
    if (trace && prune)
      log(
        `  send's pruning: ${prune.pages.seen} pages seen, ${prune.batches} batches judged in ${Math.round(prune.judgeMs)} ms, ${prune.refs} references, ${prune.cacheWhole} cache pages whole` +
          (sourceHeldMs === undefined
            ? ""
            : `; QEMU's stream waited ${sourceHeldMs} ms for the link or receive`),
      );
    // The samples count from before the row's setup (destination, send's preparation); the report's plots count
    // from `migrate`, as the time to resume does: when it was, from the RESUME back by the time to resume.
    const migrateAtMs = pause.resumedAtMs - startedAtMs - toResumeMs;
    const fromMigrate = throughput
      .map((sample) => ({ ...sample, tMs: sample.tMs - migrateAtMs }))
      .filter((sample) => sample.tMs > 0);
    const used = cpuSampler.usage(pause.resumedAtMs - toResumeMs, pause.resumedAtMs);
    const destinationQemuCpuMs = used?.processes.get(DESTINATION_QEMU);
    const destinationCpuMs = used
      ? (destinationQemuCpuMs ?? 0) + (used.processes.get(RECEIVE) ?? 0)
      : undefined;
    const verified = await LabPair.verify(dst);
    if (!/^OK/m.test(verified))
      throw new Error(`${spec.name}: verify on the destination: ${verified.trim()}`);
    return {
      linkBytes: after.toDst - before.toDst,
      linkReturnBytes: after.toSrc - before.toSrc,
      streamBytes,
      totalTimeMs: result.info["total-time"] ?? Math.round(result.wallMs),
      downtimeMs: result.info.downtime ?? 0,
      guestPauseMs: pauseMs,
      toResumeMs,
      operatorWaitMs: (prepMs ?? 0) + toResumeMs,
      idealBytes: ideal.ideal,
      idealFreeOnlyBytes: ideal.freeOnly,
      freePages,
      ...(prunedPages !== undefined ? { prunedPages } : {}),
      ...(prepMs !== undefined ? { prepMs } : {}),
      ...(sourceHeldMs !== undefined ? { sourceHeldMs } : {}),
      ...(receiveHeldMs !== undefined ? { receiveHeldMs } : {}),
      ...(used ? { hostCpuMs: used.busyMs } : {}),
      ...(destinationCpuMs !== undefined ? { destinationCpuMs } : {}),
      ...(destinationQemuCpuMs !== undefined ? { destinationQemuCpuMs } : {}),
      pageBytes: pageTrafficOf(result.info, prune ?? null),
      throughput: fromMigrate,
      pause: { fromMs: toResumeMs - pauseMs, toMs: toResumeMs },
    };
  } finally {
    await pair.stop();
  }
}

type Verdict = "met" | "not met" | "-";

/**
 * The goals a row is judged on, by workload (issue 12): every row's guest pause no longer than plain's and its
 * link bytes within 10% of the ideal; where there is much to prune (mixed, cache-heavy), vmprune free+cache's
 * time to resume within 1.2 x the floor (the ideal bytes at the measured link rate); on the papers' kind of guest
 * (idle-after-work) vmprune's time to resume 75% below plain's and its link bytes 92% below; where there is
 * nothing to prune (anon), vmprune no more than 3% slower than plain.
 */
export const GOAL_NAMES = [
  "pause<=plain",
  "link<=1.1 ideal",
  "resume<=1.2 floor",
  "resume -75%",
  "link -92%",
  "resume<=1.03 plain",
] as const;
export type GoalName = (typeof GOAL_NAMES)[number];

/** Which goals apply to which rows of a workload ("-" elsewhere). */
function goalApplies(goal: GoalName, row: string, workload: WorkloadName): boolean {
  const vmprune = row.startsWith("vmprune");
  switch (goal) {
    case "pause<=plain":
      return row !== "plain";
    case "link<=1.1 ideal":
      return true;
    case "resume<=1.2 floor":
      return row === "vmprune free+cache" && (workload === "mixed" || workload === "cache-heavy");
    case "resume -75%":
    case "link -92%":
      return vmprune && workload === "idle-after-work";
    case "resume<=1.03 plain":
      return vmprune && workload === "anon";
  }
}

export interface RowResult {
  row: string;
  /** Why the row has no figures (not run). */
  missing?: string;
  runs: RunFigures[];
  median?: RunFigures;
  linkBytesVsPlain?: number;
  linkBytesVsIdeal?: number;
  totalTimeVsPlain?: number;
  toResumeVsPlain?: number;
  /** Time to resume over the floor: the ideal bytes at the measured link rate. */
  toResumeVsFloor?: number;
  operatorWaitVsPlain?: number;
  goals: Record<GoalName, Verdict>;
}

export interface LinkBenchResult {
  kernel: KernelId;
  qemu: QemuVersion;
  accel: string;
  memoryMiB: number;
  workload: WorkloadName;
  runs: number;
  link: LinkDescription & { measuredBefore: RateMeasurement; measuredAfter: RateMeasurement };
  multifdCompression: string | undefined;
  maxBandwidthBytesPerSecond: number;
  /** The host's CPUs (both hosts' processes share them): what "host CPU / cores" divides by. */
  cores: number;
  destinationRam: DestinationRam;
  rows: RowResult[];
  ideal: { bytes: number; freeOnlyBytes: number; atLinkRateMs: number };
}

interface BenchOptions {
  kernel: KernelId;
  qemu: QemuVersion;
  runs: number;
  link: LinkDescription;
  /** Row names to run (default all), e.g. for a quick look at two of them. */
  rows?: readonly string[];
  workload: WorkloadName;
  /** Destinations' guest RAM cleared as pages arrive (QEMU's default), or all of it when they start. */
  destinationRam: DestinationRam;
}

const DESTINATION_RAM = ["on-demand", "preallocated"] as const;
type DestinationRam = (typeof DESTINATION_RAM)[number];

/** What the table's header and the HTML report say of the destinations' RAM (nothing for QEMU's default). */
function destinationRamNote(destinationRam: DestinationRam): string[] {
  return destinationRam === "preallocated"
    ? ["Destinations preallocated their RAM (cleared before `migrate`, not during it)."]
    : [];
}

export async function benchLink(options: BenchOptions): Promise<LinkBenchResult> {
  const measuredBefore = await measureRateOf(options.link);
  log(
    `link ${options.link.srcIp} → ${options.link.dstIp}, shaped to ${options.link.rateMbit} Mbit/s: ` +
      `measured ${measuredBefore.gbitPerSecond.toFixed(3)} Gbit/s (100 MB)`,
  );
  const selected = ROWS.filter((r) => !options.rows || options.rows.includes(r.name));
  const runs = new Map<string, RunFigures[]>(selected.map((r) => [r.name, []]));
  for (let i = 0; i < options.runs; i++) {
    for (const spec of selected) {
      const started = performance.now();
      const figures = await runOnce(spec, spec.migrate, options);
      runs.get(spec.name)?.push(figures);
      log(
        `run ${i + 1}/${options.runs} ${spec.name}: ${figures.linkBytes} B over the link ` +
          `(stream ${figures.streamBytes} B, return ${figures.linkReturnBytes} B), ${figures.totalTimeMs} ms total, ` +
          `${figures.downtimeMs} ms down, guest paused ${Math.round(figures.guestPauseMs)} ms, ` +
          `${Math.round(figures.toResumeMs)} ms to RESUME, ideal ${figures.idealBytes} B` +
          `${figures.prunedPages !== undefined ? `, ${figures.prunedPages} pages pruned` : ""}` +
          `${figures.prepMs !== undefined ? `, ${Math.round(figures.prepMs)} ms preparation before migrate` : ""}` +
          `, operator wait ${Math.round(figures.operatorWaitMs)} ms ` +
          `(${Math.round((performance.now() - started) / 1000)} s with boot and workload)`,
      );
    }
  }
  const measuredAfter = await measureRateOf(options.link);
  log(`link measured again: ${measuredAfter.gbitPerSecond.toFixed(3)} Gbit/s`);

  // The floor is judged at the slower of the two measurements (the link may vary a little over the runs).
  const linkGbit = Math.min(measuredBefore.gbitPerSecond, measuredAfter.gbitPerSecond);
  const judged = judgeRows(
    selected.map((r) => r.name),
    runs,
    options.workload,
    (linkGbit * 1e9) / 8,
  );
  return {
    kernel: options.kernel,
    qemu: options.qemu,
    accel: accelUsed,
    memoryMiB: MEMORY_MIB,
    workload: options.workload,
    runs: options.runs,
    link: { ...options.link, measuredBefore, measuredAfter },
    multifdCompression,
    maxBandwidthBytesPerSecond: MAX_BANDWIDTH,
    cores: availableParallelism(),
    destinationRam: options.destinationRam,
    rows: judged.rows,
    ideal: {
      bytes: judged.idealBytes,
      freeOnlyBytes: judged.idealFreeOnlyBytes,
      atLinkRateMs: judged.floorMs,
    },
  };
}

/** The figures a median is taken of (the report's per-run series and breakdowns are not). */
type NumericFigure = {
  [K in keyof RunFigures]-?: RunFigures[K] extends number | undefined ? K : never;
}[keyof RunFigures];

/** The median of every figure over a row's runs (optional figures only when some run has them). */
export function medianFigures(list: readonly RunFigures[]): RunFigures {
  const m = (key: NumericFigure) => median(list.flatMap((r) => (r[key] === undefined ? [] : [r[key]])));
  const figures: RunFigures = {
    linkBytes: m("linkBytes"),
    linkReturnBytes: m("linkReturnBytes"),
    streamBytes: m("streamBytes"),
    totalTimeMs: m("totalTimeMs"),
    downtimeMs: m("downtimeMs"),
    guestPauseMs: m("guestPauseMs"),
    toResumeMs: m("toResumeMs"),
    operatorWaitMs: m("operatorWaitMs"),
    idealBytes: m("idealBytes"),
    idealFreeOnlyBytes: m("idealFreeOnlyBytes"),
    freePages: m("freePages"),
  };
  if (list.some((r) => r.prunedPages !== undefined)) figures.prunedPages = m("prunedPages");
  if (list.some((r) => r.prepMs !== undefined)) figures.prepMs = m("prepMs");
  if (list.some((r) => r.sourceHeldMs !== undefined)) figures.sourceHeldMs = m("sourceHeldMs");
  if (list.some((r) => r.receiveHeldMs !== undefined)) figures.receiveHeldMs = m("receiveHeldMs");
  if (list.some((r) => r.hostCpuMs !== undefined)) figures.hostCpuMs = m("hostCpuMs");
  if (list.some((r) => r.destinationCpuMs !== undefined)) figures.destinationCpuMs = m("destinationCpuMs");
  if (list.some((r) => r.destinationQemuCpuMs !== undefined))
    figures.destinationQemuCpuMs = m("destinationQemuCpuMs");
  return figures;
}

/**
 * Each row's medians, ratios and goals, from the runs of every row (the ideal is the median over all of them).
 * The floor is that ideal at `linkBytesPerSecond`, the link's measured rate: no migration can resume sooner.
 */
export function judgeRows(
  names: readonly string[],
  runs: ReadonlyMap<string, readonly RunFigures[]>,
  workload: WorkloadName,
  linkBytesPerSecond: number,
): { rows: RowResult[]; idealBytes: number; idealFreeOnlyBytes: number; floorMs: number } {
  const all = [...runs.values()].flat();
  const idealAll = median(all.map((r) => r.idealBytes));
  const floorMs = (idealAll / linkBytesPerSecond) * 1000;
  const plainRuns = runs.get("plain") ?? [];
  const plain = plainRuns.length > 0 ? medianFigures(plainRuns) : undefined;
  const rows = names.map((name): RowResult => {
    const list = runs.get(name) ?? [];
    const goals = Object.fromEntries(GOAL_NAMES.map((g) => [g, "-"])) as Record<GoalName, Verdict>;
    if (list.length === 0) return { row: name, missing: "no run completed", runs: [], goals };
    const m = medianFigures(list);
    const checks: Record<GoalName, () => boolean | undefined> = {
      "pause<=plain": () => (plain ? m.guestPauseMs <= plain.guestPauseMs : undefined),
      "link<=1.1 ideal": () => m.linkBytes <= 1.1 * idealAll,
      "resume<=1.2 floor": () => m.toResumeMs <= 1.2 * floorMs,
      "resume -75%": () => (plain ? m.toResumeMs <= 0.25 * plain.toResumeMs : undefined),
      "link -92%": () => (plain ? m.linkBytes <= 0.08 * plain.linkBytes : undefined),
      "resume<=1.03 plain": () => (plain ? m.toResumeMs <= 1.03 * plain.toResumeMs : undefined),
    };
    for (const goal of GOAL_NAMES) {
      if (!goalApplies(goal, name, workload)) continue;
      const ok = checks[goal]();
      goals[goal] = ok === undefined ? "-" : ok ? "met" : "not met";
    }
    return {
      row: name,
      runs: [...list],
      median: m,
      ...(plain ? { linkBytesVsPlain: m.linkBytes / plain.linkBytes } : {}),
      linkBytesVsIdeal: m.linkBytes / idealAll,
      toResumeVsFloor: m.toResumeMs / floorMs,
      ...(plain
        ? {
            totalTimeVsPlain: m.totalTimeMs / plain.totalTimeMs,
            toResumeVsPlain: m.toResumeMs / plain.toResumeMs,
            operatorWaitVsPlain: m.operatorWaitMs / plain.operatorWaitMs,
          }
        : {}),
      goals,
    };
  });
  return {
    rows,
    idealBytes: idealAll,
    idealFreeOnlyBytes: median(all.map((r) => r.idealFreeOnlyBytes)),
    floorMs,
  };
}

/** Column names for the rows: the table has one column per row, and the rows' own names are too wide. */
const SHORT_ROW_NAMES: Record<string, string> = {
  plain: "plain",
  "free-page-hint": "fp-hint",
  xbzrle: "xbzrle",
  multifd: "multifd",
  "multifd+zstd": "mfd+z",
  "vmprune free": "vm free",
  "vmprune free multifd": "vm mfd",
  "vmprune free+cache": "vm f+c",
  "vmprune free+cache refs always": "vm f+c!",
  "vmprune free+cache multifd": "vm f+c mfd",
};

/**
 * The figures as a table of REPORT_WIDTH columns: one column per row (short names, explained below), one line
 * per figure with its unit, then the targets; the ideal is a column of its own with the byte figures only.
 */
export function formatTable(result: LinkBenchResult): string {
  const mib = (bytes: number) => (bytes / (1 << 20)).toFixed(1);
  const ratio = (x: number | undefined) => (x === undefined ? "-" : x.toFixed(3));
  const seconds = (ms: number | undefined) => (ms === undefined ? "-" : (ms / 1000).toFixed(2));
  const whole = (x: number | undefined) => (x === undefined ? "-" : String(Math.round(x)));
  const { link } = result;
  const plainBytes = result.rows.find((r) => r.row === "plain")?.median?.linkBytes;
  // One line of the table: a figure of each row's medians (blank where the row has no run), then the ideal's.
  const line = (name: string, cell: (r: RowResult, m: RunFigures) => string, ideal = ""): string[] => [
    name,
    ...result.rows.map((r) => (r.median ? cell(r, r.median) : "-")),
    ideal,
  ];
  const lines = [
    line("link (MiB)", (_, m) => mib(m.linkBytes), mib(result.ideal.bytes)),
    line(
      "  / plain",
      (r) => ratio(r.linkBytesVsPlain),
      ratio(plainBytes ? result.ideal.bytes / plainBytes : undefined),
    ),
    line("  / ideal", (r) => ratio(r.linkBytesVsIdeal), "1.000"),
    line("stream (MiB)", (_, m) => mib(m.streamBytes)),
    line("QEMU total (s)", (_, m) => seconds(m.totalTimeMs)),
    line("QEMU downtime (ms)", (_, m) => whole(m.downtimeMs)),
    line("guest pause (ms)", (_, m) => whole(m.guestPauseMs)),
    line("to resume (s)", (_, m) => seconds(m.toResumeMs), seconds(result.ideal.atLinkRateMs)),
    line("  / plain", (r) => ratio(r.toResumeVsPlain)),
    line("  / floor", (r) => ratio(r.toResumeVsFloor), "1.000"),
    line("send prep (s)", (_, m) => seconds(m.prepMs)),
    line("operator wait (s)", (_, m) => seconds(m.operatorWaitMs)),
    line("  / plain", (r) => ratio(r.operatorWaitVsPlain)),
    line("pages pruned", (_, m) => whole(m.prunedPages)),
    line("QEMU waited (s)", (_, m) => seconds(m.sourceHeldMs)),
    line("receive waited (s)", (_, m) => seconds(m.receiveHeldMs)),
    line("host CPU (core-s)", (_, m) => seconds(m.hostCpuMs)),
    line("  destination side", (_, m) => seconds(m.destinationCpuMs)),
    line("    destination QEMU", (_, m) => seconds(m.destinationQemuCpuMs)),
    line("  / cores (s)", (_, m) =>
      seconds(m.hostCpuMs === undefined ? undefined : m.hostCpuMs / result.cores),
    ),
    // The goals that apply to this workload (a goal no row is judged on is left out).
    line("goals", () => ""),
    ...GOAL_NAMES.filter((g) => result.rows.some((r) => r.goals[g] !== "-")).map((g) =>
      line(`  ${g}`, (r) => r.goals[g]),
    ),
  ];
  const shortName = (row: string) =>
    row === "multifd+zstd" && result.multifdCompression === "zlib"
      ? "mfd+zlib"
      : (SHORT_ROW_NAMES[row] ?? row);
  const head = [
    `${result.memoryMiB} MiB guest, ${result.workload} workload, kernel ${result.kernel}, QEMU ${result.qemu} ` +
      `(${result.accel}), medians of ${result.runs} runs per row.`,
    `Link: veth ${link.srcNetns} ${link.srcIp} → ${link.dstNetns} ${link.dstIp}, tbf ${link.rateMbit} Mbit/s both ` +
      `ends; measured ${link.measuredBefore.gbitPerSecond.toFixed(3)} Gbit/s before, ` +
      `${link.measuredAfter.gbitPerSecond.toFixed(3)} after (100 MB TCP); migration max-bandwidth ` +
      `${(result.maxBandwidthBytesPerSecond * 8) / 1e9} Gbit/s.`,
    ...destinationRamNote(result.destinationRam),
  ];
  const notes = [
    `Columns: ${result.rows
      .filter((r) => shortName(r.row) !== r.row)
      .map((r) => `${shortName(r.row)} = ${r.row}`)
      .join(", ")}` +
      `${result.multifdCompression === "zlib" ? " (this QEMU has no zstd: zlib)" : ""}; ideal = pages neither ` +
      `free, nor clean page cache, nor zero; its "to resume" is the floor, those bytes at the measured link ` +
      `rate (the slower measurement); ${mib(result.ideal.freeOnlyBytes)} MiB for free pages alone.`,
    ...result.rows.filter((r) => !r.median).map((r) => `${shortName(r.row)}: not run: ${r.missing ?? ""}.`),
    "To resume: QEMU's `migrate` to the destination's RESUME. Send prep: vmprune's work before `migrate` (disk " +
      "index, introspection). Operator wait: from the start of the command to the destination running (send " +
      "prep + to resume). Guest pause: the source's STOP to the destination's RESUME. Goals by workload: " +
      "pause <= plain's and link <= 1.1 x ideal everywhere; mixed and cache-heavy: free+cache resumes within " +
      "1.2 x the floor; idle-after-work: vmprune resumes 75% sooner than plain and sends 92% fewer bytes; anon: " +
      "vmprune at most 3% slower than plain.",
    `Host CPU: the ${result.cores} cores' busy time from \`migrate\` to RESUME (both QEMUs, vmprune, the ` +
      "kernel's network work: both hosts are this one); destination side: the destination QEMU's and receive's " +
      "part, whatever the link, and of it the destination QEMU's own (most of it the kernel clearing the pages " +
      "the stream lands in); / cores: the least time these cores needed for that work, busy throughout. A " +
      "row cannot resume sooner than the larger of its floor and that.",
  ];
  const fit = (text: string) => wrap(text, REPORT_WIDTH);
  return [
    ...head.flatMap(fit),
    "",
    table(["", ...result.rows.map((r) => shortName(r.row)), "ideal"], lines),
    "",
    ...notes.flatMap(fit),
  ].join("\n");
}

/**
 * The benchmark as an HTML report's model: each row's medians (time to resume, guest pause, link bytes, and
 * guest pages by how they travelled, category by category), its first run's throughput on the link and pause,
 * plain as the baseline, the ideal and the floor.
 */
export function linkReportModel(result: LinkBenchResult): MigrationReportModel {
  const rows = result.rows.flatMap((r) => {
    const m = r.median;
    if (!m) return [];
    const pageBytes: PageTrafficBytes = {};
    for (const category of PAGE_TRAFFIC_CATEGORIES) {
      const values = r.runs.flatMap((run) => (run.pageBytes ? [run.pageBytes[category] ?? 0] : []));
      if (values.length > 0) pageBytes[category] = median(values);
    }
    const first = r.runs[0];
    return [
      {
        name: r.row === "multifd+zstd" && result.multifdCompression === "zlib" ? "multifd+zlib" : r.row,
        toResumeMs: m.toResumeMs,
        guestPauseMs: m.guestPauseMs,
        linkBytes: m.linkBytes,
        pageBytes,
        throughput: first?.throughput ?? [],
        ...(first?.pause ? { pause: first.pause } : {}),
      },
    ];
  });
  const { link } = result;
  return {
    title: `vmprune bench:link: ${result.workload} workload`,
    context: [
      `${result.memoryMiB} MiB guest, kernel ${result.kernel}, QEMU ${result.qemu} (${result.accel}), ` +
        `medians of ${result.runs} run${result.runs === 1 ? "" : "s"} per row.`,
      `Link: veth ${link.srcIp} → ${link.dstIp}, tbf ${link.rateMbit} Mbit/s; measured ` +
        `${link.measuredBefore.gbitPerSecond.toFixed(3)} Gbit/s before, ${link.measuredAfter.gbitPerSecond.toFixed(3)} after.`,
      ...destinationRamNote(result.destinationRam),
    ],
    rows,
    ...(rows.some((r) => r.name === "plain") ? { baseline: "plain" } : {}),
    ideal: { bytes: result.ideal.bytes, floorMs: result.ideal.atLinkRateMs },
    throughputNote:
      `each row's first run: the src end of the veth's tx bytes every ${DEFAULT_SAMPLE_INTERVAL_MS} ms, from ` +
      "`migrate`; vmprune send's preparation before it is not shown",
    notes: [
      "Link bytes: every byte the src end of the veth sent during the migration. Guest pages: QEMU's own page " +
        "counters (query-migrate normal and duplicate pages, xbzrle pages), split by vmprune send's pruning report.",
      "Ideal: pages neither free, nor clean page cache, nor zero (a classification of the source right before " +
        "each migration); floor: the ideal bytes at the link's slower measured rate.",
    ],
  };
}

async function main(argv: string[]): Promise<void> {
  const usage =
    "usage: bench/link.ts [--kernel 6.1|6.12] [--qemu 7.2|10.0] [--runs 3] [--rate-mbit 1000] " +
    "[--workload mixed|cache-heavy|idle-after-work|anon] [--rows NAME,NAME] [--destination-ram on-demand|preallocated] " +
    "[--json] [--report FILE.html]";
  const { values } = parseArgs({
    args: argv,
    options: {
      ...LAB_OPTIONS,
      "rate-mbit": { type: "string", default: "1000" },
      workload: { type: "string", default: "mixed" },
      rows: { type: "string" },
      "destination-ram": { type: "string", default: "on-demand" },
      json: { type: "boolean", default: false },
      report: { type: "string" },
    },
  });
  if (!isWorkloadName(values.workload)) throw new Error(`unknown workload ${values.workload} (${usage})`);
  const rowNames = values.rows?.split(",").map((name) => name.trim());
  const unknownRow = rowNames?.find((name) => !ROWS.some((r) => r.name === name));
  if (unknownRow !== undefined)
    throw new Error(`unknown row ${unknownRow}: rows are ${ROWS.map((r) => r.name).join(", ")} (${usage})`);
  const { kernel, qemu, runs } = labTarget(values, usage);
  const destinationRam = DESTINATION_RAM.find((d) => d === values["destination-ram"]);
  if (!destinationRam)
    throw new Error(
      `--destination-ram is ${DESTINATION_RAM.join(" or ")}, not ${values["destination-ram"]} (${usage})`,
    );
  const rateMbit = Number(values["rate-mbit"]);
  if (!(rateMbit > 0)) throw new Error(`--rate-mbit needs a positive number (${usage})`);
  requireSetup("bench:link", { guests: [kernel], qemu: [qemu], commands: ["ip", "tc"], root: true });
  const link = await linkOfThisProcess();
  if (!link) {
    process.exitCode = await runBehindLink({
      file: fileURLToPath(import.meta.url),
      argv,
      rateMbit,
      prepare: () => Promise.all([ensureQemu(qemu), ensureGuestImage(kernel)]),
      log,
    });
    return;
  }
  sweepStaleRuns();
  const result = await benchLink({
    kernel,
    qemu,
    runs,
    link,
    workload: values.workload,
    destinationRam,
    ...(rowNames ? { rows: rowNames } : {}),
  });
  process.stdout.write(values.json ? reportJson(result) : `${formatTable(result)}\n`);
  if (values.report) {
    const { htmlReport } = await import("../src/report/html-report.ts");
    await writeFile(values.report, await htmlReport(linkReportModel(result)));
    log(`HTML report written to ${values.report}`);
  }
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  main(process.argv.slice(2)).catch((error: unknown) => {
    process.stderr.write(`${error instanceof Error ? error.stack : String(error)}\n`);
    process.exitCode = 1;
  });
}
