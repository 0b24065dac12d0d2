/**
 * The send side of vmprune's link (link/protocol.ts), as a relay codec for one QEMU connection: after the
 * handshake with `vmprune receive`, the source QEMU's bytes go as DATA frames, and, on the main channel, the
 * pruning processor's references as REF frames (only if receive agreed to REFs). receive's answers come back on
 * the same connection: RETURN (QEMU's return path, to the source at once), NACK (answered with the page as guest
 * memory holds it now), ACK (frees the ledger, reopens the window), EOF (the destination QEMU is done: end the
 * source), ERROR (abort: both sides reset, the source QEMU sees a failed migration and keeps running).
 */
import type { Socket } from "node:net";
import { TLSSocket } from "node:tls";
import { LinkDecoder } from "../link/decoder.ts";
import { LinkError } from "../link/errors.ts";
import { clientHandshake, handshakeKey } from "../link/handshake.ts";
import {
  CAPABILITY,
  ERROR_CODE,
  encodeBytesFrames,
  encodeMessage,
  LOAD_REPORT_INTERVAL_MS,
  MAX_ZERO_PAGES,
  MSG,
  PAGE_BYTES,
} from "../link/protocol.ts";
import { RefLedger } from "../link/ref-ledger.ts";
import type { PageRef } from "../prune/page-judge.ts";
import {
  NO_REFS,
  type PruningProcessor,
  type RefsAccepted,
  type Segment,
} from "../prune/pruning-processor.ts";
import {
  type ChannelCodec,
  type ChannelProcessor,
  type ChannelSide,
  type CodecOutput,
  HeldTime,
} from "../stream/relay.ts";
import { bytesToKernel, peerOnThisHost } from "../transport/socket.ts";
import { describeTls } from "../transport/tls.ts";
import { LinkRateMeter } from "./link-rate.ts";

/** REF blockNumber unit: 512-byte disk sectors (link/protocol.ts stream rule 2). */
export const REF_SECTOR_BYTES = 512;

/**
 * When clean cache pages go as references: "always", or "link-busy" (the default): only where a network lies
 * between send and receive and it is what holds the migration back. A reference costs CPU a whole page does not:
 * send hashes the page (SHA-256) and places it on the disk, receive reads the disk and hashes it again (in
 * isolation about 14 µs more of send's CPU and 10 µs more of receive's per reference: bench:send-cpu, CPU
 * profiles), to save the link 4 KiB (34 µs at 1 Gbit/s, 3.4 µs at 10 Gbit/s). So, per chunk from the source:
 * 1. receive on this host (transport/socket.ts peerOnThisHost: a unix socket, loopback, an address of this host):
 *    never. No network bytes to save, and the CPU a reference costs is the one both QEMUs and receive share (the
 *    loopback demo: 7,054 references made free+cache take 212% of the baseline's time, 0 took 100%). A receive
 *    reached through a local tunnel (ssh -L, stunnel) looks local too: "always" is the way there.
 * 2. once the link was measured draining while bytes waited for it ({@link REFS_RATE_WINDOW_MS} of backlog):
 *    references iff it drains no faster than {@link REFS_PAY_BELOW_BYTES_PER_SECOND}, whatever waits at the
 *    moment: a pruned stream comes in bursts, and the kernel's send buffer (MBs) keeps the link fed between them.
 * 3. before that: while {@link REFS_WHEN_QUEUED_BYTES} wait for the link and receive does not report itself busy
 *    ({@link RECEIVE_BUSY_PERMILLE}).
 * Why rule 2 asks neither for a queue nor for an idle receive, as rule 3 does (and as rule 2 once did): on the
 * lab's 1 Gbit/s link the user-space queue rarely reached 2 MiB (the kernel's buffer absorbs the backlog) and
 * receive, sharing 2 cores with both QEMUs, reported itself busy in 8-14 of ~29 LOADs, so references went to a
 * few thousand of ~40,000 cache pages; yet references always resumed sooner than that in 17 of 18 same-run
 * comparisons (bench:link, 3 workloads), by 1-12%.
 */
