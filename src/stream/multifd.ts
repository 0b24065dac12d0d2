/**
 * Incremental parser of one multifd channel as a relay sees it (format: ./multifd-wire.ts). Feed it chunks of any
 * size with `push`; it returns events whose `bytes` cover the input exactly once and in order, so a relay that
 * forwards every event's bytes forwards the channel unchanged. A packet header (1344 bytes with 4 KiB pages) is
 * assembled in a buffer of its own (at most one at a time); payloads are never copied: they come as views of the
 * input, in as many `payload` events as the chunks cut them into.
 *
 *   init     the 64-byte MultiFDInit_t
 *   ram      a RAM packet's header (with its offset list); its payload follows as `payload` events
 *   device   a device-state packet's header (10.0+); its payload follows as `payload` events
 *   payload  part of the current packet's payload; `endsPacket` on the last part
 *   raw      bytes not parsed: after a malformation (onError "passthrough"), or a truncated tail at the end
 *
 * Bounds: every count is checked before it is used (pages_alloc <= the packet's page count, normal_pages <=
 * pages_alloc, zero_pages <= pages_alloc - normal_pages, the QEMU receiver's own checks), so garbage cannot make it
 * allocate more than one header. A malformation raises a `MultifdError` naming the byte; with
 * `onError: "passthrough"` the parser records it and hands every later byte on as `raw` (what a relay needs:
 * QEMU, not vmprune, decides whether those bytes are acceptable).
 */
import { MultifdError } from "./errors.ts";
import {
  DEVICE_STATE,
  DEVICE_STATE_HEADER_BYTES,
  INIT,
  INIT_BYTES,
  MULTIFD_FLAG,
  MULTIFD_MAGIC,
  MULTIFD_VERSION,
  PACKET_PREFIX_BYTES,
  pageCount,
  RAM,
  ramHeaderBytes,
} from "./multifd-wire.ts";

export interface MultifdInit {
  version: number;
  /** The source's VM UUID (all zeros if unset); the destination checks it against its own. */
  uuid: Buffer;
  /** The channel's id among the source's multifd channels (not its accept order). */
  channelId: number;
}

export interface RamPacketHeader {
  flags: number;
  pagesAlloc: number;
  normalPages: number;
  nextPacketSize: number;
  packetNum: bigint;
  /** 9.0+; 7.2 leaves the field (unused[0]) zero. */
  zeroPages: number;
  /** The RAMBlock's idstr (NUL-terminated in its 256 bytes); "" in packets without pages. */
  ramBlock: string;
  /** normalPages + zeroPages byte offsets in the block: the normal pages first, then the zero pages. */
  offsets: number[];
}

export interface DeviceStateHeader {
  flags: number;
  idstr: string;
  instanceId: number;
  nextPacketSize: number;
}

export type MultifdEvent =
  | { kind: "init"; offset: number; bytes: Buffer; init: MultifdInit }
  | { kind: "ram"; offset: number; bytes: Buffer; header: RamPacketHeader; payloadBytes: number }
  | { kind: "device"; offset: number; bytes: Buffer; header: DeviceStateHeader; payloadBytes: number }
  | { kind: "payload"; offset: number; bytes: Buffer; endsPacket: boolean }
  | { kind: "raw"; offset: number; bytes: Buffer };

export interface MultifdParserOptions {
  /** The target's page size (default 4096, x86's TARGET_PAGE_BITS 12): it fixes the RAM header's size. */
  pageSizeBytes?: number;
  /** "throw" (default): malformed input throws MultifdError. "passthrough": record it, hand the rest on raw. */
  onError?: "throw" | "passthrough";
}

/** The compression bits of a packet's flags (0: uncompressed). */
export function compressionOf(flags: number): number {
  return flags & MULTIFD_FLAG.COMPRESSION_MASK;
}

/** The largest be64 high half for which hi * 2^32 + lo is still an exact JavaScript number. */
const MAX_SAFE_HI = 2 ** 21 - 1;

type State = "init" | "prefix" | "ramHeader" | "deviceHeader" | "payload" | "passthrough";

export class MultifdParser {
  /** Offset in the channel of the next byte not yet handed on in an event. */
  offset = 0;
  /** The malformation that stopped parsing (onError "passthrough"), or null. */
  error: MultifdError | null = null;
  init: MultifdInit | null = null;
  readonly pageSizeBytes: number;
  /** Offsets per RAM packet: the receiver's `multifd_ram_page_count()`. */
  readonly pageCount: number;

  private state: State = "init";
  private readonly onError: "throw" | "passthrough";
  /** The element being assembled (init or header) when it straddles chunks. */
  private partial: Buffer[] = [];
  private partialBytes = 0;
  /** Where the element being assembled starts in the channel. */
  private elementStart = 0;
  private payloadLeft = 0;
  private flags = 0;

