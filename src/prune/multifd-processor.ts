/**
 * The pruning processor of one multifd channel (`vmprune send --drop free` with QEMU's multifd on, libvirt's
 * --parallel): QEMU then sends every page in multifd packets (stream/multifd.ts) and none on the main channel.
 * For an uncompressed RAM packet, once the whole packet (header and payload) has reached the relay (invariant 1:
 * judge after the record arrived), its normal pages are judged by the same PageJudge as the main channel's
 * (PageRef = the packet's block + offset), and every free page moves from the packet's normal list to its zero
 * list, its bytes dropped (stream/multifd-rewrite.ts). Why that is safe is the main channel's reason
 * (pruning-processor.ts): QEMU cleared the page's dirty bit before it read the page, so a page free when judged
 * holds nothing the guest relies on, and a later allocation dirties it again. Pages keep their packet and their
 * channel, so QEMU's ordering of a page's versions across channels (sync points) is untouched.
 *
 * Passes through unchanged, with the reason in the report (invariant 4):
 *   - every packet, when the destination may not read the zero list (a source QEMU before 9.0: decided by the
 *     caller before the migration, see migrate/multifd-zero-list.ts);
 *   - the rest of the channel once a packet is compressed (zlib, zstd, ...: one compression stream per channel,
 *     so a packet cannot change without re-compressing all that follows) or the channel cannot be parsed;
 *   - device-state packets (10.0+ VFIO state: not guest RAM);
 *   - packets that arrive before the main channel has handed its RAM block list to the judge, or after the main
 *     channel stopped pruning, or naming a block the list lacks; pages at offsets outside their block.
 * SYNC packets are never held back beyond their own bytes (a 9.0+ SYNC packet carries no pages; holding one for
 * another channel would deadlock the destination). Memory: at most one packet per channel is held (a header of
 * 1344 bytes and 512 KiB of pages with 4 KiB pages), and only while its own bytes arrive.
 */
import { CATEGORY, CATEGORY_NAMES, type Category } from "../introspect/classifier.ts";
import { FRAME_HEADER_BYTES, REF_FS_FIXED_BYTES } from "../link/protocol.ts";
import { compressionOf, type MultifdEvent, MultifdParser, type RamPacketHeader } from "../stream/multifd.ts";
import { moveToZeroList } from "../stream/multifd-rewrite.ts";
import { COMPRESSION_NAMES, MULTIFD_FLAG } from "../stream/multifd-wire.ts";
import type { ChannelProcessor } from "../stream/relay.ts";
import type { PageJudge, PageRef, RamBlock } from "./page-judge.ts";
import {
  type CacheIndex,
  NO_REFS,
  type RefsAccepted,
  type RefTarget,
  type Segment,
} from "./pruning-processor.ts";

/** A reference inside a packet stands for the page's bytes alone: no RAM record header goes with it. */
const NO_PAGE_HEADER = Buffer.alloc(0);
/** What a bare reference costs on the link (a REF_FS frame without pageHeader, link/protocol.ts). */
const BARE_REF_BYTES = FRAME_HEADER_BYTES + REF_FS_FIXED_BYTES;
/** Lookups inside packets: only a filesystem place can stand for a page without its record header. */
const FILESYSTEM_REFS_ONLY: RefsAccepted = { index: false, filesystem: true, multifd: true };

/** Appends bytes to the output, to the last bytes segment if it is one. */
function pushBytes(out: Segment[], bytes: Buffer): void {
  if (bytes.length === 0) return;
  const last = out[out.length - 1];
  if (last?.kind === "bytes") last.buffers.push(bytes);
  else out.push({ kind: "bytes", buffers: [bytes] });
}

/** A plain destination's bytes (no references were asked for, so there are none). */
function plainBytes(segments: Segment[]): Buffer[] {
  return segments.flatMap((s) => (s.kind === "bytes" ? s.buffers : []));
}

