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
import { compressionOf, type MultifdEvent, MultifdParser, type RamPacketHeader } from "../stream/multifd.ts";
import { moveToZeroList } from "../stream/multifd-rewrite.ts";
import { COMPRESSION_NAMES, MULTIFD_FLAG } from "../stream/multifd-wire.ts";
import type { ChannelProcessor } from "../stream/relay.ts";
import type { PageJudge, PageRef, RamBlock } from "./page-judge.ts";

export interface MultifdPruneOptions {
  /** Categories to drop; on multifd channels only "free" is acted on (a cache reference needs the main channel). */
  drop: readonly Category[];
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
  /** Page bytes not sent. */
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
      bytesSaved: 0,
      unpruned: null,
    };
  }

  push(chunk: Buffer): Buffer[] {
    if (this.raw) return [chunk];
    return this.handle(this.parser.push(chunk));
  }

  end(): Buffer[] {
    const out = this.raw ? [] : this.handle(this.parser.end());
    const held = this.held;
    if (held) {
      // The channel ended inside a packet: what came of it goes on as it came (QEMU sees the truncation).
      this.held = null;
      this.countUnjudged("the channel ended inside the packet", held.header.normalPages);
      out.push(held.headerBytes, ...held.parts);
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

  private handle(events: MultifdEvent[]): Buffer[] {
    const out: Buffer[] = [];
    for (const e of events) {
      switch (e.kind) {
        case "init":
          this.report_.channelId = e.init.channelId;
          out.push(e.bytes);
          break;
        case "ram":
          this.onRamHeader(e.bytes, e.header, out);
          break;
        case "device":
          this.report_.packets++;
          this.report_.deviceStatePackets++;
          out.push(e.bytes);
          break;
        case "payload":
          if (!this.held) out.push(e.bytes);
          else {
            this.held.parts.push(e.bytes);
            if (e.endsPacket) {
              out.push(...this.decide(this.held));
              this.held = null;
            }
          }
          break;
        case "raw":
          if (this.parser.error && this.report_.unpruned === null)
            this.passRest(`${this.parser.error.message}: the rest of the channel was relayed unparsed`);
          out.push(e.bytes);
          break;
      }
    }
    return out;
  }

  private onRamHeader(headerBytes: Buffer, header: RamPacketHeader, out: Buffer[]): void {
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
      out.push(headerBytes);
      return;
    }
    if (header.normalPages === 0) {
      out.push(headerBytes);
      return;
    }
    const why = this.whyNotJudged(header);
    if (typeof why === "string") {
      this.countUnjudged(why, header.normalPages);
      out.push(headerBytes);
      return;
    }
    this.held = { headerBytes, header, blockLength: why.length, parts: [] };
  }

  /** The packet's block if its pages can be judged now, else why not. */
  private whyNotJudged(header: RamPacketHeader): RamBlock | string {
    if (typeof this.judgeOrReason === "string") return this.judgeOrReason;
    if (!this.dropFree)
      return this.options.drop.includes("free")
        ? `free pages are not dropped for this guest: ${this.judgeOrReason.refused?.free ?? "?"}`
        : "free pages are not asked to be dropped (only free pages can be pruned on multifd channels)";
    if (this.options.zeroList !== true) return this.options.zeroList;
    if (this.report_.unpruned !== null) return this.report_.unpruned;
    if (header.nextPacketSize !== header.normalPages * this.pageSizeBytes)
      return `next_packet_size does not match normal_pages x ${this.pageSizeBytes} in an uncompressed packet`;
    const blocks = this.options.ramBlocks();
    if (typeof blocks === "string") return blocks;
    const block = blocks.get(header.ramBlock);
    if (!block) return `RAM block '${header.ramBlock}' is not in the main channel's block list`;
    return block;
  }

  /** The whole packet is here: judge its normal pages, and move the free ones to the zero list. */
  private decide(held: HeldPacket): Buffer[] {
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
      return [headerBytes, payload];
    }
    const moved = new Set<number>();
    for (let k = 0; k < indices.length; k++) {
      const category = categories[k] ?? CATEGORY.unknown;
      this.counts[category] = (this.counts[category] ?? 0) + 1;
      if (category === CATEGORY.free) moved.add(indices[k] as number);
    }
    const r = this.report_;
    r.pagesJudged += refs.length;
    r.pagesPruned += moved.size;
    r.bytesSaved += moved.size * this.pageSizeBytes;
    if (this.options.dryRun || moved.size === 0) return [headerBytes, payload];
    return moveToZeroList({ headerBytes, header, payload }, moved, this.pageSizeBytes);
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
  bytesSaved: number;
}

export function summarizeMultifd(channels: readonly MultifdChannelReport[]): MultifdPruneReport {
  return {
    channels: [...channels],
    pagesJudged: channels.reduce((a, c) => a + c.pagesJudged, 0),
    pagesPruned: channels.reduce((a, c) => a + c.pagesPruned, 0),
    bytesSaved: channels.reduce((a, c) => a + c.bytesSaved, 0),
  };
}
