/**
 * The sending side of one migration, as `vmprune send` and `vmprune migrate` run it: a relay whose main channel
 * goes through the pruning processor (with `drop`) or the counting passthrough (without). Guest introspection is
 * opened before the relay listens, so the first record is judged like the last.
 */
import { randomBytes } from "node:crypto";
import type { Category } from "../introspect/classifier.ts";
import { MIGRATION_ID_BYTES } from "../link/protocol.ts";
import { MultifdPruningProcessor, summarizeMultifd } from "../prune/multifd-processor.ts";
import { IntrospectionJudge, type PageJudge } from "../prune/page-judge.ts";
import { type PruneReport, PruningProcessor } from "../prune/pruning-processor.ts";
import type { QmpClient } from "../qemu/qmp.ts";
import { RawFileDevice } from "../storage/block-device.ts";
import { type CacheReferenceStats, CacheReferences } from "../storage/cache-references.ts";
import { DiskIndex } from "../storage/disk-index.ts";
import { type LocatorDisk, PageLocator } from "../storage/page-locator.ts";
import { CountingProcessor } from "../stream/counting-processor.ts";
import { Relay, type RelayReport } from "../stream/relay.ts";
import type { StreamSummaryJson } from "../stream/summary.ts";
import type { Endpoint, TcpEndpoint } from "../transport/endpoint.ts";
import type { UnixSocketOptions } from "../transport/socket.ts";
import {
  type LinkSecurity,
  linkSecurity,
  plaintextNotice,
  tlsClientOptions,
  tlsFailureHint,
} from "../transport/tls.ts";
import { type GuestJudgeOptions, openGuestJudge } from "./guest-judge.ts";
import { LinkRateMeter } from "./link-rate.ts";
import { LinkSendCodec, type RefsWhen } from "./link-send.ts";
import { multifdZeroListVerdict } from "./multifd-zero-list.ts";
import { type ExportSocketDir, exportSourceDisks } from "./source-disks.ts";
import { SwitchoverGuard, type SwitchoverGuardReport } from "./switchover-guard.ts";

/** Categories `send` can drop on its own (a plain QEMU destination rebuilds nothing). */
export const DROPPABLE_WITHOUT_RECEIVER: readonly Category[] = ["free"];
/** With `vmprune receive` on the other side, clean cache pages too (rebuilt from the shared disk). */
export const DROPPABLE_WITH_RECEIVER: readonly Category[] = ["free", "cache"];

/**
 * How far the relay may read ahead of the link while the switchover guard keeps QEMU from switching over
 * (switchover-guard.ts: this far from the end; near it, half of what the link carries within the downtime limit).
 * The source QEMU emits pruned stretches (free and cache pages) slower than the link would carry their
 * replacement, and dense stretches faster: with room to read ahead, the link keeps draining dense bytes while QEMU
 * walks pruned ones, instead of idling (about 0.5 s per 100 MB of free pages at QEMU's 150-380 MB/s here). Until
 * the link is measured, the relay's default bound (Relay rule 5).
 */
export const GUARDED_READ_AHEAD_BYTES = 64 * 1024 * 1024;
/** The relay's bound never drops below this (a slow link): one socket read's worth, Node's high-water mark. */
const MIN_READ_AHEAD_BYTES = 64 * 1024;

export interface SendOptions {
  /** Where the source QEMU connects: TCP or a unix socket (transport/endpoint.ts). */
  listen: Endpoint;
  /** The destination QEMU's -incoming address, or `vmprune receive`'s. */
  to: Endpoint;
  /** Mode and owner of a unix-socket `listen` (the source QEMU may run as another user). */
  unixSocket?: UnixSocketOptions;
  /** Categories to drop; empty or absent: passthrough. */
  drop?: readonly Category[];
  dryRun?: boolean;
  guest?: Omit<GuestJudgeOptions, "log">;
  capturePath?: string;
  /**
   * The target is `vmprune receive` (not a plain QEMU): the link's pre-shared key (absent only with x509
   * `security`) and its TLS (transport/tls.ts; default TLS-PSK from `psk`).
   */
  link?: {
    psk?: Buffer;
    security?: LinkSecurity;
    /**
     * The destination to ask a receive service for (link/protocol.ts "Channel claims"): a socket name in its
     * allowed directory, or one of its allowed addresses. Default "": receive's one destination (`--to`).
     */
    target?: string;
  };
  /**
   * The shared disk image (raw), with `link` and drop "cache": the locator finds clean cache pages on it from the
   * guest kernel's metadata (reading only its superblocks and, rarely, extent blocks); the content index (a read
   * of the whole image) is built only when the locator cannot run (a guest without BTF) or `contentIndex` asks.
   */
  disk?: string;
  /**
   * How clean cache pages are found on the disks: "locator" (default; the content index of `disk` only when the
   * locator cannot run), "locator+index" (the index too, for the pages the locator cannot place), "index" (the
   * content index alone: D3's way, for comparisons).
   */
  cacheRefSources?: CacheRefSources;
  /**
   * When clean cache pages go as references (link-send.ts RefsWhen): "link-busy" (default) only while bytes queue
   * for the link, else whole, which is faster when the link has room; "always" for the fewest bytes on the link.
   */
  refsWhen?: RefsWhen;
  /** Where the source QEMU's NBD server socket for its disk exports goes (source-disks.ts; default: a temp dir). */
  exportSocketDir?: ExportSocketDir;
  /**
   * Tell the source QEMU the link's measured rate for its switchover decision (switchover-guard.ts), through
   * `guest.qmp`, while pruning. Default true; without it QEMU judges by the rate it writes into the relay.
   */
  guardSwitchover?: boolean;
  log?: (line: string) => void;
}

