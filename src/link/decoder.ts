/**
 * Incremental decoder of link frames (protocol.ts): a pure function of the bytes fed to it, in chunks split
 * anywhere. It holds at most one incomplete frame (≤ 5 + 1 MiB bytes, allocated only after the frame's type and
 * length passed their bounds). Payloads that lie within one input chunk are views into it (no copy); a payload
 * split across chunks is assembled into one Buffer of exactly its length, except, with `bytesInParts`, DATA and
 * RETURN: those come out in parts as their bytes arrive. Malformed input gives a LinkError naming the frame's
 * offset in the stream, and the decoder is then unusable (every later call throws the same error).
 */
import { LinkError } from "./errors.ts";
import { codecOf, FRAME_HEADER_BYTES, type Message, type MessageCodec, MSG } from "./protocol.ts";

/** One frame, checked against its type's bounds but not yet decoded. */
export interface Frame {
  type: number;
  /** The payload, or with `bytesInParts` a DATA or RETURN frame's next part. */
  payload: Buffer;
  /** Offset of the frame's first byte in the link stream. */
  offset: number;
}

export interface LinkDecoderOptions {
  /**
   * DATA and RETURN frames come out in parts, each a view of the input as it arrived (consecutive messages of the
   * frame's type, each at least one byte), instead of assembled: their bytes are forwarded as they are, so a
   * frame's boundaries mean nothing to the reader. send frames up to 1 MiB of stream at once, which nearly always
   * spans socket reads: assembling it cost receive a copy of the whole stream and a 1 MiB allocation per frame.
   * Not for a reader that takes the remainder after a frame (takeRemainder): a frame in parts has none.
   */
  bytesInParts?: boolean;
}

/** The frame being read across chunks, once its header is known. */
interface PartialFrame {
  codec: MessageCodec<Message>;
  /** Where its payload is assembled; null for a frame handed on in parts. */
  payload: Buffer | null;
  /** Payload bytes assembled, or handed on. */
  fill: number;
  length: number;
  /** Offset of the frame's first byte in the link stream. */
  start: number;
}

export class LinkDecoder {
  /** Stream offset of the next input byte not yet looked at. */
  #offset = 0;
  readonly #header = Buffer.alloc(FRAME_HEADER_BYTES);
  #headerFill = 0;
  #partial: PartialFrame | undefined;
  /** Input not yet looked at (only {@link write} leaves any). */
  #input: Buffer[] = [];
  #failure: LinkError | undefined;
  readonly #bytesInParts: boolean;

  constructor(options: LinkDecoderOptions = {}) {
    this.#bytesInParts = options.bytesInParts ?? false;
  }