export const REFS_WHEN = ["link-busy", "always"] as const;
export type RefsWhen = (typeof REFS_WHEN)[number];

/**
 * "link-busy": references while at least this much waits in this process for the link (the socket's user-space
 * queue, which fills only once the kernel's send buffer is full): a quarter of the relay's per-socket buffer limit
 * (stream/relay.ts DEFAULT_MAX_BUFFERED_BYTES, 8 MiB), so the queue never runs dry while references are made.
 * A quarter of the relay's bound when that is lower (the switchover guard's near-end read-ahead on a slow link
 * can be a few hundred KiB): else a slow link, where references pay most, would never get them near the end.
 */
export const REFS_WHEN_QUEUED_BYTES = 2 * 1024 * 1024;
const REFS_WHEN_QUEUED_SHARE_OF_BOUND = 0.25;

/**
 * "link-busy": the link rate (bytes/s, LinkRateMeter over this channel's upstream) up to which references pay.
 * With send and receive on their own hosts, a reference's costs fall in different stages of the pipeline, and
 * send's, the larger (~14 µs), breaks even with the link at 4096 B / 14 µs ≈ 290 MB/s; 200 MB/s keeps a margin
 * for busier hosts. On the lab's one 2-core host a 1 Gbit/s link (~120 MB/s) still resumed sooner with references
 * than without (the doc of REFS_WHEN). It was 95 MB/s, from 43 µs per reference measured with send saturated and
 * the link idle on that shared host (bench:link, refs always: 36,857 references in 1.6 s), which counts the CPU
 * of processes another host would run.
 */
export const REFS_PAY_BELOW_BYTES_PER_SECOND = 200_000_000;

/**
 * "link-busy" before the link is measured (REFS_WHEN rule 3), with a receive that reports its load
 * (link/protocol.ts "Load reports"): bytes queue for the link but receive's event loop was busy at least this
 * share of its last interval (per mille), so receive, not the network, drains the link: a reference would only add
 * receive's disk read and hash to what holds the migration back. Whole pages then. Below it receive has room,
 * waits on the link, and references pay.
 */
export const RECEIVE_BUSY_PERMILLE = 800;
/**
 * "link-busy": how often the link rate meter is sampled (ms), at most: its window ({@link REFS_RATE_WINDOW_MS})
 * needs about ten samples, not one per chunk.
 */
const LINK_RATE_SAMPLE_MS = 10;

/**
 * "link-busy": the window of the link rate meter (link-rate.ts) that decides, shorter than its default 500 ms: a
 * pass of a pruned stream comes in bursts (free stretches send nothing, and references drain the queue), so whole
 * half-seconds of backlog come late or never (bench:link cache-heavy: a rate after ~3,000 of ~5,500 chunks). A
 * send buffer filling at the start of a backlog (at most ~4 MiB) can make a 100 ms window read up to 40 MB/s fast,
 * which errs towards whole pages.
 */
const REFS_RATE_WINDOW_MS = 100;

/** A LOAD older than this many report intervals no longer says anything (receive stopped, or is stalled). */
const LOAD_FRESH_INTERVALS = 3;

function describeRefs(refs: RefsAccepted): string {
  if (refs.index && refs.filesystem) return "references on (disk blocks and filesystem places)";
  if (refs.index) return "references on (disk blocks only: receive is older than link 1.2)";
  if (refs.filesystem) return "references on (filesystem places only)";
  return "receive takes no references";
}