export interface SendReport {
  relay: RelayReport;
  /** What the source sent on the main channel (null if no main channel was accepted). */
  stream: StreamSummaryJson | null;
  /** Pruning decisions and savings (null without --drop). */
  prune: PruneReport | null;
  /** The shared disk's content index, when one was built: blocks indexed, alignment, build time. */
  diskIndex: { entries: number; alignmentBytes: number; buildMs: number } | null;
  /**
   * How clean cache pages were placed (with --drop cache): the locator's filesystems and preparation time, why
   * pages were not located, what the content index added.
   */
  cacheRefs: (CacheReferenceStats & { locator: string; prepareMs: number }) | null;
  /** What the switchover guard told the source QEMU (null when it did not run). */
  switchover: SwitchoverGuardReport | null;
}

export interface RunningSend {
  relay: Relay;
  /** Where it listens (TCP port 0 resolved). */
  endpoint: Endpoint;
  /** The TCP listening address; throws when listening on a unix socket (see `endpoint`). */
  readonly address: TcpEndpoint;
  done: Promise<SendReport>;
  /** Pruning so far (for progress), null before the main channel or without --drop. */
  pruneSoFar(): PruneReport | null;
  /** The switchover guard runs: it uses `guest.qmp` until `done` settles. */
  switchoverGuarded: boolean;
}

/** multifdZeroListVerdict, with a QMP failure as the reason instead of an error (invariant 4). */
async function zeroListVerdict(
  qmp: Parameters<typeof multifdZeroListVerdict>[0],
  log: (line: string) => void,
): Promise<true | string> {
  let verdict: true | string;
  try {
    verdict = await multifdZeroListVerdict(qmp);
  } catch (error) {
    verdict = `the source QEMU's version could not be asked (${error instanceof Error ? error.message : String(error)})`;
  }
  if (verdict !== true) log(`vmprune send: multifd channels, if any, will not be pruned: ${verdict}`);
  return verdict;
}

export const CACHE_REF_SOURCES = ["locator", "locator+index", "index"] as const;
export type CacheRefSources = (typeof CACHE_REF_SOURCES)[number];

interface PreparedCacheReferences {
  references: CacheReferences;
  index: DiskIndex | undefined;
  indexBuildMs: number;
  /** The filesystems the locator found, or why it does not run. */
  locatorDescription: string;
  prepareMs: number;
  close(): Promise<void>;
}

/**
 * The locator on `disk` when the guest kernel can be read for it (BTF), the content index when it cannot or when
 * asked. Preparing the locator reads a few superblocks, not the disk.
 */
