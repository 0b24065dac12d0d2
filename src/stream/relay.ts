/**
 * A transparent relay for one QEMU live migration: the source QEMU migrates to `tcp:LISTEN` (or `unix:LISTEN`),
 * the relay forwards every connection to the destination's `-incoming` address. QEMU must not be able to tell it
 * from a direct connection. Sockets come from ../transport/ (TCP or unix sockets, either side), so these rules
 * hold whatever carries the bytes. The rules, and why (sections of ../shared/docs/qemu-migration-stream.md):
 *
 * 1. Accept order is connect order (§1, §10.10). QEMU 7.2 takes the first connection it accepts as the main
 *    channel and later ones as multifd (≥8.0 peeks a magic instead). So the k-th upstream connection is opened
 *    only once the (k-1)-th is established; the kernel's accept queue is FIFO, so the destination accepts them in
 *    the order the relay accepted them. The first accepted connection is the main channel and goes through the
 *    {@link MainChannelProcessor}; the others go through a {@link ChannelProcessor} of their own if one is given
 *    (which tells a multifd channel by its first bytes), else raw, and are classified for the report by their
 *    first 4 bytes (0x11223344 = multifd, §5.1).
 * 2. No probes (§1, §10.10): a connection to the destination is opened only for an accepted source connection.
 *    A ≥8.0 destination blocks its main loop on a connection that sends nothing; 7.2 takes it as the main channel.
 * 3. Both directions at once (§6, §10.8-9): the return path is the same socket in reverse (PONG, SHUT, ...).
 *    Destination→source bytes are forwarded raw as they arrive, never waiting for the other direction, and the
 *    processor's output is written as soon as it is returned.
 * 4. Half-closes are propagated per direction (§6): the source waits for SHUT after its own EOF, so the relay
 *    must not close the source side before SHUT has been forwarded. Source EOF → (processor's final bytes, then)
 *    EOF to the destination; destination EOF → EOF to the source. An error (reset) on one side resets the other,
 *    so QEMU sees the failure instead of a clean end.
 * 5. Bounded buffers (§10.12): the source estimates its bandwidth from what *it* writes, so a deep relay buffer
 *    inflates the estimate and the real downtime. A reading socket is paused once a write returned false and the
 *    writer holds `maxBufferedBytes` or more (Node's high-water mark, 16 KiB, if that is larger), and resumed on
 *    'drain'; a source paused for its destination resumes already once that holds less than half the bound
 *    (RESUME_BELOW_SHARE), so the destination's link still has bytes queued while the source starts again. So the
 *    source feels the destination's backpressure through the relay. Sockets use TCP_NODELAY.
 * 6. One relay = one migration: after the first admitted connection, `done` resolves once every admitted
 *    connection has closed and none waits for admission, and the relay stops listening.
 * 7. A failed upstream connect resets the source connection and is reported with the destination's address.
 *    Later source connections are then reset too, rather than connected: a 7.2 destination would take a
 *    multifd connection for the main channel.
 * 8. `capturePath` receives the main channel's source→destination bytes as received (before processing), with
 *    the same backpressure (a capture that falls behind pauses the source).
 * 9. Admission: a codec's `openSource` (receive's handshake) decides whether an accepted connection joins the
 *    migration, one connection at a time in accept order (rule 1). A refused connection is reset, takes no
 *    channel index, is not an error of the migration (it is listed in `refused`) and does not end the relay:
 *    otherwise whoever reached the port first (a port scanner, a misdirected QEMU) would end the wait for the real
 *    sender, which would then find nothing listening.
 */
import { createWriteStream, type WriteStream } from "node:fs";
import type { Server, Socket } from "node:net";
import type { Writable } from "node:stream";
import type { ConnectionOptions } from "node:tls";
import { type Endpoint, formatEndpoint, isUnixEndpoint, type TcpEndpoint } from "../transport/endpoint.ts";
import {
  bytesToKernel,
  connect,
  describePeer,
  halfClose,
  listen,
  listeningEndpoint,
  resetSocket,
  type UnixSocketOptions,
} from "../transport/socket.ts";

/** Source→destination bytes of a channel are handed to one of these. */
export interface ChannelProcessor {
  /**
   * Source→destination bytes of the channel; returns the bytes to forward (may be the same Buffer).
   * `chunk` must not be modified in place: it may also be queued for the capture file.
   */
  push(chunk: Buffer): Buffer[];
  /** The source half-closed; returns any final bytes to forward. */
  end(): Buffer[];
}

/** The main channel's processor (the first accepted connection). */
export type MainChannelProcessor = ChannelProcessor;

/** What a codec wants done after it saw some bytes or an end: bytes to write each way, and half-closes. */
export interface CodecOutput {
  toUpstream?: Buffer[];
  toSource?: Buffer[];
  /** Half-close the upstream (destination) side after writing. */
  endUpstream?: boolean;
  /** Half-close the source side after writing. */
  endSource?: boolean;
}

/** How a codec hands over output it makes on its own, outside fromSource/fromUpstream (see ChannelCodec.attach). */
export interface CodecOutlet {
  /** Carried out like a step's return value: the same writes, half-closes and backpressure. */
  emit(output: CodecOutput): void;
  /** Aborts the channel, like a step that throws. */
  fail(error: unknown): void;
}