export interface LinkSendOptions {
  /** The link's pre-shared key; absent only over TLS with certificates (link/handshake.ts handshakeKey). */
  psk?: Buffer;
  /** The main channel's processor (index 0). */
  processor?: PruningProcessor;
  /** A later channel's processor (a multifd channel's pruning); without it the channel is framed as it comes. */
  channelProcessor?: ChannelProcessor;
  /** Byte offset on the shared disk of an index block (DiskIndex.offsetOf). */
  blockOffset?: (block: number) => number;
  /** The current bytes of a guest page, to answer a NACK. */
  readPage?: (page: PageRef) => Buffer;
  /** This migration's id and the destination it asks receive for (link/protocol.ts "Channel claims"). */
  claim?: { migration: Buffer; target: string };
  /** When cache pages go as references (default "link-busy"). */
  refsWhen?: RefsWhen;
  /** "link-busy": the link rate above which whole pages are cheaper (default REFS_PAY_BELOW_BYTES_PER_SECOND). */
  refsPayBelowBytesPerSecond?: number;
  /** "link-busy": the relay's current bound on what a channel may queue (Relay.maxBufferedBytes). */
  queueBoundBytes?: () => number;
  /** "link-busy": how long receive's LOAD counts (default LOAD_FRESH_INTERVALS report intervals). */
  loadFreshMs?: number;
  /** "link-busy": whether receive runs on this host (default: read from the link's socket, peerOnThisHost). */
  receiveOnThisHost?: boolean;
  log?: (line: string) => void;
}

/** A processor that emits bytes and references (the main channel's, or a multifd channel's with references). */
export interface SegmentProcessor {
  pushSegments(chunk: Buffer, refs: RefsAccepted): Segment[];
  endSegments(refs: RefsAccepted): Segment[];
}

function isSegmentProcessor(p: ChannelProcessor): p is ChannelProcessor & SegmentProcessor {
  return "pushSegments" in p && "endSegments" in p;
}

export class LinkSendCodec implements ChannelCodec {
  // RETURN bytes go on to the source QEMU as they come (decoder.ts bytesInParts).
  private readonly decoder = new LinkDecoder({ bytesInParts: true });
  private ledger = new RefLedger<PageRef>(0);
  private refsAllowed: RefsAccepted = NO_REFS;
  /** What the processors are told while the link has room ("link-busy"): no references, ZEROS as allowed. */
  private refsWhileLinkHasRoom: RefsAccepted = NO_REFS;
  private source: Socket | undefined;
  private upstream: Socket | undefined;
  /** How fast this channel's link drains while bytes queue for it ("link-busy"). */
  private readonly linkRate = new LinkRateMeter(REFS_RATE_WINDOW_MS);
  /** When the link rate meter was last sampled (LINK_RATE_SAMPLE_MS). */
  private rateSampledAtMs = Number.NEGATIVE_INFINITY;
  /** Until when (performance.now()) receive's last LOAD says it is the slow end; 0: it does not. */
  private receiveBusyUntilMs = 0;
  /** "link-busy": receive shares this host, so no network lies between: whole pages always. */
  private receiveOnThisHost = false;
  /** "link-busy": chunks by the reason references were (not) allowed for them. */
  private readonly refsDecisions = new Map<string, number>();
  /** receive's LOADs, and those that said receive, not the link, was what drained slowly (whole pages then). */
  loadReports = 0;
  receiveBusyReports = 0;
  private sentEof = false;
  private receivedEof = false;
  private paused = false;
  /** How long the window (stream rule 3) kept the source unread: receive settling references set the pace. */
  private readonly windowHeld = new HeldTime();
  /** The relay's count of the source's held time, which the window's holds add to. */
  private sourceHeld: HeldTime | undefined;
  nacks = 0;

  constructor(
    private readonly index: number,
    private readonly options: LinkSendOptions,
  ) {}