  /** Payload bytes held in an incomplete frame (none for one handed on in parts). */
  get #assembled(): number {
    return this.#partial?.payload ? this.#partial.fill : 0;
  }

  /** Stream offset of the first byte not yet consumed into a returned frame. */
  get offset(): number {
    return this.#offset - this.#headerFill - this.#assembled;
  }

  /** Bytes held: of an incomplete frame, plus input written but not yet read with {@link nextFrame}. */
  get bufferedBytes(): number {
    return this.#headerFill + this.#assembled + this.#input.reduce((sum, b) => sum + b.length, 0);
  }

  /** Every complete message in `chunk` (with what came before). */
  push(chunk: Buffer): Message[] {
    this.write(chunk);
    const messages: Message[] = [];
    for (let m = this.next(); m; m = this.next()) messages.push(m);
    return messages;
  }

  /** Queues `chunk` for {@link next}/{@link nextFrame} (the pull interface; the caller bounds what it writes). */
  write(chunk: Buffer): void {
    this.#check();
    if (chunk.length > 0) this.#input.push(chunk);
  }

  /** The next complete message, or null when more bytes are needed. */
  next(): Message | null {
    const frame = this.nextFrame();
    if (!frame) return null;
    try {
      return decodeFrame(frame);
    } catch (error) {
      if (error instanceof LinkError) this.#failure = error;
      throw error;
    }
  }

  /** The next complete frame, or null when more bytes are needed. */
  nextFrame(): Frame | null {
    this.#check();
    try {
      return this.#nextFrame();
    } catch (error) {
      if (error instanceof LinkError) this.#failure = error;
      throw error;
    }
  }

  /** Takes back the input not yet consumed into frames (e.g. to hand a socket's bytes after a handshake on). */
  takeRemainder(): Buffer {
    this.#check();
    const parts: Buffer[] = [];
    const partial = this.#partial;
    if (partial && !partial.payload)
      throw new Error("takeRemainder inside a frame handed on in parts: its rest is not a frame");
    if (this.#headerFill > 0) parts.push(Buffer.from(this.#header.subarray(0, this.#headerFill)));
    if (partial?.payload) parts.push(partial.payload.subarray(0, partial.fill));
    parts.push(...this.#input);
    this.#headerFill = 0;
    this.#partial = undefined;
    this.#input = [];
    return Buffer.concat(parts);
  }

  /** The input ended: a LinkError if it ended inside a frame. */
  end(): void {
    this.#check();
    const buffered = this.bufferedBytes;
    const partial = this.#partial;
    if (buffered === 0 && !partial) return;
    const what = partial
      ? `${partial.codec.name} frame with ${partial.length - partial.fill} of its ${partial.length} payload bytes missing`
      : `frame header cut after ${buffered} of ${FRAME_HEADER_BYTES} bytes`;
    this.#failure = new LinkError(
      "truncated",
      `link ended inside a frame: ${what}`,
      partial?.start ?? this.offset,
    );
    throw this.#failure;
  }

  #check(): void {
    if (this.#failure) throw this.#failure;
  }

  #nextFrame(): Frame | null {
    for (;;) {
      const chunk = this.#input[0];
      if (!chunk) return null;
      if (!this.#partial) {
        if (this.#headerFill === 0 && chunk.length >= FRAME_HEADER_BYTES) {
          // Fast path: the header is in this chunk; the payload may be too.
          const codec = this.#checkHeader(chunk[0] ?? 0, chunk.readUInt32BE(1));
          const length = chunk.readUInt32BE(1);
          if (chunk.length >= FRAME_HEADER_BYTES + length) {
            const payload = chunk.subarray(FRAME_HEADER_BYTES, FRAME_HEADER_BYTES + length);
            this.#consume(FRAME_HEADER_BYTES + length);
            return this.#emit(codec.type, payload);
          }
          chunk.copy(this.#header, 0, 0, FRAME_HEADER_BYTES);
          this.#headerFill = FRAME_HEADER_BYTES;
          this.#consume(FRAME_HEADER_BYTES);
          this.#partial = this.#startFrame(codec, length);
          continue;
        }
        const take = Math.min(FRAME_HEADER_BYTES - this.#headerFill, chunk.length);
        chunk.copy(this.#header, this.#headerFill, 0, take);
        this.#headerFill += take;
        this.#consume(take);
        if (this.#headerFill < FRAME_HEADER_BYTES) continue;
        const length = this.#header.readUInt32BE(1);
        const codec = this.#checkHeader(this.#header[0] ?? 0, length);
        this.#partial = this.#startFrame(codec, length);
      }
      const partial = this.#partial;
      const rest = this.#input[0];
      if (!partial.payload) {
        // Handed on in parts: what this chunk holds of it, as a view.
        if (!rest) return null;
        const take = Math.min(partial.length - partial.fill, rest.length);
        const part = rest.subarray(0, take);
        this.#consume(take);
        partial.fill += take;
        this.#headerFill = 0;
        if (partial.fill === partial.length) this.#partial = undefined;
        return { type: partial.codec.type, payload: part, offset: partial.start };
      }
      if (partial.fill < partial.payload.length) {
        if (!rest) return null;
        const take = Math.min(partial.payload.length - partial.fill, rest.length);
        rest.copy(partial.payload, partial.fill, 0, take);
        partial.fill += take;
        this.#consume(take);
      }
      if (partial.fill === partial.payload.length) {
        this.#partial = undefined;
        return this.#emit(partial.codec.type, partial.payload);
      }
    }
  }

  /** The incomplete frame whose header (all of it read) is `codec`'s with `length` payload bytes. */
  #startFrame(codec: MessageCodec<Message>, length: number): PartialFrame {
    const inParts = this.#bytesInParts && (codec.type === MSG.DATA || codec.type === MSG.RETURN);
    return {
      codec,
      payload: inParts ? null : Buffer.allocUnsafe(length),
      fill: 0,
      length,
      start: this.#offset - this.#headerFill,
    };
  }

  /** Checks a frame header against the type's bounds; the frame starts at this.#offset - (header bytes read). */
  #checkHeader(type: number, length: number): MessageCodec<Message> {
    const at = this.#offset - this.#headerFill;
    const codec = codecOf(type);
    if (!codec) {
      const hint = type === 0x51 ? " (0x51 'Q' starts a QEMU stream: is the peer QEMU itself?)" : "";
      throw new LinkError("unknown-type", `unknown message type 0x${type.toString(16)}${hint}`, at);
    }
    if (length < codec.minPayloadBytes || length > codec.maxPayloadBytes) {
      const bounds =
        codec.minPayloadBytes === codec.maxPayloadBytes
          ? `${codec.minPayloadBytes}`
          : `${codec.minPayloadBytes}..${codec.maxPayloadBytes}`;
      throw new LinkError(
        "bad-length",
        `${codec.name} frame of ${length} payload bytes (must be ${bounds})`,
        at,
      );
    }
    return codec;
  }

  #consume(bytes: number): void {
    const chunk = this.#input[0];
    if (!chunk) return;
    if (bytes >= chunk.length) this.#input.shift();
    else this.#input[0] = chunk.subarray(bytes);
    this.#offset += bytes;
  }

  #emit(type: number, payload: Buffer): Frame {
    this.#headerFill = 0;
    return { type, payload, offset: this.#offset - FRAME_HEADER_BYTES - payload.length };
  }
}

/** Decodes a frame's payload (its length already checked by {@link LinkDecoder}). */
export function decodeFrame(frame: Frame): Message {
  const codec = codecOf(frame.type);
  if (!codec)
    throw new LinkError("unknown-type", `unknown message type 0x${frame.type.toString(16)}`, frame.offset);
  try {
    return codec.decode(frame.payload, frame.offset);
  } catch (error) {
    if (error instanceof LinkError) throw error;
    // A read past the payload (RangeError from Buffer): bounds let it through, so the fields do not fit.
    throw new LinkError("bad-payload", `${codec.name}: ${String(error)}`, frame.offset);
  }
}