/**
 * Takes over both directions of one connection (all connections, the main one included): vmprune's own link
 * between `send` and `receive`, where the bytes each way are framed, the connection starts with a handshake, and
 * messages may have to be answered in the direction they came from. The relay keeps its other rules (accept
 * order, no probes, bounded buffers, resets on errors); half-closes are the codec's to decide. A codec method that
 * throws aborts the connection (both sides reset).
 */
export interface ChannelCodec {
  /**
   * Before the upstream connection is opened (e.g. authenticating the source: an unauthenticated peer must not
   * make the relay connect to the destination QEMU). The source socket is paused when this resolves; a rejection
   * refuses the connection (rule 9).
   */
  openSource?(source: Socket): Promise<void>;
  /**
   * After the upstream connection is established and before any byte flows either way (e.g. a handshake).
   * `sourceHeld`: where a codec that pauses the source itself adds that time (ChannelReport.sourceHeldMs).
   */
  open?(sockets: { source: Socket; upstream: Socket; sourceHeld: HeldTime }): Promise<void>;
  /**
   * Once, when bytes start to flow (after `open`): the outlet for output that arises later, on the codec's own
   * time (e.g. when an asynchronous disk read settles). Emitting after the channel closed does nothing.
   */
  attach?(outlet: CodecOutlet): void;
  fromSource(chunk: Buffer): CodecOutput;
  sourceEnded(): CodecOutput;
  fromUpstream(chunk: Buffer): CodecOutput;
  upstreamEnded(): CodecOutput;
  /**
   * One side's connection failed (an error or a reset before its end): the bytes that tell the *other* side's peer
   * why (the link's ERROR frame), written before the relay half-closes that side. Without it, or when it returns
   * undefined, the relay resets the other side, which is all a QEMU peer understands.
   */
  sideFailed?(side: ChannelSide, error: Error): Buffer[] | undefined;
  /** Once, when the channel has closed (both sockets): let go of timers and pending work. */
  closed?(): void;
}

export type ChannelSide = "source" | "destination";

/** How long a peer told of a failure (ChannelCodec.sideFailed) may take to read it and close, before a reset. */
const TOLD_FAILURE_LINGER_MS = 5_000;

/** The plain relay as a codec: the channel through its processor, the return path raw, ends mirrored. */
function processorCodec(processor: ChannelProcessor | undefined): ChannelCodec {
  return {
    fromSource: (chunk) => ({ toUpstream: processor ? processor.push(chunk) : [chunk] }),
    sourceEnded: () => ({ toUpstream: processor?.end() ?? [], endUpstream: true }),
    fromUpstream: (chunk) => ({ toSource: [chunk] }),
    upstreamEnded: () => ({ endSource: true }),
  };
}

export interface RelayOptions {
  /** TCP port 0: any free port (see {@link Relay.endpoint}). */
  listen: Endpoint;
  to: Endpoint;
  /** Mode and owner of a unix-socket `listen` (transport/socket.ts). */
  unixSocket?: UnixSocketOptions;
  /** Called once for the main channel (the first accepted connection). Default: identity (forward as is). */
  createMainProcessor?: () => MainChannelProcessor;
  /**
   * Called once per later connection (index >= 1: multifd channels, or another kind, which the processor tells by
   * their first bytes). Default: forward as is.
   */
  createChannelProcessor?: (index: number) => ChannelProcessor;
  /** Called once per accepted connection (index 0 = main); replaces createMainProcessor's plain relaying. */
  createChannelCodec?: (index: number) => ChannelCodec;
  /** If set, the main channel's source→destination bytes (as received, before processing) are also written to this file. */
  capturePath?: string;
  /**
   * Wraps each accepted connection before admission (TLS, transport/tls.ts): the codec and the channel see the
   * returned socket. A rejection refuses the connection (rule 9), so nothing reaches the destination.
   */
  secureSource?: (source: Socket) => Promise<Socket>;
  /**
   * Connects to `to` over TLS with these options; a channel opens only once the TLS handshake has completed.
   * `describeFailure` turns a TLS error into what the user should check.
   */
  upstreamTls?: { options: ConnectionOptions; describeFailure?: (error: Error) => string };
  /** Upper bound of bytes buffered per direction before the reading side is paused (default 8 MiB). */
  maxBufferedBytes?: number;
  log?: (line: string) => void;
}

/**
 * One relayed connection. `closedBy` names what ended it first: "source" or "destination" (that side sent its
 * EOF first, the normal cases), "source error: CODE" / "destination error: CODE" (reset or other socket error),
 * or "relay: REASON" (connect failure, processor failure, {@link Relay.close}).
 */
export interface ChannelReport {
  index: number;
  kind: "main" | "multifd" | "other";
  /** Bytes written to the destination (after the processor, if the channel has one). */
  bytesToDestination: number;
  /** Bytes of the return path, destination → source. */
  bytesToSource: number;
  closedBy: string;
  /** Bytes received from the source (before the processor). */
  bytesFromSource: number;
  /**
   * How long the source went unread because its destination (or the capture) held the bound of rule 5, or the
   * codec held it (ChannelCodec.open's `sourceHeld`): the time the destination side, not the source, set the pace.
   * On send that is the link, or receive behind it (its reference window included); on receive, the destination
   * QEMU. Milliseconds.
   */
  sourceHeldMs: number;
  /** The same for the return path: how long the destination went unread because the source held the bound. */
  destinationHeldMs: number;
}