export interface MultifdPruneOptions {
  /**
   * Categories to drop: "free" pages move to the packet's zero list (a 9.0+ destination, `zeroList`); "cache"
   * pages that `cacheIndex` places on a filesystem become references inside the packet, through
   * {@link MultifdPruningProcessor.pushSegments} for a receiver that takes them (link 1.3).
   */
  drop: readonly Category[];
  cacheIndex?: CacheIndex;
  /** Judge and count, but forward every packet unchanged. */
  dryRun?: boolean;
  /** True if the destination reads the zero list, else why it may not (every packet then passes unpruned). */
  zeroList: true | string;
  /** The main channel's RAM block list once the judge has it, or why multifd pages cannot be judged now. */
  ramBlocks: () => ReadonlyMap<string, RamBlock> | string;
  /** The target's page size (default 4096). */
  pageSizeBytes?: number;
  log?: (line: string) => void;
}

/** Packets with pages that passed unjudged for one reason. */
export interface UnjudgedPackets {
  reason: string;
  packets: number;
  pages: number;
}

export interface MultifdChannelReport {
  /** The relay's connection index (0 is the main channel). */
  connection: number;
  /** The channel id the source gave it (MultiFDInit_t), null before its first 64 bytes. */
  channelId: number | null;
  /** Packets parsed: all, SYNC, device state. */
  packets: number;
  syncPackets: number;
  deviceStatePackets: number;
  /** Pages as the source listed them: normal (with bytes) and zero (9.0+ detection). */
  normalPages: number;
  zeroPages: number;
  /** Normal pages judged, pruned (moved to the zero list; a dry run counts what it would have), by category. */
  pagesJudged: number;
  pagesPruned: number;
  byCategory: Record<Category, number>;
  /** Normal pages sent as references to the shared storage (receive puts their bytes back into the packet). */
  pagesReferenced: number;
  /** Cache pages looked up and not placed (they go whole). */
  cacheMisses: number;
  /** Cache pages sent whole, not looked up, because the link had room for them (RefsAccepted.linkHasRoom). */
  cacheWhole: number;
  /** Page bytes not sent (a reference's own bytes deducted). */
  bytesSaved: number;
  /** Why the channel (or its rest, from some packet on) passed unpruned, or null. */
  unpruned: string | null;
  /** Packets with pages that passed unjudged, by reason. */
  unjudged: UnjudgedPackets[];
}

interface HeldPacket {
  headerBytes: Buffer;
  header: RamPacketHeader;
  blockLength: number;
  parts: Buffer[];
}

export class MultifdPruningProcessor implements ChannelProcessor {
  private readonly parser: MultifdParser;
  private readonly pageSizeBytes: number;
  /** The rest of the channel goes on without parsing (compressed, unparseable). */
  private raw = false;
  private held: HeldPacket | null = null;
  private readonly dropFree: boolean;
  private readonly dropCache: boolean;
  /** What the receiver takes, as of the chunk being handled (pushSegments); none for a plain destination. */
  private refs: RefsAccepted = NO_REFS;
  private readonly counts = new Array<number>(CATEGORY_NAMES.length).fill(0);
  private readonly unjudged = new Map<string, UnjudgedPackets>();
  private readonly report_: Omit<MultifdChannelReport, "byCategory" | "unjudged">;

  constructor(
    private readonly judgeOrReason: PageJudge | string,
    connection: number,
    private readonly options: MultifdPruneOptions,
  ) {
    this.pageSizeBytes = options.pageSizeBytes ?? 4096;
    this.parser = new MultifdParser({ onError: "passthrough", pageSizeBytes: this.pageSizeBytes });
    const refusedFree = typeof judgeOrReason === "string" ? undefined : judgeOrReason.refused?.free;
    this.dropFree = options.drop.includes("free") && refusedFree === undefined;
    const refusedCache = typeof judgeOrReason === "string" ? undefined : judgeOrReason.refused?.cache;
    this.dropCache = options.drop.includes("cache") && refusedCache === undefined && !!options.cacheIndex;
    this.report_ = {
      connection,
      channelId: null,
      packets: 0,
      syncPackets: 0,
      deviceStatePackets: 0,
      normalPages: 0,
      zeroPages: 0,
      pagesJudged: 0,
      pagesPruned: 0,
      pagesReferenced: 0,
      cacheMisses: 0,
      cacheWhole: 0,
      bytesSaved: 0,
      unpruned: null,
    };
  }

