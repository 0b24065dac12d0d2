/**
 * receive's core (protocol.ts, stream rules 1-4), without sockets: turns the stream messages from send (DATA,
 * REF, PAGE_DATA, EOF, in link order) back into the exact QEMU stream for the destination QEMU, and says which
 * NACKs and ACKs to send back. A REF is resolved the moment it arrives through the injected `resolveRef` (block
 * read + hash check); a REF it cannot resolve is NACKed, and nothing after it is released until PAGE_DATA for it
 * arrives. Held output is bounded by the window receive announced: send breaking the window is a
 * `window-exceeded` LinkError, never unbounded memory (pausing the link instead would deadlock, see rule 3).
 *
 * Resolution may be asynchronous (a disk read through NBD): `resolveRef` returns a Promise, and the REF is held
 * like a NACKed one until it settles, so the stream keeps its order while any number of reads are in flight
 * (all bounded by the window, as every held byte is). What a settled read releases (bytes for QEMU, its NACK or
 * an ACK, the end) is handed to `emit`, in order, after push() has returned. A read that does not settle within
 * `resolveTimeoutMs` is NACKed (READ_FAILED) and its late answer ignored, so a hung disk costs full pages, not
 * the migration.
 */
import { LinkError } from "./errors.ts";
import {
  type Ack,
  type Data,
  type Message,
  MSG,
  messageName,
  NACK_REASON,
  type Nack,
  PAGE_BYTES,
  type Ref,
  type RefFs,
  WINDOW_SLACK_BYTES,
} from "./protocol.ts";

/**
 * Reads disk block `blockNumber` and returns its 4096 bytes if their SHA-256 equals `hash`; null if it does not,
 * or the block does not exist; or a Promise of either. The Buffer must be its own (it is kept until written). A
 * throw or a rejection counts as a read failure (NACK with READ_FAILED), not as a link failure. `hash` is only
 * valid during the call (a view of the socket's chunk): copy it to keep it.
 */
export type RefResolver = (blockNumber: number, hash: Buffer) => Buffer | null | Promise<Buffer | null>;

/** As {@link RefResolver}, for a REF_FS: the page at `blockNumber` sectors into filesystem `filesystem`. */
export type RefFsResolver = (ref: RefFs) => Buffer | null | Promise<Buffer | null>;

/** How long an asynchronous resolution may take before its REF is NACKed (READ_FAILED). */
export const DEFAULT_RESOLVE_TIMEOUT_MS = 10_000;

export interface ReassemblerOptions {
  resolveRef: RefResolver;
  /** REF_FS (link 1.2): only when receive offered it (its disks' filesystems are known); else REF_FS fails the link. */
  resolveRefFs?: RefFsResolver;
  /** The window receive announced in its HELLO (LinkSession.windowBytes). */
  windowBytes: number;
  /**
   * Output that arises after push() returned, when asynchronous resolutions settle (never called from inside
   * push()). Required if `resolveRef` may return a Promise.
   */
  emit?: (output: ReassemblerOutput) => void;
  /** The link must fail, found after push() returned (a read NACKed after send closed the link). */
  fail?: (error: LinkError) => void;
  /** See {@link DEFAULT_RESOLVE_TIMEOUT_MS}. */
  resolveTimeoutMs?: number;
}

export interface ReassemblerOutput {
  /** Bytes for the destination QEMU, in order (write them corked). */
  toQemu: Buffer[];
  /** NACKs (as REFs fail) and at most one ACK (last), for send, in order. */
  toSend: Array<Nack | Ack>;
  /** send's EOF was reached in order: end the destination QEMU socket after writing `toQemu`. */
  end: boolean;
}

export interface ReassemblerStats {
  /** REFs rebuilt from the disk. */
  refsResolved: number;
  /** REFs NACKed (each answered by PAGE_DATA, or still outstanding). */
  refsNacked: number;
  /** NACKed REFs whose PAGE_DATA arrived. */
  pagesReceived: number;
  /** Resolver throws (each also counted in refsNacked). */
  readFailures: number;
  /** DATA payload bytes received. */
  dataBytes: number;
  /** Bytes handed out for the destination QEMU. */
  bytesToQemu: number;
  /** The most output bytes ever held behind an unsettled REF. */
  peakHeldBytes: number;
  /** Asynchronous resolutions NACKed because they took longer than the timeout (also in readFailures). */
  readTimeouts: number;
  /** The most asynchronous resolutions ever in flight at once. */
  peakPendingReads: number;
}

/** All counters at zero (also the start of a sum over several connections). */
export function emptyReassemblerStats(): ReassemblerStats {
  return {
    refsResolved: 0,
    refsNacked: 0,
    pagesReceived: 0,
    readFailures: 0,
    dataBytes: 0,
    bytesToQemu: 0,
    peakHeldBytes: 0,
    readTimeouts: 0,
    peakPendingReads: 0,
  };
}