  constructor(options: MultifdParserOptions = {}) {
    this.pageSizeBytes = options.pageSizeBytes ?? 4096;
    if (!Number.isInteger(Math.log2(this.pageSizeBytes)) || this.pageSizeBytes < 1024)
      throw new RangeError(`page size ${this.pageSizeBytes} is not a power of two of at least 1 KiB`);
    this.pageCount = pageCount(this.pageSizeBytes);
    this.onError = options.onError ?? "throw";
  }

  get passingThrough(): boolean {
    return this.state === "passthrough";
  }

  push(chunk: Buffer): MultifdEvent[] {
    const events: MultifdEvent[] = [];
    let pos = 0;
    while (pos < chunk.length) {
      if (this.state === "passthrough") {
        events.push(this.raw(chunk.subarray(pos)));
        break;
      }
      if (this.state === "payload") {
        const take = Math.min(this.payloadLeft, chunk.length - pos);
        this.payloadLeft -= take;
        events.push({
          kind: "payload",
          offset: this.offset,
          bytes: chunk.subarray(pos, pos + take),
          endsPacket: this.payloadLeft === 0,
        });
        this.offset += take;
        pos += take;
        if (this.payloadLeft === 0) this.state = "prefix";
        continue;
      }
      // An element of known size: init, a packet's common prefix, or a header.
      const want = this.elementBytes();
      const have = this.partialBytes;
      const take = Math.min(want - have, chunk.length - pos);
      const piece = chunk.subarray(pos, pos + take);
      pos += take;
      if (have === 0) this.elementStart = this.offset;
      if (have + take < want) {
        // Keep a copy: the caller may reuse its chunk once push returns.
        this.partial.push(Buffer.from(piece));
        this.partialBytes += take;
        continue;
      }
      const element = have === 0 ? piece : Buffer.concat([...this.partial, piece]);
      this.partial = [];
      this.partialBytes = 0;
      try {
        this.element(element, events);
      } catch (error) {
        if (!(error instanceof MultifdError) || this.onError === "throw") throw error;
        this.error = error;
        this.state = "passthrough";
        events.push(this.raw(element));
      }
    }
    return events;
  }

  /** The channel ended: a truncated element is handed on raw (QEMU will see the truncation itself). */
  end(): MultifdEvent[] {
    if (this.partialBytes === 0) return [];
    const rest = Buffer.concat(this.partial);
    this.partial = [];
    this.partialBytes = 0;
    return [this.raw(rest)];
  }

  private raw(bytes: Buffer): MultifdEvent {
    const event: MultifdEvent = { kind: "raw", offset: this.offset, bytes };
    this.offset += bytes.length;
    return event;
  }

  /** Bytes of the element the parser waits for in its current state. */
  private elementBytes(): number {
    switch (this.state) {
      case "init":
        return INIT_BYTES;
      case "prefix":
        return PACKET_PREFIX_BYTES;
      case "ramHeader":
        return ramHeaderBytes(this.pageSizeBytes);
      case "deviceHeader":
        return DEVICE_STATE_HEADER_BYTES;
      default:
        throw new Error(`multifd parser: no element in state ${this.state}`);
    }
  }

  private fail(code: MultifdError["code"], at: number, detail: string): never {
    throw new MultifdError(code, this.elementStart + at, detail);
  }

  /** A complete element: an event, or (for a packet's prefix) the header it announces. */
  private element(bytes: Buffer, events: MultifdEvent[]): void {
    switch (this.state) {
      case "init": {
        this.checkMagicAndVersion(bytes, "MultiFDInit_t");
        const init: MultifdInit = {
          version: bytes.readUInt32BE(INIT.version),
          uuid: bytes.subarray(INIT.uuid, INIT.uuid + INIT.uuidBytes),
          channelId: bytes[INIT.channelId] as number,
        };
        this.init = init;
        events.push({ kind: "init", offset: this.offset, bytes, init });
        this.offset += bytes.length;
        this.state = "prefix";
        return;
      }
      case "prefix": {
        // The prefix is part of the header: it is assembled again with the rest (at most 12 bytes copied).
        this.checkMagicAndVersion(bytes, "packet");
        this.flags = bytes.readUInt32BE(RAM.flags);
        this.partial = [Buffer.from(bytes)];
        this.partialBytes = bytes.length;
        this.state = this.flags & MULTIFD_FLAG.DEVICE_STATE ? "deviceHeader" : "ramHeader";
        return;
      }
      case "ramHeader": {
        const header = this.ramHeader(bytes);
        const payloadBytes =
          header.normalPages === 0
            ? 0
            : compressionOf(header.flags) === 0
              ? header.normalPages * this.pageSizeBytes
              : header.nextPacketSize;
        events.push({ kind: "ram", offset: this.offset, bytes, header, payloadBytes });
        this.afterHeader(bytes.length, payloadBytes);
        return;
      }
      case "deviceHeader": {
        const header: DeviceStateHeader = {
          flags: this.flags,
          idstr: cString(bytes.subarray(DEVICE_STATE.idstr, DEVICE_STATE.idstr + DEVICE_STATE.idstrBytes)),
          instanceId: bytes.readUInt32BE(DEVICE_STATE.instanceId),
          nextPacketSize: bytes.readUInt32BE(DEVICE_STATE.nextPacketSize),
        };
        events.push({
          kind: "device",
          offset: this.offset,
          bytes,
          header,
          payloadBytes: header.nextPacketSize,
        });
        this.afterHeader(bytes.length, header.nextPacketSize);
        return;
      }
      default:
        throw new Error(`multifd parser: no element in state ${this.state}`);
    }
  }