  /** For a plain QEMU destination: the bytes to forward. */
  push(chunk: Buffer): Buffer[] {
    return plainBytes(this.pushSegments(chunk, NO_REFS));
  }

  end(): Buffer[] {
    return plainBytes(this.endSegments(NO_REFS));
  }

  /** For a receiver: bytes and, if it takes them inside multifd packets, references, in channel order. */
  pushSegments(chunk: Buffer, refs: RefsAccepted): Segment[] {
    if (this.raw) return [{ kind: "bytes", buffers: [chunk] }];
    this.refs = refs;
    return this.handle(this.parser.push(chunk));
  }

  endSegments(refs: RefsAccepted): Segment[] {
    this.refs = refs;
    const out = this.raw ? [] : this.handle(this.parser.end());
    const held = this.held;
    if (held) {
      // The channel ended inside a packet: what came of it goes on as it came (QEMU sees the truncation).
      this.held = null;
      this.countUnjudged("the channel ended inside the packet", held.header.normalPages);
      out.push({ kind: "bytes", buffers: [held.headerBytes, ...held.parts] });
    }
    return out;
  }

  report(): MultifdChannelReport {
    return {
      ...this.report_,
      byCategory: Object.fromEntries(CATEGORY_NAMES.map((n, i) => [n, this.counts[i] ?? 0])) as Record<
        Category,
        number
      >,
      unjudged: [...this.unjudged.values()],
    };
  }

  private handle(events: MultifdEvent[]): Segment[] {
    const out: Segment[] = [];
    const bytes = (b: Buffer) => pushBytes(out, b);
    for (const e of events) {
      switch (e.kind) {
        case "init":
          this.report_.channelId = e.init.channelId;
          bytes(e.bytes);
          break;
        case "ram":
          this.onRamHeader(e.bytes, e.header, bytes);
          break;
        case "device":
          this.report_.packets++;
          this.report_.deviceStatePackets++;
          bytes(e.bytes);
          break;
        case "payload":
          if (!this.held) bytes(e.bytes);
          else {
            this.held.parts.push(e.bytes);
            if (e.endsPacket) {
              for (const segment of this.decide(this.held))
                if (segment.kind === "bytes") for (const b of segment.buffers) bytes(b);
                else out.push(segment);
              this.held = null;
            }
          }
          break;
        case "raw":
          if (this.parser.error && this.report_.unpruned === null)
            this.passRest(`${this.parser.error.message}: the rest of the channel was relayed unparsed`);
          bytes(e.bytes);
          break;
      }
    }
    return out;
  }

  private onRamHeader(headerBytes: Buffer, header: RamPacketHeader, out: (bytes: Buffer) => void): void {
    const r = this.report_;
    r.packets++;
    if (header.flags & MULTIFD_FLAG.SYNC) r.syncPackets++;
    r.normalPages += header.normalPages;
    r.zeroPages += header.zeroPages;
    const compression = compressionOf(header.flags);
    if (compression !== 0) {
      const name = COMPRESSION_NAMES[compression] ?? `method 0x${compression.toString(16)}`;
      this.passRest(
        `${name} compression: the channel is one compression stream, a packet cannot change without re-compressing the rest; relayed unchanged from packet ${header.packetNum} on`,
      );
      // This batch's remaining events are forwarded as they are (held is null); later chunks are not parsed.
      this.raw = true;
      out(headerBytes);
      return;
    }
    if (header.normalPages === 0) {
      out(headerBytes);
      return;
    }
    const why = this.whyNotJudged(header);
    if (typeof why === "string") {
      this.countUnjudged(why, header.normalPages);
      out(headerBytes);
      return;
    }
    this.held = { headerBytes, header, blockLength: why.length, parts: [] };
  }