type Held =
  | { kind: "bytes"; bytes: Buffer }
  /** `pending`: its asynchronous resolution has not settled yet (else, without a page, it waits for PAGE_DATA). */
  | { kind: "ref"; refId: number; pageHeader: Buffer; page: Buffer | null; pending: boolean }
  | { kind: "eof" };

type HeldRef = Extract<Held, { kind: "ref" }>;

function isPromise<T>(value: T | Promise<T>): value is Promise<T> {
  return typeof (value as Promise<T> | null)?.then === "function";
}

export class RefReassembler {
  readonly #resolveRef: RefResolver;
  readonly #resolveRefFs: RefFsResolver | undefined;
  readonly #limitBytes: number;
  readonly #emitLater: ((output: ReassemblerOutput) => void) | undefined;
  readonly #failLater: ((error: LinkError) => void) | undefined;
  readonly #resolveTimeoutMs: number;
  /** Asynchronous resolutions in flight, with their timeouts. */
  readonly #pending = new Map<HeldRef, NodeJS.Timeout>();
  /** send's side of the link ended: no PAGE_DATA can come any more. */
  #inputEnded = false;
  /** close() was called, or the link failed: settling reads are ignored. */
  #stopped = false;
  /** See #settledOutput. */
  #settling: ReassemblerOutput | undefined;
  /** Output waiting behind the first unsettled REF (which is #held[0] whenever #held is not empty). */
  #held: Held[] = [];
  #heldHead = 0;
  #heldBytes = 0;
  /** NACKed REFs waiting for PAGE_DATA. */
  readonly #awaiting = new Map<number, HeldRef>();
  #lastRefId = 0;
  /** Highest refId written out (all below it were written before it). */
  #settledRefId = 0;
  #ackedRefId = 0;
  #eofSeen = false;
  #ended = false;
  readonly #stats: ReassemblerStats = emptyReassemblerStats();

  constructor(options: ReassemblerOptions) {
    this.#resolveRef = options.resolveRef;
    this.#resolveRefFs = options.resolveRefFs;
    this.#limitBytes = options.windowBytes + WINDOW_SLACK_BYTES;
    this.#emitLater = options.emit;
    this.#failLater = options.fail;
    this.#resolveTimeoutMs = options.resolveTimeoutMs ?? DEFAULT_RESOLVE_TIMEOUT_MS;
  }

  /** Output bytes held behind an unsettled REF. */
  get heldBytes(): number {
    return this.#heldBytes;
  }

  /** NACKed REFs still waiting for PAGE_DATA. */
  get awaitingPages(): number {
    return this.#awaiting.size;
  }

  /** Asynchronous resolutions not settled yet. */
  get pendingReads(): number {
    return this.#pending.size;
  }

  /** send's EOF was passed on: the destination stream is complete. */
  get ended(): boolean {
    return this.#ended;
  }

  /** send's EOF has arrived (it may still wait behind unsettled REFs: see {@link ended}). */
  get eofSeen(): boolean {
    return this.#eofSeen;
  }