  private afterHeader(headerBytes: number, payloadBytes: number): void {
    this.offset += headerBytes;
    this.payloadLeft = payloadBytes;
    this.state = payloadBytes > 0 ? "payload" : "prefix";
  }

  private checkMagicAndVersion(bytes: Buffer, what: string): void {
    const magic = bytes.readUInt32BE(0);
    if (magic !== MULTIFD_MAGIC)
      this.fail(
        "bad-magic",
        0,
        `${what} magic 0x${magic.toString(16).padStart(8, "0")}, expected 0x${MULTIFD_MAGIC.toString(16)}`,
      );
    const version = bytes.readUInt32BE(4);
    if (version !== MULTIFD_VERSION)
      this.fail("bad-version", 4, `${what} version ${version}, expected ${MULTIFD_VERSION}`);
  }

  /** The receiver's checks (multifd.c@v7.2.0:281-355, multifd-nocomp.c@v10.0.2:226-296), and exact offsets. */
  private ramHeader(bytes: Buffer): RamPacketHeader {
    const flags = bytes.readUInt32BE(RAM.flags);
    const pagesAlloc = bytes.readUInt32BE(RAM.pagesAlloc);
    const normalPages = bytes.readUInt32BE(RAM.normalPages);
    const zeroPages = bytes.readUInt32BE(RAM.zeroPages);
    if (pagesAlloc > this.pageCount)
      this.fail(
        "impossible-count",
        RAM.pagesAlloc,
        `pages_alloc ${pagesAlloc} exceeds the ${this.pageCount} pages of a ${this.pageSizeBytes}-byte-page packet`,
      );
    if (normalPages > pagesAlloc)
      this.fail(
        "impossible-count",
        RAM.normalPages,
        `normal_pages ${normalPages} exceeds pages_alloc ${pagesAlloc}`,
      );
    if (zeroPages > pagesAlloc - normalPages)
      this.fail(
        "impossible-count",
        RAM.zeroPages,
        `zero_pages ${zeroPages} exceeds pages_alloc ${pagesAlloc} - normal_pages ${normalPages}`,
      );
    const offsets: number[] = [];
    for (let i = 0; i < normalPages + zeroPages; i++) {
      const at = RAM.offsets + 8 * i;
      const hi = bytes.readUInt32BE(at);
      const lo = bytes.readUInt32BE(at + 4);
      if (hi > MAX_SAFE_HI)
        this.fail(
          "impossible-offset",
          at,
          `page offset 0x${hi.toString(16)}${lo.toString(16).padStart(8, "0")} beyond 2^53`,
        );
      offsets.push(hi * 2 ** 32 + lo);
    }
    const ramBlock = cString(bytes.subarray(RAM.ramBlock, RAM.ramBlock + RAM.ramBlockBytes));
    if (normalPages + zeroPages > 0 && ramBlock === "")
      this.fail(
        "bad-ram-block",
        RAM.ramBlock,
        `a packet with ${normalPages + zeroPages} pages names no RAM block`,
      );
    return {
      flags,
      pagesAlloc,
      normalPages,
      nextPacketSize: bytes.readUInt32BE(RAM.nextPacketSize),
      packetNum: bytes.readBigUInt64BE(RAM.packetNum),
      zeroPages,
      ramBlock,
      offsets,
    };
  }
}

/** A NUL-terminated string in a fixed field (QEMU forces the last byte to NUL: multifd-nocomp.c@v10.0.2:258). */
function cString(field: Buffer): string {
  const end = field.indexOf(0);
  return field.subarray(0, end < 0 ? field.length - 1 : end).toString("latin1");
}