  /** The packet's block if its pages can be judged now, else why not. */
  private whyNotJudged(header: RamPacketHeader): RamBlock | string {
    if (typeof this.judgeOrReason === "string") return this.judgeOrReason;
    if (!this.pruneFree() && !this.referenceCache()) {
      if (this.dropCache)
        return `${this.whyNoFree()}; cache pages: the receiver takes no references inside multifd packets`;
      return this.whyNoFree();
    }
    if (this.report_.unpruned !== null) return this.report_.unpruned;
    if (header.nextPacketSize !== header.normalPages * this.pageSizeBytes)
      return `next_packet_size does not match normal_pages x ${this.pageSizeBytes} in an uncompressed packet`;
    const blocks = this.options.ramBlocks();
    if (typeof blocks === "string") return blocks;
    const block = blocks.get(header.ramBlock);
    if (!block) return `RAM block '${header.ramBlock}' is not in the main channel's block list`;
    return block;
  }

  /**
   * Free pages are pruned: asked for and allowed for this guest, and either the destination reads the zero list
   * (they move there) or the receiver writes pages of zeros in their place (ZEROS, for a 7.2 destination).
   */
  private pruneFree(): boolean {
    return this.dropFree && (this.options.zeroList === true || this.refs.zeroFill === true);
  }

  /** Cache pages become references: asked for, placeable, and taken by the receiver inside multifd packets. */
  private referenceCache(): boolean {
    return this.dropCache && this.refs.filesystem && this.refs.multifd === true;
  }

  private whyNoFree(): string {
    const judge = this.judgeOrReason;
    if (!this.dropFree)
      return this.options.drop.includes("free") && typeof judge !== "string"
        ? `free pages are not dropped for this guest: ${judge.refused?.free ?? "?"}`
        : "free pages are not asked to be dropped";
    return this.options.zeroList === true ? "?" : this.options.zeroList;
  }

