/**
 * receive's core (protocol.ts, stream rules 1-4), pure and without sockets: turns the stream messages from send
 * (DATA, REF, PAGE_DATA, EOF, in link order) back into the exact QEMU stream for the destination QEMU, and says
 * which NACKs and ACKs to send back. A REF is resolved the moment it arrives through the injected `resolveRef`
 * (block read + hash check); a REF it cannot resolve is NACKed at once, and nothing after it is released until
 * PAGE_DATA for it arrives. Held output is bounded by the window receive announced: send breaking the window is a
 * `window-exceeded` LinkError, never unbounded memory (pausing the link instead would deadlock, see rule 3).
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
  WINDOW_SLACK_BYTES,
} from "./protocol.ts";

/**
 * Reads disk block `blockNumber` and returns its 4096 bytes if their SHA-256 equals `hash`; null if it does not,
 * or the block does not exist. The Buffer must be its own (it is kept until written). A throw counts as a read failure (NACK with READ_FAILED), not as a link failure.
 */
export type RefResolver = (blockNumber: number, hash: Buffer) => Buffer | null;

export interface ReassemblerOptions {
  resolveRef: RefResolver;
  /** The window receive announced in its HELLO (LinkSession.windowBytes). */
  windowBytes: number;
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
  };
}

type Held =
  | { kind: "bytes"; bytes: Buffer }
  | { kind: "ref"; refId: number; pageHeader: Buffer; page: Buffer | null }
  | { kind: "eof" };

export class RefReassembler {
  readonly #resolveRef: RefResolver;
  readonly #limitBytes: number;
  /** Output waiting behind the first unsettled REF (which is #held[0] whenever #held is not empty). */
  #held: Held[] = [];
  #heldHead = 0;
  #heldBytes = 0;
  /** NACKed REFs waiting for PAGE_DATA. */
  readonly #awaiting = new Map<number, Extract<Held, { kind: "ref" }>>();
  #lastRefId = 0;
  /** Highest refId written out (all below it were written before it). */
  #settledRefId = 0;
  #ackedRefId = 0;
  #eofSeen = false;
  #ended = false;
  readonly #stats: ReassemblerStats = emptyReassemblerStats();

  constructor(options: ReassemblerOptions) {
    this.#resolveRef = options.resolveRef;
    this.#limitBytes = options.windowBytes + WINDOW_SLACK_BYTES;
  }

  /** Output bytes held behind an unsettled REF. */
  get heldBytes(): number {
    return this.#heldBytes;
  }

  /** NACKed REFs still waiting for PAGE_DATA. */
  get awaitingPages(): number {
    return this.#awaiting.size;
  }

  /** send's EOF was passed on: the destination stream is complete. */
  get ended(): boolean {
    return this.#ended;
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
        case MSG.REF:
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
    if (this.#settledRefId > this.#ackedRefId) {
      this.#ackedRefId = this.#settledRefId;
      out.toSend.push({ type: MSG.ACK, refId: this.#settledRefId });
    }
    return out;
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

  #ref(message: Ref, out: ReassemblerOutput): void {
    this.#streamMessage("REF");
    if (message.refId <= this.#lastRefId)
      throw new LinkError(
        "unknown-ref",
        `REF ${message.refId} after REF ${this.#lastRefId}: refIds must increase (stream rule 2)`,
      );
    this.#lastRefId = message.refId;
    if (this.#isHolding()) this.#admit(message.pageHeader.length + PAGE_BYTES);
    let page: Buffer | null;
    let reason: number = NACK_REASON.UNVERIFIED;
    try {
      page = this.#resolveRef(message.blockNumber, message.hash);
      if (page && page.length !== PAGE_BYTES)
        throw new RangeError(`block read returned ${page.length} bytes`);
    } catch {
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
    const held: Extract<Held, { kind: "ref" }> = {
      kind: "ref",
      refId: message.refId,
      pageHeader: Buffer.from(message.pageHeader),
      page,
    };
    if (!page) this.#awaiting.set(message.refId, held);
    this.#hold(held, message.pageHeader.length + PAGE_BYTES);
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
        if (!item.page) break;
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