export interface RelayReport {
  channels: ChannelReport[];
  /** Every error seen (connect failures, resets, processor or capture failures), joined with "; ". */
  error?: string;
  /** Connections the codec refused before they joined the migration (rule 9): who, and why. Absent if none. */
  refused?: { peer: string; reason: string }[];
  /** From the first accepted connection to the last one closing. */
  durationMs: number;
}

export type ChannelKind = ChannelReport["kind"];

/**
 * Towards the destination, all channels: what the kernel took, and what still waits in the relay's buffers; and
 * what the source has sent the relay so far.
 */
export interface UpstreamDrain {
  sentBytes: number;
  queuedBytes: number;
  receivedBytes: number;
}

/** The first 4 bytes of a multifd channel (`MultiFDInit_t.magic`, §5.1). */
export const MULTIFD_MAGIC = 0x11223344;
/** The first 4 bytes of the main channel, "QEVM" (§3.1). */
export const MAIN_MAGIC = 0x5145564d;
export const DEFAULT_MAX_BUFFERED_BYTES = 8 * 1024 * 1024;

/** What a channel needs from its relay. */
interface ChannelContext {
  to: Endpoint;
  maxBufferedBytes: number;
  log: (line: string) => void;
  /** An earlier upstream connect failed: do not connect any more (rule 7). */
  refuse: () => boolean;
  connectFailed: () => void;
  observeBuffered: (bytes: number) => void;
  upstreamTls: RelayOptions["upstreamTls"];
}