  /**
   * send's side of the link ended (nothing more will be pushed). Fine if send's EOF came and nothing waits for
   * PAGE_DATA: pending reads then finish the stream through `emit`. Otherwise a LinkError: the stream can never
   * be completed (and a read NACKed later fails the link through `fail`).
   */
  inputEnded(): void {
    this.#inputEnded = true;
    if (!this.#eofSeen) throw this.#stop(new LinkError("closed", "send closed the link before its EOF"));
    if (this.#awaiting.size > 0)
      throw this.#stop(
        new LinkError(
          "closed",
          `send closed the link with ${this.#awaiting.size} NACKed REF(s) unanswered (no PAGE_DATA can follow)`,
        ),
      );
  }

  /** Stops: pending reads are abandoned (their timeouts cleared, their answers ignored). Idempotent. */
  close(): void {
    this.#stop(undefined);
  }

  #stop<E extends LinkError | undefined>(error: E): E {
    this.#stopped = true;
    for (const timer of this.#pending.values()) clearTimeout(timer);
    this.#pending.clear();
    return error;
  }

  get stats(): Readonly<ReassemblerStats> {
    return { ...this.#stats };
  }

  /**
   * Takes the next messages from send, in link order (one socket read's worth, so that one ACK covers them).
   * Throws a LinkError when send breaks a rule: a message that send may not send, a REF out of order,
   * PAGE_DATA for a REF that was not NACKed, stream messages after EOF, or more held bytes than the window.
   * ERROR is not for this: the caller aborts on it. After a throw the reassembler is unusable (fail the link).
   */
  push(messages: readonly Message[]): ReassemblerOutput {
    const out: ReassemblerOutput = { toQemu: [], toSend: [], end: false };
    for (const message of messages) {
      switch (message.type) {
        case MSG.DATA:
          this.#data(message, out);
          break;
        case MSG.ZEROS:
          // Pages of zeros written in place (free pages in a multifd packet): bytes like DATA's, made here.
          this.#data({ type: MSG.DATA, bytes: Buffer.alloc(message.pages * PAGE_BYTES) }, out);
          break;
        case MSG.REF:
        case MSG.REF_FS:
          this.#ref(message, out);
          break;
        case MSG.PAGE_DATA: {
          const held = this.#awaiting.get(message.refId);
          if (!held)
            throw new LinkError(
              "unknown-ref",
              `PAGE_DATA for ref ${message.refId}, which is not waiting for one (never NACKed, or already answered)`,
            );
          this.#awaiting.delete(message.refId);
          held.page = Buffer.from(message.page); // kept beyond this read: no view into the socket's chunk
          this.#stats.pagesReceived++;
          this.#flush(out);
          break;
        }
        case MSG.EOF:
          this.#streamMessage("EOF");
          this.#eofSeen = true;
          this.#hold({ kind: "eof" }, 0);
          this.#flush(out);
          break;
        default:
          throw new LinkError(
            "unexpected-message",
            `${messageName(message.type)} from send after the handshake`,
          );
      }
    }
    this.#ack(out);
    return out;
  }

  /** Rule 4: one ACK after a batch that settled at least one REF. */
  #ack(out: ReassemblerOutput): void {
    if (this.#settledRefId > this.#ackedRefId) {
      this.#ackedRefId = this.#settledRefId;
      out.toSend.push({ type: MSG.ACK, refId: this.#settledRefId });
    }
  }

  #streamMessage(name: string): void {
    if (this.#eofSeen) throw new LinkError("unexpected-message", `${name} after send's EOF`);
  }

  #data(message: Data, out: ReassemblerOutput): void {
    this.#streamMessage("DATA");
    this.#stats.dataBytes += message.bytes.length;
    if (!this.#isHolding()) {
      this.#emit(out, message.bytes);
      return;
    }
    this.#admit(message.bytes.length);
    this.#hold({ kind: "bytes", bytes: Buffer.from(message.bytes) }, message.bytes.length);
  }

  #ref(message: Ref | RefFs, out: ReassemblerOutput): void {
    const name = messageName(message.type);
    this.#streamMessage(name);
    const resolveRefFs = this.#resolveRefFs;
    if (message.type === MSG.REF_FS && !resolveRefFs)
      throw new LinkError(
        "unexpected-message",
        "REF_FS from send, which receive did not offer (ref-fs-sha256)",
      );
    if (message.refId <= this.#lastRefId)
      throw new LinkError(
        "unknown-ref",
        `${name} ${message.refId} after ref ${this.#lastRefId}: refIds must increase (stream rule 2)`,
      );
    this.#lastRefId = message.refId;
    const outputBytes = message.pageHeader.length + PAGE_BYTES;
    if (this.#isHolding()) this.#admit(outputBytes);
    let resolution: Buffer | null | Promise<Buffer | null>;
    try {
      resolution =
        message.type === MSG.REF_FS && resolveRefFs
          ? resolveRefFs(message)
          : this.#resolveRef(message.blockNumber, message.hash);
    } catch {
      this.#stats.readFailures++;
      this.#settleNow(message, null, NACK_REASON.READ_FAILED, out);
      return;
    }
    if (!isPromise(resolution)) {
      this.#settleNow(message, resolution, NACK_REASON.UNVERIFIED, out);
      return;
    }
    if (!this.#emitLater)
      throw new TypeError("resolveRef returned a Promise, and the reassembler has no emit for later output");
    const held: HeldRef = {
      kind: "ref",
      refId: message.refId,
      pageHeader: Buffer.from(message.pageHeader),
      page: null,
      pending: true,
    };
    this.#hold(held, outputBytes);
    const timer = setTimeout(() => this.#settleLater(held, null, "timeout"), this.#resolveTimeoutMs);
    this.#pending.set(held, timer);
    if (this.#pending.size > this.#stats.peakPendingReads) this.#stats.peakPendingReads = this.#pending.size;
    resolution.then(
      (page) => this.#settleLater(held, page, "answer"),
      () => this.#settleLater(held, null, "failure"),
    );
  }

  /** A synchronous resolution: `page`, or null (NACK with `reason`). */
  #settleNow(message: Ref | RefFs, resolved: Buffer | null, reason: number, out: ReassemblerOutput): void {
    let page = resolved;
    if (page && page.length !== PAGE_BYTES) {
      page = null;
      reason = NACK_REASON.READ_FAILED;
      this.#stats.readFailures++;
    }
    if (page) this.#stats.refsResolved++;
    else {
      this.#stats.refsNacked++;
      out.toSend.push({ type: MSG.NACK, refId: message.refId, reason });
    }
    if (page && !this.#isHolding()) {
      this.#emit(out, message.pageHeader, page);
      this.#settledRefId = message.refId;
      return;
    }
    const held: HeldRef = {
      kind: "ref",
      refId: message.refId,
      pageHeader: Buffer.from(message.pageHeader),
      page,
      pending: false,
    };
    if (!page) this.#awaiting.set(message.refId, held);
    this.#hold(held, message.pageHeader.length + PAGE_BYTES);
  }

  /** An asynchronous resolution settled (or timed out): what it releases goes to `emit`. */
  #settleLater(held: HeldRef, resolved: Buffer | null, how: "answer" | "failure" | "timeout"): void {
    const timer = this.#pending.get(held);
    if (this.#stopped || timer === undefined) return; // timed out before, or the link is gone
    clearTimeout(timer);
    this.#pending.delete(held);
    held.pending = false;
    const page = resolved && resolved.length === PAGE_BYTES ? resolved : null;
    const out = this.#settledOutput();
    if (page) {
      held.page = page;
      this.#stats.refsResolved++;
    } else {
      const readFailed = how !== "answer" || resolved !== null;
      if (readFailed) this.#stats.readFailures++;
      if (how === "timeout") this.#stats.readTimeouts++;
      this.#stats.refsNacked++;
      out.toSend.push({
        type: MSG.NACK,
        refId: held.refId,
        reason: readFailed ? NACK_REASON.READ_FAILED : NACK_REASON.UNVERIFIED,
      });
      this.#awaiting.set(held.refId, held);
    }
    if (!page && this.#inputEnded) {
      const error = new LinkError(
        "closed",
        `REF ${held.refId} was NACKed after send closed the link: its PAGE_DATA can never come`,
      );
      this.#stop(undefined);
      this.#failLater?.(error);
    }
  }

  /**
   * The output of the reads settling in this turn of the event loop: released together once the turn is over
   * (one write of pages to QEMU and one ACK for a burst of NBD replies, rather than one each).
   */
  #settledOutput(): ReassemblerOutput {
    if (this.#settling) return this.#settling;
    const out: ReassemblerOutput = { toQemu: [], toSend: [], end: false };
    this.#settling = out;
    setImmediate(() => {
      this.#settling = undefined;
      if (this.#stopped) return;
      this.#flush(out);
      this.#ack(out);
      if (out.toQemu.length > 0 || out.toSend.length > 0 || out.end) this.#emitLater?.(out);
    });
    return out;
  }

  #isHolding(): boolean {
    return this.#heldHead < this.#held.length;
  }

  /** Throws before anything is copied if holding `outputBytes` more would break the window (rule 3). */
  #admit(outputBytes: number): void {
    if (this.#heldBytes + outputBytes <= this.#limitBytes) return;
    throw new LinkError(
      "window-exceeded",
      `send went ${this.#heldBytes + outputBytes} output bytes past an unsettled REF, more than the window of ${this.#limitBytes - WINDOW_SLACK_BYTES} + ${WINDOW_SLACK_BYTES} bytes (stream rule 3)`,
    );
  }

  #hold(item: Held, outputBytes: number): void {
    this.#held.push(item);
    this.#heldBytes += outputBytes;
    if (this.#heldBytes > this.#stats.peakHeldBytes) this.#stats.peakHeldBytes = this.#heldBytes;
  }

  /** Releases held output up to the first REF still waiting for its page. */
  #flush(out: ReassemblerOutput): void {
    while (this.#heldHead < this.#held.length) {
      const item = this.#held[this.#heldHead];
      if (!item) break;
      if (item.kind === "ref") {
        if (!item.page) break; // pending, or NACKed and waiting for PAGE_DATA
        this.#emit(out, item.pageHeader, item.page);
        this.#heldBytes -= item.pageHeader.length + PAGE_BYTES;
        this.#settledRefId = item.refId;
      } else if (item.kind === "bytes") {
        this.#emit(out, item.bytes);
        this.#heldBytes -= item.bytes.length;
      } else {
        this.#ended = true;
        out.end = true;
      }
      this.#held[this.#heldHead++] = { kind: "eof" }; // drop the reference
    }
    if (this.#heldHead === this.#held.length) {
      this.#held = [];
      this.#heldHead = 0;
    } else if (this.#heldHead > 1024 && this.#heldHead * 2 > this.#held.length) {
      this.#held = this.#held.slice(this.#heldHead);
      this.#heldHead = 0;
    }
  }

  #emit(out: ReassemblerOutput, ...buffers: Buffer[]): void {
    for (const buffer of buffers) {
      out.toQemu.push(buffer);
      this.#stats.bytesToQemu += buffer.length;
    }
  }
}