  /**
   * The whole packet is here: judge its normal pages; free ones move to the zero list, cache ones the index places
   * on a filesystem become references in their place in the payload.
   */
  private decide(held: HeldPacket): Segment[] {
    const { header, headerBytes } = held;
    const payload = held.parts.length === 1 ? (held.parts[0] as Buffer) : Buffer.concat(held.parts);
    const judge = this.judgeOrReason as PageJudge;
    // Only whole pages inside the block: anything else stays a normal page, as QEMU sent it.
    const indices: number[] = [];
    const refs: PageRef[] = [];
    for (let i = 0; i < header.normalPages; i++) {
      const offset = header.offsets[i] as number;
      if (offset % this.pageSizeBytes !== 0 || offset + this.pageSizeBytes > held.blockLength) continue;
      indices.push(i);
      refs.push({ block: header.ramBlock, blockOffset: offset });
    }
    let categories: Uint8Array;
    try {
      categories = refs.length > 0 ? judge.judge(refs) : new Uint8Array(0);
    } catch (error) {
      this.passRest(
        `introspection failed mid-way: ${error instanceof Error ? error.message : String(error)}`,
      );
      this.countUnjudged(this.report_.unpruned ?? "", header.normalPages);
      return [{ kind: "bytes", buffers: [headerBytes, payload] }];
    }
    const pruneFree = this.pruneFree();
    const referenceCache = this.referenceCache();
    const moved = new Set<number>();
    const referenced = new Map<number, { target: RefTarget; hash: Buffer; page: PageRef }>();
    const size = this.pageSizeBytes;
    for (let k = 0; k < indices.length; k++) {
      const category = categories[k] ?? CATEGORY.unknown;
      this.counts[category] = (this.counts[category] ?? 0) + 1;
      const i = indices[k] as number;
      if (category === CATEGORY.free && pruneFree) moved.add(i);
      else if (category === CATEGORY.cache && this.dropCache && this.refs.linkHasRoom)
        this.report_.cacheWhole++;
      else if (category === CATEGORY.cache && referenceCache) {
        const page = refs[k] as PageRef;
        const found = this.options.cacheIndex?.lookup(
          payload.subarray(i * size, (i + 1) * size),
          judge.pfnOf?.(page) ?? -1,
          FILESYSTEM_REFS_ONLY,
        );
        if (found && found.target.kind === "filesystem") referenced.set(i, { ...found, page });
        else this.report_.cacheMisses++;
      }
    }
    const r = this.report_;
    r.pagesJudged += refs.length;
    r.pagesPruned += moved.size + referenced.size;
    r.pagesReferenced += referenced.size;
    r.bytesSaved += moved.size * size + referenced.size * (size - BARE_REF_BYTES);
    if (this.options.dryRun || (moved.size === 0 && referenced.size === 0))
      return [{ kind: "bytes", buffers: [headerBytes, payload] }];
    // A destination that reads the zero list gets the free pages there; else they stay normal pages, and the
    // receiver writes zeros in their place.
    const zeroList = this.options.zeroList === true;
    // The header (with the zero list, if pages moved), then the kept normal pages in their order, each referenced
    // one a reference in its place, each zero-filled one a run of zeros.
    const [newHeader] =
      zeroList && moved.size > 0
        ? moveToZeroList({ headerBytes, header, payload }, moved, size)
        : [headerBytes];
    const out: Segment[] = [{ kind: "bytes", buffers: [newHeader as Buffer] }];
    let runStart = -1;
    const flushRun = (end: number) => {
      if (runStart >= 0) pushBytes(out, payload.subarray(runStart * size, end * size));
      runStart = -1;
    };
    for (let i = 0; i < header.normalPages; i++) {
      if (moved.has(i)) {
        flushRun(i);
        if (!zeroList) {
          const last = out[out.length - 1];
          if (last?.kind === "zeros") last.pages++;
          else out.push({ kind: "zeros", pages: 1 });
        }
        continue;
      }
      const ref = referenced.get(i);
      if (!ref) {
        if (runStart < 0) runStart = i;
        continue;
      }
      flushRun(i);
      out.push({
        kind: "ref",
        pageHeader: NO_PAGE_HEADER,
        target: ref.target,
        hash: ref.hash,
        page: ref.page,
      });
    }
    flushRun(header.normalPages);
    return out;
  }

  private passRest(reason: string): void {
    if (this.report_.unpruned !== null) return;
    this.report_.unpruned = reason;
    this.options.log?.(`vmprune send: multifd connection #${this.report_.connection}: ${reason}`);
  }

  private countUnjudged(reason: string, pages: number): void {
    const entry = this.unjudged.get(reason) ?? { reason, packets: 0, pages: 0 };
    entry.packets++;
    entry.pages += pages;
    this.unjudged.set(reason, entry);
  }
}

/** What pruning did on all multifd channels of a migration. */
export interface MultifdPruneReport {
  channels: MultifdChannelReport[];
  pagesJudged: number;
  pagesPruned: number;
  pagesReferenced: number;
  bytesSaved: number;
}

export function summarizeMultifd(channels: readonly MultifdChannelReport[]): MultifdPruneReport {
  return {
    channels: [...channels],
    pagesJudged: channels.reduce((a, c) => a + c.pagesJudged, 0),
    pagesPruned: channels.reduce((a, c) => a + c.pagesPruned, 0),
    pagesReferenced: channels.reduce((a, c) => a + c.pagesReferenced, 0),
    bytesSaved: channels.reduce((a, c) => a + c.bytesSaved, 0),
  };
}