function errorText(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

function errorCode(error: Error): string {
  const code = (error as NodeJS.ErrnoException).code;
  return code ?? error.message;
}

/** True once `writer` should stop being fed: a write returned false and it holds at least `limit` bytes. */
function overLimit(writer: Writable, limit: number): boolean {
  return writer.writableNeedDrain && writer.writableLength >= limit;
}

/**
 * A source paused for its destination resumes once the destination holds less than this share of the bound (rule
 * 5), not only on 'drain' (an empty buffer): a source that starts again after a pause needs time before its
 * bytes come (QEMU walking free pages that a processor prunes), and with nothing queued the link would idle
 * meanwhile (seen on bench:link: ~0.3 s idle per pause at a 64 MiB read-ahead over 1 Gbit/s).
 */
export const RESUME_BELOW_SHARE = 0.5;
/** How often a paused source checks whether its destination went below that share. */
const RESUME_CHECK_MS = 5;

/**
 * Adds up the time a reader spends held: from the first hold that begins until the last one ends, so that holds
 * over the same stretch (the relay's bound and a codec's own, e.g. the link's reference window) count once.
 */
export class HeldTime {
  /** When the running stretch began (meaningful while `#holds` > 0). */
  #since = 0;
  #totalMs = 0;
  #holds = 0;

  begin(): void {
    if (this.#holds++ === 0) this.#since = performance.now();
  }

  end(): void {
    if (this.#holds === 0) return;
    if (--this.#holds === 0) this.#totalMs += performance.now() - this.#since;
  }

  /** Milliseconds held so far, a hold still running included. */
  get ms(): number {
    return this.#totalMs + (this.#holds > 0 ? performance.now() - this.#since : 0);
  }
}

/**
 * Pauses `reader` until `writer` drains (or closes, so that a dead writer never leaves the reader paused), or,
 * with `resumeBelow`, until it holds fewer bytes than that. `holds` is the set of writers the reader currently
 * waits for; it resumes when all have released it. `held`, if given, counts the time the reader was held.
 */
export function hold(
  reader: Pick<Socket, "pause" | "resume" | "destroyed">,
  writer: Writable,
  holds: Set<Writable>,
  { resumeBelow, held }: { resumeBelow?: () => number; held?: HeldTime } = {},
): void {
  if (holds.has(writer)) return;
  // One hold for the reader, however many writers hold it.
  if (holds.size === 0) held?.begin();
  holds.add(writer);
  reader.pause();
  let check: NodeJS.Timeout | undefined;
  const release = () => {
    clearInterval(check);
    writer.off("drain", release);
    writer.off("close", release);
    holds.delete(writer);
    if (holds.size > 0) return;
    held?.end();
    if (!reader.destroyed) reader.resume();
  };
  writer.on("drain", release);
  writer.on("close", release);
  if (resumeBelow) {
    check = setInterval(() => {
      if (writer.writableLength < resumeBelow()) release();
    }, RESUME_CHECK_MS);
    check.unref();
  }
}

/** Tears a socket down so that the peer sees a reset (over TCP), not a clean EOF (transport/socket.ts). */
const reset = resetSocket;

/** A socket that closed after both of its directions ended normally. */
function closedCleanly(socket: Socket): boolean {
  return socket.readableEnded && socket.writableFinished;
}

/** One accepted source connection and its upstream connection to the destination. */
class Channel {
  kind: ChannelKind;
  bytesToDestination = 0;
  bytesToSource = 0;
  bytesFromSource = 0;
  closedBy: string | undefined;
  readonly errors: string[] = [];
  /** Both sockets have closed. */
  isClosed = false;
  /** Resolves when the source socket and the upstream socket (if one was opened) have both closed. */
  readonly closed: Promise<void>;

  readonly #source: Socket;
  #upstream: Socket | undefined;
  /** "pending": waiting for its turn to connect; "none": never connected. */
  #upstreamState: "pending" | "connecting" | "open" | "closed" | "none" = "pending";
  #sourceClosed = false;
  /** Bytes were due to a destination that had closed (see #write). */
  #undeliverable = false;
  /** Sides that were written to after their peer had ended its stream (#endPassedOn). */
  readonly #sentAfterEnd = new Set<ChannelSide>();
  #head: Buffer = Buffer.alloc(0);
  readonly #fromSourceHolds = new Set<Writable>();
  readonly #toSourceHolds = new Set<Writable>();
  readonly #sourceHeld = new HeldTime();
  readonly #destinationHeld = new HeldTime();
  #resolveClosed!: () => void;

  constructor(
    readonly index: number,
    source: Socket,
    private readonly ctx: ChannelContext,
    private readonly codec: ChannelCodec,
    private readonly capture: WriteStream | undefined,
  ) {
    this.kind = index === 0 ? "main" : "other";
    this.#source = source;
    this.closed = new Promise((resolve) => {
      this.#resolveClosed = resolve;
    });
    source.setNoDelay(true);
    source.on("error", (error) => this.#onError("source", error));
    source.on("close", () => {
      this.#sourceClosed = true;
      if (!closedCleanly(source) && this.#upstream && !this.#endPassedOn("source"))
        this.#cutOther("source", this.#upstream);
      this.#checkClosed();
    });
  }

  /** Opens the upstream connection; resolves once it is established or has failed (rule 1). */
  async connect(): Promise<void> {
    const source = this.#source;
    if (source.destroyed || this.ctx.refuse()) {
      this.#upstreamState = "none";
      if (!source.destroyed) {
        this.#end("relay: not connected, an earlier upstream connection failed");
        reset(source);
      }
      this.#checkClosed();
      return Promise.resolve();
    }
    const to = formatEndpoint(this.ctx.to);
    return new Promise((resolve) => {
      this.#upstreamState = "connecting";
      const tls = this.ctx.upstreamTls;
      const upstream = connect(this.ctx.to, {
        allowHalfOpen: true,
        noDelay: true,
        ...(tls ? { tls: tls.options } : {}),
      });
      this.#upstream = upstream;
      // Over TLS the channel is open only once the peer is verified: a failed TLS handshake is a failed connect.
      upstream.once(tls ? "secureConnect" : "connect", () => {
        this.#upstreamState = "open";
        resolve();
        this.#established(upstream);
      });
      upstream.on("error", (error) => {
        if (this.#upstreamState === "connecting") {
          resolve();
          const code = errorCode(error);
          const why = tls?.describeFailure ? tls.describeFailure(error) : `${code} (${error.message})`;
          this.errors.push(`cannot connect to destination ${to}: ${why}`);
          this.#end("relay: cannot connect to destination");
          this.ctx.connectFailed();
          this.ctx.log(`relay #${this.index}: cannot connect to ${to}: ${why}`);
          reset(source);
        } else this.#onError("destination", error);
      });
      upstream.on("close", () => {
        resolve(); // destroyed while connecting
        this.#upstreamState = "closed";
        if (!closedCleanly(upstream) && !this.#endPassedOn("destination"))
          this.#cutOther("destination", source);
        this.#checkClosed();
      });
    });
  }

  /** Destroys both sockets (processor failure, {@link Relay.close}). */
  abort(reason: string): void {
    this.#end(`relay: ${reason}`);
    if (this.#upstream) reset(this.#upstream);
    reset(this.#source);
  }

  /** Bytes waiting in this channel's user-space buffers. */
  buffered(): number {
    const up = this.#upstream;
    const source = this.#source;
    return source.writableLength + source.readableLength + (up ? up.writableLength + up.readableLength : 0);
  }

  /** Upstream bytes handed to the kernel so far, and bytes still queued in user space (waiting for the link). */
  upstreamDrain(): UpstreamDrain {
    const up = this.#upstream;
    const receivedBytes = this.bytesFromSource;
    if (!up) return { sentBytes: 0, queuedBytes: 0, receivedBytes };
    return { sentBytes: bytesToKernel(up), queuedBytes: up.writableLength, receivedBytes };
  }

  report(): ChannelReport {
    return {
      index: this.index,
      kind: this.kind,
      bytesToDestination: this.bytesToDestination,
      bytesToSource: this.bytesToSource,
      closedBy: this.closedBy ?? "open",
      bytesFromSource: this.bytesFromSource,
      sourceHeldMs: Math.round(this.#sourceHeld.ms),
      destinationHeldMs: Math.round(this.#destinationHeld.ms),
    };
  }

  #established(upstream: Socket): void {
    const source = this.#source;
    this.ctx.log(`relay #${this.index}: connected to ${formatEndpoint(this.ctx.to)}`);
    if (source.destroyed) {
      upstream.destroy();
      return;
    }
    upstream.setNoDelay(true);
    const opening = this.codec.open
      ? this.codec.open({ source, upstream, sourceHeld: this.#sourceHeld })
      : Promise.resolve();
    opening.then(
      () => this.#flow(upstream),
      (error: unknown) => {
        this.errors.push(`channel #${this.index} could not be opened: ${errorText(error)}`);
        this.ctx.log(`relay #${this.index}: could not be opened: ${errorText(error)}`);
        this.abort("open failed");
      },
    );
  }

  /** Wires both directions through the codec and lets the source's bytes flow. */
  #flow(upstream: Socket): void {
    const source = this.#source;
    if (source.destroyed || upstream.destroyed) return;
    this.codec.attach?.({
      emit: (output) => {
        if (!this.isClosed) this.#apply(upstream, () => output);
      },
      fail: (error) => {
        if (!this.isClosed) this.processorFailed(error);
      },
    });
    // Return path: as it arrives (rule 3).
    upstream.on("data", (chunk: Buffer) => this.#apply(upstream, () => this.codec.fromUpstream(chunk)));
    upstream.on("end", () => {
      this.#end("destination");
      this.ctx.log(`relay #${this.index}: destination sent EOF`);
      this.#apply(upstream, () => this.codec.upstreamEnded());
    });
    source.on("data", (chunk: Buffer) => this.#fromSource(chunk, upstream));
    source.on("end", () => {
      this.#end("source");
      this.ctx.log(`relay #${this.index}: source sent EOF after ${this.bytesFromSource} bytes`);
      this.capture?.end();
      this.#apply(upstream, () => this.codec.sourceEnded());
    });
    // A codec's handshake may have left either socket paused (with unread bytes put back).
    upstream.resume();
    source.resume();
  }

  #fromSource(chunk: Buffer, upstream: Socket): void {
    this.bytesFromSource += chunk.length;
    if (this.#head.length < 4) this.#classify(chunk);
    const capture = this.capture;
    if (capture && !capture.destroyed && !capture.writableEnded) {
      if (!capture.write(chunk) && overLimit(capture, this.ctx.maxBufferedBytes))
        hold(this.#source, capture, this.#fromSourceHolds, { held: this.#sourceHeld });
    }
    this.#apply(upstream, () => this.codec.fromSource(chunk));
  }

  /** Runs a codec step and carries out its output; a codec that throws aborts the channel. */
  #apply(upstream: Socket, step: () => CodecOutput): void {
    let out: CodecOutput;
    try {
      out = step();
    } catch (error) {
      this.processorFailed(error);
      return;
    }
    const source = this.#source;
    if (out.toUpstream && this.#write(upstream, out.toUpstream))
      hold(source, upstream, this.#fromSourceHolds, {
        resumeBelow: () => this.ctx.maxBufferedBytes * RESUME_BELOW_SHARE,
        held: this.#sourceHeld,
      });
    if (out.toSource && !source.destroyed && !source.writableEnded) {
      let full = false;
      for (const chunk of out.toSource) {
        if (chunk.length === 0) continue;
        this.#sending("source", source, chunk.length);
        this.bytesToSource += chunk.length;
        full = !source.write(chunk) || full;
      }
      if (full && overLimit(source, this.ctx.maxBufferedBytes)) {
        this.ctx.observeBuffered(source.writableLength);
        hold(upstream, source, this.#toSourceHolds, { held: this.#destinationHeld });
      }
    }
    if (out.endUpstream && !upstream.destroyed && !upstream.writableEnded) halfClose(upstream);
    if (out.endSource && !source.destroyed && !source.writableEnded) halfClose(source);
  }

  /** Writes `chunks` to the destination; true if the source must pause. */
  #write(upstream: Socket, chunks: Buffer[]): boolean {
    if (upstream.destroyed && !this.#undeliverable) {
      const bytes = chunks.reduce((n, c) => n + c.length, 0);
      if (bytes > 0) {
        // The destination closed after its end (#endPassedOn) and the source still sends: these bytes cannot
        // arrive, so the source must hear of it (a reset) rather than finish as if they had.
        this.#undeliverable = true;
        this.#end("destination gone");
        this.errors.push(`channel #${this.index}: ${bytes} bytes for the destination after it had closed`);
        this.ctx.log(
          `relay #${this.index}: the destination has closed, the source still sends: resetting it`,
        );
        reset(this.#source);
      }
    }
    if (upstream.destroyed || upstream.writableEnded) return false;
    const corked = chunks.length > 1;
    if (corked) upstream.cork();
    for (const chunk of chunks) {
      if (chunk.length === 0) continue;
      this.#sending("destination", upstream, chunk.length);
      this.bytesToDestination += chunk.length;
      upstream.write(chunk);
    }
    if (corked) upstream.uncork();
    if (!overLimit(upstream, this.ctx.maxBufferedBytes)) return false;
    this.ctx.observeBuffered(upstream.writableLength);
    return true;
  }

  #classify(chunk: Buffer): void {
    this.#head = Buffer.concat([this.#head, chunk.subarray(0, 4 - this.#head.length)]);
    if (this.#head.length < 4) return;
    const magic = this.#head.readUInt32BE(0);
    if (this.index === 0) {
      if (magic !== MAIN_MAGIC)
        this.ctx.log(`relay #0: main channel starts with ${this.#head.toString("hex")}, not QEVM`);
    } else this.kind = magic === MULTIFD_MAGIC ? "multifd" : "other";
  }

  /** The processor threw: the channel cannot go on (a processor that gives up should pass bytes through instead). */
  processorFailed(error: unknown): void {
    const message = `${this.index === 0 ? "main channel processor" : `channel #${this.index} codec`} failed: ${errorText(error)}`;
    this.errors.push(message);
    this.ctx.log(`relay #${this.index}: ${message}`);
    this.abort("processor failed");
  }

  #onError(side: ChannelSide, error: Error): void {
    if (this.#endPassedOn(side)) {
      // The peer had ended its side and the codec had passed that end on: the channel was finished that way, and
      // a reset after it is how the peer closed (QEMU closing a unix socket with bytes unread gives ECONNRESET).
      // Resetting the other side now would destroy the end already on its way there (e.g. the link's EOF frame).
      this.ctx.log(
        `relay #${this.index}: ${side} ${errorCode(error)} after its end: the channel had finished`,
      );
      return;
    }
    const other = side === "source" ? this.#upstream : this.#source;
    if (other && this.#endFramedOnOther(side)) {
      this.#letOtherDrain(side, other, error);
      return;
    }
    this.#end(`${side} error: ${errorCode(error)}`);
    this.errors.push(`${side} side of channel #${this.index}: ${error.message}`);
    this.ctx.log(`relay #${this.index}: ${side} error: ${error.message}`);
    if (!other) return;
    const told = other.destroyed || other.writableEnded ? undefined : this.codec.sideFailed?.(side, error);
    if (!told) {
      reset(other);
      return;
    }
    for (const chunk of told) other.write(chunk);
    halfClose(other);
    setTimeout(() => reset(other), TOLD_FAILURE_LINGER_MS).unref();
  }

  /**
   * `side`'s peer ended its stream and the codec already passed that end on, framed, to the other side (the link's
   * EOF: a codec that tells failures, ChannelCodec.sideFailed, frames its ends too), which is now half-closed; but
   * bytes still went to `side` after its end, and `side` then closed uncleanly (a QEMU closing a multifd channel
   * with its last bytes unread, once the migration is done). The other peer has its end, and a reset of the other
   * side now would only destroy that end still queued for it (issue 11, leg 3: send then failed a migration QEMU
   * had completed, "receive closed the link before its EOF").
   */
  #endFramedOnOther(side: ChannelSide): boolean {
    const from = side === "source" ? this.#source : this.#upstream;
    const to = side === "source" ? this.#upstream : this.#source;
    if (this.codec.sideFailed === undefined || !from?.readableEnded || !to) return false;
    return to.writableEnded && !to.destroyed;
  }

  /**
   * `side` closed uncleanly: destroy the other side, unless its end already went to it framed
   * (#endFramedOnOther): then it drains what it holds and closes on its own, reset only if it has not after
   * TOLD_FAILURE_LINGER_MS.
   */
  #cutOther(side: ChannelSide, other: Socket): void {
    if (this.#endFramedOnOther(side)) this.#letOtherDrain(side, other);
    else other.destroy();
  }

  /** #endFramedOnOther holds: the other side drains and closes on its own, reset after TOLD_FAILURE_LINGER_MS. */
  #letOtherDrain(side: ChannelSide, other: Socket, error?: Error): void {
    this.ctx.log(
      `relay #${this.index}: ${side} ${error ? errorCode(error) : "closed"} after its end, with bytes sent to it ` +
        "after that end unread; its end had already gone on, framed: the other side drains and closes",
    );
    setTimeout(() => reset(other), TOLD_FAILURE_LINGER_MS).unref();
  }

  /**
   * `side`'s peer ended its stream, the codec half-closed the other side after it, and no byte went to that peer
   * after its end: the channel was finished both ways.
   */
  #endPassedOn(side: ChannelSide): boolean {
    const from = side === "source" ? this.#source : this.#upstream;
    const to = side === "source" ? this.#upstream : this.#source;
    if (from === undefined || to === undefined || !from.readableEnded || !to.writableEnded) return false;
    return !this.#sentAfterEnd.has(side);
  }

  /** Notes bytes written to `side` after its peer ended its stream (they may never be read). */
  #sending(side: ChannelSide, socket: Socket, bytes: number): void {
    if (bytes > 0 && socket.readableEnded) this.#sentAfterEnd.add(side);
  }

  /** Records what ended the channel first. */
  #end(reason: string): void {
    this.closedBy ??= reason;
  }

  #checkClosed(): void {
    const upstreamDone = this.#upstreamState === "closed" || this.#upstreamState === "none";
    if (!this.#sourceClosed || !upstreamDone || this.isClosed) return;
    this.isClosed = true;
    try {
      this.codec.closed?.();
    } catch (error) {
      this.ctx.log(`relay #${this.index}: codec failed to close: ${errorText(error)}`);
    }
    this.#resolveClosed();
  }
}

/**
 * Thrown by a codec's `openSource` that has already told its peer why (e.g. an ERROR frame) and closes the socket
 * itself: the relay records the refusal but does not reset the socket, so the peer can read the reason.
 */
export class ToldPeerError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "ToldPeerError";
  }
}

/** A relay without a listener of its own ({@link Relay.detached}): connections are handed to it. */
export type DetachedRelayOptions = Omit<RelayOptions, "listen" | "unixSocket">;

export class Relay {
  /**
   * Resolves when the migration's connections are all closed (after at least one was accepted), with the
   * report; never rejects (errors go in report.error). Also resolves after {@link close}.
   */
  readonly done: Promise<RelayReport>;

  /** Absent for a detached relay (a receive service owns the listener). */
  readonly #server: Server | undefined;
  readonly #options: DetachedRelayOptions;
  #maxBufferedBytes: number;
  readonly #log: (line: string) => void;
  readonly #channels: Channel[] = [];
  readonly #errors: string[] = [];
  readonly #refused: { peer: string; reason: string }[] = [];
  /** Accepted connections not yet admitted or refused (rule 9): each waits for its turn in #connectChain. */
  readonly #waiting = new Set<Socket>();
  /** A waiting connection's secured socket (RelayOptions.secureSource), once it has one: what close() resets. */
  readonly #secured = new Map<Socket, Socket>();
  #closing = false;
  /** Settles when the last accepted channel's upstream connect has settled (rule 1). */
  #connectChain: Promise<void> = Promise.resolve();
  #connectFailed = false;
  #capture: WriteStream | undefined;
  #firstAcceptAt: number | undefined;
  #finishing = false;
  #peakBuffered = 0;
  #resolveDone!: (report: RelayReport) => void;

  #endpoint: Endpoint = { host: "", port: 0 };

  private constructor(server: Server | undefined, options: DetachedRelayOptions) {
    this.#server = server;
    this.#options = options;
    this.#maxBufferedBytes = options.maxBufferedBytes ?? DEFAULT_MAX_BUFFERED_BYTES;
    this.#log = options.log ?? (() => {});
    this.done = new Promise((resolve) => {
      this.#resolveDone = resolve;
    });
    server?.on("connection", (socket: Socket) => this.#accept(socket));
    server?.on("error", (error) => {
      this.#errors.push(`listener: ${error.message}`);
      this.#log(`relay: listener error: ${error.message}`);
    });
  }

  /** Listens on `options.listen`; resolves once listening. */
  static async start(options: RelayOptions): Promise<Relay> {
    // pauseOnConnect: nothing is read from a source connection before its upstream connection is established.
    const server = await listen(options.listen, {
      allowHalfOpen: true,
      pauseOnConnect: true,
      noDelay: true,
      ...options.unixSocket,
    });
    const relay = new Relay(server, options);
    relay.#endpoint = listeningEndpoint(server, options.listen);
    relay.#log(`relay: listening on ${formatEndpoint(relay.endpoint)}`);
    return relay;
  }

  /**
   * One migration's relay without a listener: whoever accepted the connections (migrate/receive-service.ts)
   * hands them over with {@link offer}, paused, in channel order. Everything else is as with {@link start}.
   */
  static detached(options: DetachedRelayOptions): Relay {
    return new Relay(undefined, options);
  }

  /**
   * Detached relays: takes an accepted connection (paused, nothing read from it that was not put back) as the
   * next channel; the order of the calls is the channels' order. After `done`, a connection is destroyed.
   */
  offer(source: Socket): void {
    if (this.#server) throw new Error("offer() is for detached relays: this one accepts on its own listener");
    this.#accept(source);
  }

  /** Where the relay actually listens (a TCP port 0 resolved). */
  get endpoint(): Endpoint {
    return this.#endpoint;
  }

  /** The actual TCP listening address; a relay on a unix socket has none (use {@link endpoint}). */
  get address(): TcpEndpoint {
    const endpoint = this.#endpoint;
    if (isUnixEndpoint(endpoint))
      throw new Error(`the relay listens on unix socket ${endpoint.path}, which has no TCP address`);
    return endpoint;
  }

  /**
   * Diagnostics: `bufferedBytes`, what the relay's sockets (and the capture stream) hold in user space now;
   * `peakDirectionBytes`, the most one direction held when its reader was paused (0 if it never was).
   */
  bufferStats(): { bufferedBytes: number; peakDirectionBytes: number } {
    let bufferedBytes = this.#capture?.writableLength ?? 0;
    for (const channel of this.#channels) bufferedBytes += channel.buffered();
    return { bufferedBytes, peakDirectionBytes: this.#peakBuffered };
  }

  /** The bound of rule 5 now (bytes a channel's writer may hold before its reader pauses). */
  get maxBufferedBytes(): number {
    return this.#maxBufferedBytes;
  }

  /** Changes the bound of rule 5 for every channel from now on (a reader paused under the old one resumes on
   *  'drain' as before). */
  setMaxBufferedBytes(bytes: number): void {
    if (!(bytes > 0)) throw new RangeError(`maxBufferedBytes must be positive, not ${bytes}`);
    this.#maxBufferedBytes = bytes;
  }

  /** Upstream bytes so far, summed over channels (see {@link UpstreamDrain}): lets a caller measure the link. */
  upstreamDrain(): UpstreamDrain {
    const total = { sentBytes: 0, queuedBytes: 0, receivedBytes: 0 };
    for (const channel of this.#channels) {
      const d = channel.upstreamDrain();
      total.sentBytes += d.sentBytes;
      total.queuedBytes += d.queuedBytes;
      total.receivedBytes += d.receivedBytes;
    }
    return total;
  }

  /** Stops listening and destroys any connections; `done` then resolves. */
  async close(): Promise<void> {
    if (!this.#finishing && !this.#closing) {
      this.#closing = true;
      this.#stopListening();
      for (const socket of this.#waiting) reset(this.#secured.get(socket) ?? socket);
      if (this.#channels.length === 0) this.#errors.push("relay closed before any connection was accepted");
      for (const channel of this.#channels) channel.abort("closed");
      this.#checkFinished();
    }
    await this.done;
  }

  #accept(source: Socket): void {
    if (this.#finishing || this.#closing) {
      source.destroy();
      return;
    }
    // Until it is a channel, an error (a reset while it waits) must not become an uncaught 'error'.
    const onWaitingError = () => {};
    source.on("error", onWaitingError);
    this.#waiting.add(source);
    this.#connectChain = this.#connectChain.then(async () => {
      try {
        await this.#admit(source, onWaitingError);
      } finally {
        this.#waiting.delete(source);
        this.#secured.delete(source);
        this.#checkFinished();
      }
    });
  }

  /** Rule 9 (then rule 1): runs the codec's admission, and makes an admitted connection a channel. */
  async #admit(source: Socket, onWaitingError: () => void): Promise<void> {
    if (this.#finishing || this.#closing || source.destroyed) {
      source.destroy();
      return;
    }
    // Every earlier connection has been admitted or refused by now: the index is the channel's place.
    const index = this.#channels.length;
    const peer = describePeer(source);
    const main = index === 0;
    let codec: ChannelCodec = processorCodec(undefined);
    let processorError: unknown;
    try {
      if (this.#options.createChannelCodec) codec = this.#options.createChannelCodec(index);
      else if (main) codec = processorCodec(this.#options.createMainProcessor?.());
      else codec = processorCodec(this.#options.createChannelProcessor?.(index));
    } catch (error) {
      processorError = error;
    }
    if (processorError === undefined && this.#options.secureSource) {
      const raw = source;
      try {
        source = await this.#options.secureSource(raw);
      } catch (error) {
        const reason = errorText(error);
        this.#refused.push({ peer, reason });
        this.#log(`relay: refused ${peer}: ${reason}`);
        reset(raw);
        return;
      }
      // The secured socket is the connection from now on: its errors are what the waiting handler must swallow.
      if (source !== raw) {
        source.on("error", onWaitingError);
        this.#secured.set(raw, source);
      }
      if (this.#finishing || this.#closing || source.destroyed) {
        source.destroy();
        return;
      }
    }
    if (processorError === undefined && codec.openSource) {
      try {
        await codec.openSource(source);
      } catch (error) {
        const reason = errorText(error);
        this.#refused.push({ peer, reason });
        this.#log(`relay: refused ${peer}: ${reason}`);
        if (!(error instanceof ToldPeerError)) reset(source);
        return;
      }
      if (this.#finishing || this.#closing || source.destroyed) {
        source.destroy();
        return;
      }
    }
    this.#firstAcceptAt ??= performance.now();
    this.#log(`relay #${index}: accepted ${peer}`);
    if (main && this.#options.capturePath) {
      const path = this.#options.capturePath;
      const capture = createWriteStream(path);
      capture.on("error", (error) => {
        this.#errors.push(`capture ${path}: ${error.message}`);
        this.#log(`relay: capture ${path}: ${error.message}`);
      });
      this.#capture = capture;
    }
    const relay = this;
    const context: ChannelContext = {
      to: this.#options.to,
      get maxBufferedBytes() {
        return relay.#maxBufferedBytes;
      },
      log: this.#log,
      refuse: () => this.#connectFailed,
      connectFailed: () => {
        this.#connectFailed = true;
      },
      observeBuffered: (bytes) => {
        if (bytes > this.#peakBuffered) this.#peakBuffered = bytes;
      },
      upstreamTls: this.#options.upstreamTls,
    };
    const channel = new Channel(index, source, context, codec, main ? this.#capture : undefined);
    this.#channels.push(channel);
    source.off("error", onWaitingError);
    void channel.closed.then(() => {
      this.#log(`relay #${index}: closed (${channel.closedBy ?? "?"})`);
      this.#checkFinished();
    });
    // A failed processor destroys the source; connect() then only marks the channel closed.
    if (processorError !== undefined) channel.processorFailed(processorError);
    await channel.connect();
  }

  /** Rule 6: done once every admitted channel has closed and nothing waits for admission (or on close). */
  #checkFinished(): void {
    if (this.#finishing || this.#waiting.size > 0) return;
    if (!this.#channels.every((c) => c.isClosed)) return;
    if (this.#channels.length > 0 || this.#closing) void this.#finish();
  }

  #stopListening(): void {
    if (this.#server?.listening) this.#server.close();
  }

  async #finish(): Promise<void> {
    if (this.#finishing) return;
    this.#finishing = true;
    this.#stopListening();
    const capture = this.#capture;
    if (capture && !capture.closed) {
      await new Promise<void>((resolve) => {
        capture.once("close", resolve);
        if (!capture.writableEnded) capture.end();
      });
    }
    const errors = [...this.#channels.flatMap((c) => c.errors), ...this.#errors];
    const report: RelayReport = {
      channels: this.#channels.map((c) => c.report()),
      durationMs: this.#firstAcceptAt === undefined ? 0 : performance.now() - this.#firstAcceptAt,
    };
    if (errors.length > 0) report.error = errors.join("; ");
    if (this.#refused.length > 0) report.refused = [...this.#refused];
    this.#resolveDone(report);
  }
}