  async open({
    source,
    upstream,
    sourceHeld,
  }: {
    source: Socket;
    upstream: Socket;
    sourceHeld?: HeldTime;
  }): Promise<void> {
    this.source = source;
    this.upstream = upstream;
    this.sourceHeld = sourceHeld;
    let session: Awaited<ReturnType<typeof clientHandshake>>;
    try {
      session = await clientHandshake(upstream, {
        psk: handshakeKey(this.options.psk, upstream),
        capabilities: [
          CAPABILITY.REF_SHA256,
          CAPABILITY.REF_FS_SHA256,
          CAPABILITY.REF_FS_BARE,
          CAPABILITY.ZERO_FILL,
          CAPABILITY.LOAD_REPORT,
        ],
        ...(this.options.claim ? { claim: { ...this.options.claim, channel: this.index } } : {}),
      });
    } catch (error) {
      // In TLS 1.3 the client's handshake is done before the server has checked the client's certificate: a
      // receive that refuses it (another CA, expired) only hangs up, once send already speaks the link.
      if (
        error instanceof LinkError &&
        error.code === "closed" &&
        upstream instanceof TLSSocket &&
        !this.options.psk
      )
        throw new LinkError(
          "closed",
          `${error.detail}; with certificates this usually means receive refused this side's client certificate (another CA, expired): its log says why`,
        );
      throw error;
    }
    this.refsAllowed = {
      index: session.capabilities.includes(CAPABILITY.REF_SHA256),
      filesystem: session.capabilities.includes(CAPABILITY.REF_FS_SHA256),
      multifd:
        session.capabilities.includes(CAPABILITY.REF_FS_SHA256) &&
        session.capabilities.includes(CAPABILITY.REF_FS_BARE),
      zeroFill: session.capabilities.includes(CAPABILITY.ZERO_FILL),
    };
    const { zeroFill } = this.refsAllowed;
    const anyRefs = this.refsAllowed.index || this.refsAllowed.filesystem;
    const linkBusy = (this.options.refsWhen ?? "link-busy") === "link-busy";
    this.refsWhileLinkHasRoom =
      linkBusy && anyRefs
        ? { index: false, filesystem: false, multifd: false, zeroFill, linkHasRoom: true }
        : this.refsAllowed;
    this.receiveOnThisHost = linkBusy && (this.options.receiveOnThisHost ?? peerOnThisHost(upstream));
    this.ledger = new RefLedger<PageRef>(session.windowBytes);
    const tls = describeTls(upstream);
    this.options.log?.(
      `link #${this.index}: authenticated${tls ? ` over ${tls}` : " (plaintext)"}; ${describeRefs(this.refsAllowed)}` +
        (this.receiveOnThisHost && anyRefs
          ? "; receive is on this host: cache pages go whole (link-busy)"
          : ""),
    );
  }

  fromSource(chunk: Buffer): CodecOutput {
    const p = this.segmentProcessor();
    const other = this.index === 0 ? undefined : this.options.channelProcessor;
    const out = p
      ? this.frames(p.pushSegments(chunk, this.refsNow()))
      : this.dataFrames(other ? other.push(chunk) : [chunk]);
    this.pauseWhileWindowFull();
    return { toUpstream: out };
  }

  sourceEnded(): CodecOutput {
    const p = this.segmentProcessor();
    const other = this.index === 0 ? undefined : this.options.channelProcessor;
    const out = p ? this.frames(p.endSegments(this.refsNow())) : other ? this.dataFrames(other.end()) : [];
    out.push(encodeMessage({ type: MSG.EOF }));
    this.sentEof = true;
    return { toUpstream: out, endUpstream: this.doneSending() };
  }