async function prepareCacheReferences(
  disks: { path: string } | { qmp: QmpClient },
  judge: PageJudge | undefined,
  sources: CacheRefSources,
  log: (line: string) => void,
  exportSocketDir?: ExportSocketDir,
): Promise<PreparedCacheReferences> {
  const started = performance.now();
  let locator: PageLocator | undefined;
  let opened: { disks: LocatorDisk[]; close(): Promise<void> } | undefined;
  let locatorDescription: string;
  const guest = judge instanceof IntrospectionJudge ? judge.guest : undefined;
  if (sources === "index") locatorDescription = "off: the content index alone was asked for";
  else if (!guest) locatorDescription = "off: guest introspection is unavailable";
  else if (!guest.types) locatorDescription = `off: the guest kernel's types are unknown (${guest.btf})`;
  else {
    try {
      opened =
        "path" in disks
          ? await openRawDisk(disks.path)
          : await exportSourceDisks(disks.qmp, log, exportSocketDir);
      locator = await PageLocator.open({
        kernel: guest.kernel,
        types: guest.types,
        layout: guest.layout,
        disks: opened.disks,
      });
      const found = [...locator.filesystems].map(([uuid, p]) =>
        p ? `${p.fs.type} ${uuid} on ${p.disk.id} (${p.fs.where})` : `${uuid} (on several disks: not used)`,
      );
      if (found.length === 0) {
        locatorDescription = `off: no filesystem it reads on ${opened.disks.map((d) => d.id).join(", ") || "no disk"}`;
        locator = undefined;
      } else locatorDescription = `on: ${found.join(", ")}`;
    } catch (error) {
      locator = undefined;
      locatorDescription = `off: the disks could not be read (${error instanceof Error ? error.message : String(error)})`;
    }
  }
  log(`cache page locator ${locatorDescription}`);
  let index: DiskIndex | undefined;
  let indexBuildMs = 0;
  const disk = "path" in disks ? disks.path : undefined;
  if (disk && (!locator || sources !== "locator")) {
    const indexStarted = performance.now();
    // receive verifies every reference (SHA-256 of the block it reads): no need to read lone candidates here.
    index = await DiskIndex.build(disk, { trustLoneCandidate: true });
    indexBuildMs = performance.now() - indexStarted;
    log(
      `indexed ${disk}: ${index.entries} blocks in ${indexBuildMs.toFixed(0)} ms (${index.alignmentBytes}-byte alignment)`,
    );
  }
  if (!locator && !index)
    log(
      `vmprune send: cache pages will go whole: the locator is ${locatorDescription}, and the content index needs --disk IMAGE (a raw image)`,
    );
  const references = new CacheReferences({
    ...(locator ? { locator } : {}),
    ...(index ? { index } : {}),
    singleDisk: opened?.disks.length === 1,
  });
  return {
    references,
    index,
    indexBuildMs,
    locatorDescription,
    prepareMs: performance.now() - started,
    close: async () => {
      await index?.close();
      await opened?.close();
    },
  };
}

/** A raw image file as the locator's one disk. */
async function openRawDisk(path: string): Promise<{ disks: LocatorDisk[]; close(): Promise<void> }> {
  const device = await RawFileDevice.open(path);
  return { disks: [{ id: path, device }], close: () => device.close() };
}