  fromUpstream(chunk: Buffer): CodecOutput {
    const toSource: Buffer[] = [];
    const toUpstream: Buffer[] = [];
    let endSource = false;
    for (const m of this.decoder.push(chunk)) {
      switch (m.type) {
        case MSG.RETURN:
          toSource.push(m.bytes);
          break;
        case MSG.ACK:
          this.ledger.ack(m.refId);
          break;
        case MSG.NACK: {
          const page = this.ledger.nacked(m.refId);
          if (!this.options.readPage)
            throw new LinkError("unknown-ref", `NACK ${m.refId}: no guest memory to answer`);
          this.nacks++;
          toUpstream.push(
            encodeMessage({ type: MSG.PAGE_DATA, refId: m.refId, page: this.options.readPage(page) }),
          );
          break;
        }
        case MSG.LOAD: {
          // receive is the slow end while its event loop is busy, or bytes back up towards a slow QEMU.
          const busy =
            m.busyPermille >= RECEIVE_BUSY_PERMILLE || m.destinationQueuedBytes >= REFS_WHEN_QUEUED_BYTES;
          const freshMs = this.options.loadFreshMs ?? LOAD_FRESH_INTERVALS * LOAD_REPORT_INTERVAL_MS;
          this.receiveBusyUntilMs = busy ? performance.now() + freshMs : 0;
          this.loadReports++;
          if (busy) this.receiveBusyReports++;
          break;
        }
        case MSG.EOF:
          this.receivedEof = true;
          endSource = true;
          break;
        case MSG.ERROR:
          throw new LinkError("peer-error", `receive aborted the migration: ${m.message} (code ${m.code})`);
        default:
          throw new LinkError(
            "unexpected-message",
            `receive sent message type ${m.type} after the handshake`,
          );
      }
    }
    this.resumeIfWindowOpen();
    return { toSource, toUpstream, endSource, endUpstream: this.doneSending() };
  }

  upstreamEnded(): CodecOutput {
    if (!this.receivedEof) throw new LinkError("closed", "receive closed the link before its EOF");
    return { endSource: true };
  }

  closed(): void {
    const windowMs = Math.round(this.windowHeld.ms);
    if (windowMs > 0)
      this.options.log?.(
        `link #${this.index}: the reference window kept the source unread for ${windowMs} ms (receive settling references set the pace)`,
      );
    if (this.refsDecisions.size > 0) {
      const rate = this.linkRate.bytesPerSecond;
      const reasons = [...this.refsDecisions].map(([why, n]) => `${why} ${n}`).join(", ");
      this.options.log?.(
        `link #${this.index}: link-busy, chunks by reason: ${reasons}; link ${rate === undefined ? "never measured backed up" : `measured at ${(rate / 1e6).toFixed(0)} MB/s`}`,
      );
    }
    if (this.receiveBusyReports > 0 && this.refsWhileLinkHasRoom !== this.refsAllowed)
      this.options.log?.(
        `link #${this.index}: receive reported itself busy in ${this.receiveBusyReports} of ${this.loadReports} load reports; cache pages went whole meanwhile`,
      );
  }

  /** The source QEMU's connection failed: receive hears why (ERROR), and resets the destination QEMU's. */
  sideFailed(side: ChannelSide, error: Error): Buffer[] | undefined {
    if (side !== "source") return undefined;
    const message = `the source QEMU's connection failed: ${error.message}`;
    return [encodeMessage({ type: MSG.ERROR, code: ERROR_CODE.SOURCE, message })];
  }

  /**
   * The processor whose output may hold references: the main channel's; a multifd channel's when it makes
   * segments and receive takes references or pages of zeros inside multifd packets. Else the channel goes as DATA
   * only.
   */
  private segmentProcessor(): SegmentProcessor | undefined {
    if (this.index === 0) return this.options.processor;
    const other = this.options.channelProcessor;
    return other && isSegmentProcessor(other) && (this.refsAllowed.multifd || this.refsAllowed.zeroFill)
      ? other
      : undefined;
  }

  /** The references the processors may make now: all that receive takes, or none while the link has room. */
  private refsNow(): RefsAccepted {
    const upstream = this.upstream;
    if (!upstream || this.refsWhileLinkHasRoom === this.refsAllowed) return this.refsAllowed;
    if (this.receiveOnThisHost) return this.decided("receive on this host", false);
    const queuedBytes = upstream.writableLength;
    const now = performance.now();
    // Sampled every LINK_RATE_SAMPLE_MS, not per chunk: the meter needs far fewer (and Node's socket.bytesWritten,
    // which an earlier meter read, walks the socket's whole write queue on each call: 138 ms of send's 4 s).
    if (now - this.rateSampledAtMs >= LINK_RATE_SAMPLE_MS) {
      this.rateSampledAtMs = now;
      this.linkRate.sample(now, {
        sentBytes: bytesToKernel(upstream),
        queuedBytes,
        receivedBytes: 0,
      });
    }
    const rate = this.linkRate.bytesPerSecond;
    if (rate !== undefined)
      return rate > (this.options.refsPayBelowBytesPerSecond ?? REFS_PAY_BELOW_BYTES_PER_SECOND)
        ? this.decided("link measured fast", false)
        : this.decided("link measured slow", true);
    const bound = this.options.queueBoundBytes?.();
    const busyAt =
      bound === undefined
        ? REFS_WHEN_QUEUED_BYTES
        : Math.min(REFS_WHEN_QUEUED_BYTES, bound * REFS_WHEN_QUEUED_SHARE_OF_BOUND);
    if (queuedBytes < busyAt) return this.decided("short queue", false);
    if (now < this.receiveBusyUntilMs) return this.decided("receive busy", false);
    return this.decided("link backed up", true);
  }

  /** Counts why ("link-busy") a chunk's cache pages may or may not go as references; logged when the link closes. */
  private decided(why: string, refs: boolean): RefsAccepted {
    this.refsDecisions.set(why, (this.refsDecisions.get(why) ?? 0) + 1);
    return refs ? this.refsAllowed : this.refsWhileLinkHasRoom;
  }

  /** send half-closes the link after its EOF, once every REF is settled (a NACK may still need an answer). */
  private doneSending(): boolean {
    return this.sentEof && this.ledger.outstanding === 0;
  }

  private dataFrames(buffers: Buffer[]): Buffer[] {
    let length = 0;
    for (const b of buffers) length += b.length;
    if (length === 0) return [];
    this.ledger.data(length);
    return encodeBytesFrames(MSG.DATA, buffers);
  }

  private frames(segments: Segment[]): Buffer[] {
    const out: Buffer[] = [];
    for (const s of segments) {
      if (s.kind === "bytes") {
        out.push(...this.dataFrames(s.buffers));
        continue;
      }
      if (s.kind === "zeros") {
        // What receive writes counts as output, as DATA does (stream rule 3).
        for (let left = s.pages; left > 0; left -= MAX_ZERO_PAGES) {
          const pages = Math.min(left, MAX_ZERO_PAGES);
          this.ledger.data(pages * PAGE_BYTES);
          out.push(encodeMessage({ type: MSG.ZEROS, pages }));
        }
        continue;
      }
      const refId = this.ledger.ref(s.page, s.pageHeader.length);
      const { target, hash, pageHeader } = s;
      out.push(
        encodeMessage(
          target.kind === "filesystem"
            ? {
                type: MSG.REF_FS,
                refId,
                filesystem: target.uuid,
                blockNumber: target.offset / REF_SECTOR_BYTES,
                hash,
                pageHeader,
              }
            : {
                type: MSG.REF,
                refId,
                blockNumber:
                  (target.kind === "disk" ? target.offset : (this.options.blockOffset?.(target.block) ?? 0)) /
                  REF_SECTOR_BYTES,
                hash,
                pageHeader,
              },
        ),
      );
    }
    return out;
  }

  /** Stream rule 3: stop reading the source QEMU while the bytes behind the oldest unsettled REF fill the window. */
  private pauseWhileWindowFull(): void {
    // Also when already paused: the relay's own backpressure may have resumed the source meanwhile.
    if (this.ledger.full && this.source) {
      // The window's hold begins once, at its first pause; pausing again (after the relay resumed the source)
      // continues it.
      if (!this.paused) {
        this.windowHeld.begin();
        this.sourceHeld?.begin();
      }
      this.paused = true;
      this.source.pause();
    }
  }

  private resumeIfWindowOpen(): void {
    if (this.paused && !this.ledger.full && this.source) {
      this.paused = false;
      this.windowHeld.end();
      this.sourceHeld?.end();
      this.source.resume();
    }
  }
}