export async function startSend(options: SendOptions): Promise<RunningSend> {
  const log = options.log ?? (() => undefined);
  const drop = options.drop ?? [];
  const droppable = options.link ? DROPPABLE_WITH_RECEIVER : DROPPABLE_WITHOUT_RECEIVER;
  for (const category of drop)
    if (!droppable.includes(category))
      throw new Error(
        options.link
          ? `--drop ${category}: only ${droppable.join(", ")} can be dropped`
          : `--drop ${category}: a plain QEMU destination cannot rebuild ${category} pages (that needs vmprune receive and the shared disk); only ${droppable.join(", ")} can be dropped here`,
      );
  if (drop.includes("cache") && !options.disk && !options.guest?.qmp)
    throw new Error(
      "--drop cache needs the shared disks: the source QEMU's QMP socket (its disks are read through QEMU), or --disk IMAGE",
    );
  const opened = drop.length > 0 ? await openGuestJudge({ ...options.guest, log }) : null;
  const judge = opened && typeof opened.judge !== "string" ? opened.judge : undefined;
  const qmp = options.guest?.qmp?.client;
  const disks = options.disk ? { path: options.disk } : qmp ? { qmp } : undefined;
  const cache =
    drop.includes("cache") && disks
      ? await prepareCacheReferences(
          disks,
          judge,
          options.cacheRefSources ?? "locator",
          log,
          options.exportSocketDir,
        )
      : undefined;
  const index = cache?.index;
  const newPruner = (judgeOrReason: PageJudge | string) =>
    new PruningProcessor(judgeOrReason, {
      drop,
      dryRun: options.dryRun ?? false,
      ...(cache ? { cacheIndex: cache.references } : {}),
      log,
    });
  const zeroList = opened ? await zeroListVerdict(options.guest?.qmp?.client, log) : "no --drop";
  // One processor per multifd channel, all with the main channel's judge: QEMU sends every page there.
  const multifd: MultifdPruningProcessor[] = [];
  const newMultifdPruner = (connection: number) => {
    const processor = new MultifdPruningProcessor(opened?.judge ?? "no --drop: passthrough", connection, {
      drop,
      ...(cache ? { cacheIndex: cache.references } : {}),
      dryRun: options.dryRun ?? false,
      zeroList,
      ramBlocks: () => pruner?.ramBlocksForMultifd() ?? "it arrived before the main channel",
      log,
    });
    multifd.push(processor);
    return processor;
  };
  const guardQmp = options.guardSwitchover !== false && judge ? options.guest?.qmp?.client : undefined;
  let pruner: PruningProcessor | undefined;
  let counter: CountingProcessor | undefined;
  const link = options.link;
  const security = link ? linkSecurity(link.security, link.psk) : undefined;
  const notice = security && plaintextNotice(security);
  if (notice) log(notice);
  const tlsOptions = security ? tlsClientOptions(security, options.to) : undefined;
  // One send serves one migration: all its link connections carry this id, so a receive service groups them.
  const migrationId = randomBytes(MIGRATION_ID_BYTES);
  let relay: Relay;
  try {
    relay = await Relay.start({
      listen: options.listen,
      to: options.to,
      ...(options.unixSocket ? { unixSocket: options.unixSocket } : {}),
      createMainProcessor: () => {
        if (opened) {
          pruner = newPruner(opened.judge);
          return pruner;
        }
        counter = new CountingProcessor();
        return counter;
      },
      ...(opened ? { createChannelProcessor: newMultifdPruner } : {}),
      ...(tlsOptions && security
        ? {
            upstreamTls: {
              options: tlsOptions,
              describeFailure: (error: Error) => tlsFailureHint(error, security),
            },
          }
        : {}),
      ...(link
        ? {
            createChannelCodec: (channel: number) => {
              if (channel === 0) pruner = newPruner(opened?.judge ?? "no --drop: passthrough");
              const codec = new LinkSendCodec(channel, {
                ...(link.psk ? { psk: link.psk } : {}),
                ...(channel === 0 && pruner ? { processor: pruner } : {}),
                ...(channel > 0 && opened ? { channelProcessor: newMultifdPruner(channel) } : {}),
                ...(index ? { blockOffset: (block: number) => (index as DiskIndex).offsetOf(block) } : {}),
                ...(judge?.readPage ? { readPage: judge.readPage.bind(judge) } : {}),
                claim: { migration: migrationId, target: link.target ?? "" },
                ...(options.refsWhen ? { refsWhen: options.refsWhen } : {}),
                queueBoundBytes: () => relay.maxBufferedBytes,
                log,
              });
              return codec;
            },
          }
        : {}),
      ...(options.capturePath ? { capturePath: options.capturePath } : {}),
      log,
    });
  } catch (error) {
    opened?.close();
    throw error;
  }
  /** The main channel's pruning, with the multifd channels' beside it. */
  const pruneReport = (): PruneReport | null => {
    const main = pruner?.report();
    if (!main) return null;
    return multifd.length > 0 ? { ...main, multifd: summarizeMultifd(multifd.map((m) => m.report())) } : main;
  };
  let guard: SwitchoverGuard | undefined;
  if (guardQmp) {
    const meter = new LinkRateMeter();
    const started = relay;
    try {
      guard = await SwitchoverGuard.start({
        qmp: guardQmp,
        link: () => {
          meter.sample(performance.now(), started.upstreamDrain());
          return {
            bytesPerSecond: meter.bytesPerSecond,
            carriedBytesPerSecond: meter.carriedBytesPerSecond,
            inflowPeakBytesPerSecond: meter.inflowPeakBytesPerSecond,
          };
        },
        readAhead: {
          maxBytes: GUARDED_READ_AHEAD_BYTES,
          set: (bytes) => started.setMaxBufferedBytes(Math.max(MIN_READ_AHEAD_BYTES, bytes)),
        },
        log,
      });
    } catch (error) {
      log(`switchover guard not started: ${error instanceof Error ? error.message : String(error)}`);
    }
  }
  const done = relay.done.then(async (report) => {
    const switchover = (await guard?.stop()) ?? null;
    opened?.close();
    await cache?.close();
    const prune = pruneReport();
    // Said once, at the end: a large share of unknown pages means part of guest RAM was out of the judge's sight.
    if (prune?.unknownWarning) log(`vmprune send: ${prune.unknownWarning}`);
    return {
      relay: report,
      stream: pruner?.stream() ?? counter?.report() ?? null,
      prune,
      diskIndex: index
        ? {
            entries: index.entries,
            alignmentBytes: index.alignmentBytes,
            buildMs: Math.round(cache?.indexBuildMs ?? 0),
          }
        : null,
      cacheRefs: cache
        ? {
            ...cache.references.stats(),
            locator: cache.locatorDescription,
            prepareMs: Math.round(cache.prepareMs),
          }
        : null,
      switchover,
    };
  });
  return {
    relay,
    endpoint: relay.endpoint,
    get address() {
      return relay.address;
    },
    done,
    pruneSoFar: pruneReport,
    switchoverGuarded: guard !== undefined,
  };
}
