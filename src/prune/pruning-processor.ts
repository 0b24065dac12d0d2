/**
 * The rewriting main-channel processor of `vmprune send --drop free`: parses what the source QEMU sends, and for
 * the PAGE records of each chunk asks a {@link PageJudge} what those pages are *now* (after the records arrived:
 * invariant 1). A page the guest kernel holds free goes on as a ZERO record for the same block and offset (same
 * CONTINUE state); every other record goes on as the very bytes QEMU sent (invariant 2): the processor keeps the
 * input chunks until their records are decided and forwards views of them, so it neither re-encodes nor copies
 * what it does not change. Why dropping is safe: QEMU clears a page's dirty bit before it reads the page for a
 * record, so a page that is free when the relay looks has no content the guest can rely on, and any later
 * allocation writes to it, which QEMU catches and sends again.
 *
 * Degrading (invariant 4): a judge that could not be opened, refuses the stream's RAM block list (it cannot tell
 * where the blocks sit in guest memory; the list comes before any page record), or fails mid-way, turns the
 * processor into a passthrough for the rest of the stream, with the reason in the report; records already
 * pruned were free when judged. Pages the judge could not place or read stay as they are ("unknown"); when they
 * are more than 1% of those judged, the report says how many and why. XBZRLE (invariant 3): QEMU's deltas are
 * against what it believes the destination holds; a delta for a page the relay zeroed would corrupt it. So
 * pruning refuses xbzrle (checked before the migration by the CLI); should a delta arrive anyway, the processor
 * passes everything through if it has pruned nothing yet, and otherwise fails the migration (the relay resets
 * both sides, the source keeps running: invariant 5).
 */
import { CATEGORY, CATEGORY_NAMES, type Category } from "../introspect/classifier.ts";
import { FRAME_HEADER_BYTES, REF_FIXED_BYTES } from "../link/protocol.ts";
import { StreamParser } from "../stream/parser.ts";
import type { RamRecord, StreamRecord } from "../stream/records.ts";
import type { MainChannelProcessor } from "../stream/relay.ts";
import { StreamSummary, type StreamSummaryJson } from "../stream/summary.ts";
import { encodePageHeader, writeZeroRecord, zeroRecordBytes } from "../stream/writer.ts";
import type { MultifdPruneReport } from "./multifd-processor.ts";
import type { PageJudge, PageRef, RamBlock } from "./page-judge.ts";

type PageRecord = Extract<RamRecord, { type: "page" }>;

/** A PAGE record's length on the wire: be64 address and flags, the counted idstr unless CONTINUE, the page. */
function pageRecordBytes(page: PageRecord): number {
  return 8 + (page.header.idstr === null ? 0 : 1 + page.header.idstr.length) + page.data.length;
}

/**
 * Above this share of judged pages "unknown", the report warns: a few ROM and firmware pages are unknown in every
 * migration, a larger share means the judge cannot see part of guest RAM (a wrong layout, unreadable memmap).
 */
const UNKNOWN_WARNING_SHARE = 0.01;

/** What a REF frame adds beyond the page header it carries (link/protocol.ts). */
const REF_OVERHEAD_BYTES = FRAME_HEADER_BYTES + REF_FIXED_BYTES;

/**
 * Where a clean page-cache page's bytes are on shared storage: a block of the shared disk as the content index
 * found it (storage/disk-index.ts), or a place in a filesystem named by its UUID, as the guest kernel's metadata
 * says (storage/page-locator.ts).
 */
export type RefTarget =
  | { kind: "index"; block: number }
  | { kind: "filesystem"; uuid: Buffer; offset: number }
  /** A byte offset on the shared disk itself (a locator result for a receiver that takes only REF). */
  | { kind: "disk"; offset: number };

/** Which references the receiver takes (link capabilities), or none (a plain QEMU destination). */
export interface RefsAccepted {
  index: boolean;
  filesystem: boolean;
  /** Filesystem references without a record header, for pages inside multifd packets (link 1.3). */
  multifd?: boolean;
  /** Pages of zeros written in place by the receiver (link ZEROS, 1.3). */
  zeroFill?: boolean;
  /**
   * The receiver takes references, but the link has room now: clean cache pages go whole, which costs both ends
   * less than a reference (link-send.ts, refs "link-busy"). Set with every reference kind above off.
   */
  linkHasRoom?: boolean;
}
export const NO_REFS: RefsAccepted = { index: false, filesystem: false };
export const ALL_REFS: RefsAccepted = { index: true, filesystem: true, multifd: true, zeroFill: true };

/** Answers "where is this clean cache page on shared storage?" (storage/cache-references.ts). */
export interface CacheIndex {
  /** `pfn`: the guest frame the page is in (-1 if unknown); `accepted`: the kinds the receiver takes. */
  lookup(page: Buffer, pfn: number, accepted: RefsAccepted): { target: RefTarget; hash: Buffer } | null;
}

/**
 * What the processor emits: QEMU stream bytes, or (with a receiver) a reference that replaces one PAGE record:
 * the record's header bytes as QEMU wrote them, and where its 4096 bytes are on the shared disk.
 */
export type Segment =
  | { kind: "bytes"; buffers: Buffer[] }
  | { kind: "ref"; pageHeader: Buffer; target: RefTarget; hash: Buffer; page: PageRef }
  /** Pages of zeros the receiver writes in place (free pages inside a multifd packet, link ZEROS). */
  | { kind: "zeros"; pages: number };

export interface PruneOptions {
  /**
   * Categories to drop: "free" pages become ZERO records; "cache" pages whose bytes `cacheIndex` finds on the
   * shared disk become references (only through {@link PruningProcessor.pushSegments}, for a receiver).
   */
  drop: readonly Category[];
  cacheIndex?: CacheIndex;
  /** Judge and count, but forward every record unchanged. */
  dryRun?: boolean;
  log?: (line: string) => void;
}

export interface PruneReport {
  mode: "prune" | "dry-run" | "passthrough";
  drop: Category[];
  /** What the judge opened (kernel release and profile), or null when introspection was unavailable. */
  judge: string | null;
  /** Why pruning stopped or never started (passthrough), or null. */
  degraded: string | null;
  /** PAGE records seen, by the category they had when judged; `pruned` (and `bytesSaved`) count what a dry run
   * would have pruned. */
  pages: { seen: number; pruned: number; byCategory: Record<Category, number> };
  /** Bytes not sent: each pruned PAGE record (header + page) became a ZERO record (header + 1 byte). */
  bytesSaved: number;
  /** Cache pages sent as references to the shared disk, and cache pages looked up but not found there. */
  refs: number;
  cacheMisses: number;
  /** Cache pages sent whole, not looked up, because the link had room for them (RefsAccepted.linkHasRoom). */
  cacheWhole: number;
  /** Judge calls, and the time spent in them (reading struct pages and classifying). */
  batches: number;
  judgeMs: number;
  /** Set when more than 1% of the judged pages were "unknown" (never pruned): how many, and why. */
  unknownWarning: string | null;
  /** Categories asked for that this guest's pages may not be pruned as, with the reason. */
  refused: Partial<Record<"free" | "cache", string>>;
  /** The multifd channels' pruning (send adds it when the migration has multifd channels). */
  multifd?: MultifdPruneReport;
}

/** One input chunk held until every record in it has been decided, and where it starts in the stream. */
interface HeldChunk {
  start: number;
  bytes: Buffer;
}

export class PruningProcessor implements MainChannelProcessor {
  private readonly parser = new StreamParser({ onError: "passthrough" });
  /** Input not yet forwarded, in stream order; `forwarded` is the stream offset everything before went out. */
  private held: HeldChunk[] = [];
  private received = 0;
  private forwarded = 0;
  private readonly summary = new StreamSummary({ sha256: false });
  private readonly drop: Set<number>;
  private readonly refused: Partial<Record<"free" | "cache", string>>;
  private readonly counts = new Array<number>(CATEGORY_NAMES.length).fill(0);
  private seen = 0;
  private pruned = 0;
  private bytesSaved = 0;
  private batches = 0;
  private judgeMs = 0;
  private degraded: string | null;
  private refs = 0;
  private cacheMisses = 0;
  private cacheWhole = 0;
  /** The stream's RAM blocks, once the judge has accepted them (what multifd packets are judged against). */
  private ramBlocks: Map<string, RamBlock> | null = null;

  constructor(
    private readonly judgeOrReason: PageJudge | string,
    private readonly options: PruneOptions,
  ) {
    this.refused = {};
    if (typeof judgeOrReason !== "string")
      for (const c of options.drop) {
        const reason = c === "free" || c === "cache" ? judgeOrReason.refused?.[c] : undefined;
        if (reason === undefined) continue;
        this.refused[c as "free" | "cache"] = reason;
        options.log?.(`vmprune send: not dropping ${c} pages: ${reason}`);
      }
    this.drop = new Set(options.drop.filter((c) => !(c in this.refused)).map((c) => CATEGORY[c]));
    this.degraded = typeof judgeOrReason === "string" ? judgeOrReason : null;
  }

  /** For a plain QEMU destination: the bytes to forward. */
  push(chunk: Buffer): Buffer[] {
    return this.plain(this.pushSegments(chunk, NO_REFS));
  }

  end(): Buffer[] {
    return this.plain(this.endSegments(NO_REFS));
  }

  /** For a receiver: bytes and references, in stream order. */
  pushSegments(chunk: Buffer, refs: RefsAccepted = ALL_REFS): Segment[] {
    this.summary.chunk(chunk);
    if (chunk.length > 0) this.held.push({ start: this.received, bytes: chunk });
    this.received += chunk.length;
    // Bytes past parser.offset belong to a record still incomplete: they wait for its decision.
    return this.emit(this.parser.push(chunk), refs, this.parser.offset);
  }

  endSegments(refs: RefsAccepted = ALL_REFS): Segment[] {
    // The stream ended: whatever is left (a truncated record included) goes on as it came.
    return this.emit(this.parser.end(), refs, this.received);
  }

  private plain(segments: Segment[]): Buffer[] {
    // A batch with pruned pages is one spliced buffer (emit); without, the input's views, at most a few (the
    // relay writes several buffers with one writev).
    return segments.flatMap((s) => (s.kind === "bytes" ? s.buffers : []));
  }

  /**
   * The segments for this batch of records: the input as it came up to `upTo` (the end of the last complete
   * record), with each decided PAGE record replaced by its ZERO record or its reference. Input without a decision
   * goes on as views of the held chunks; a run with ZERO records is spliced into one new buffer (one copy, no
   * allocation per page).
   */
  private emit(records: StreamRecord[], refs: RefsAccepted, upTo: number): Segment[] {
    for (const r of records) this.summary.record(r);
    const decisions = this.decide(records, refs);
    const out: Segment[] = [];
    let zeros: PageRecord[] = [];
    if (decisions)
      for (const [record, decision] of decisions) {
        const page = record as PageRecord;
        if (decision === "zero") {
          zeros.push(page);
          continue;
        }
        this.splice(page.offset, zeros, out);
        zeros = [];
        this.skip(page.offset + pageRecordBytes(page));
        out.push(decision);
      }
    this.splice(upTo, zeros, out);
    return out;
  }

  /**
   * Appends the input from `forwarded` up to `end` to `out` as a bytes segment, each of `zeros` (PAGE records
   * within that range, in stream order) replaced by its ZERO record.
   */
  private splice(end: number, zeros: readonly PageRecord[], out: Segment[]): void {
    if (zeros.length === 0) {
      const views: Buffer[] = [];
      this.forward(end, views);
      if (views.length > 0) out.push({ kind: "bytes", buffers: views });
      return;
    }
    let size = end - this.forwarded;
    for (const z of zeros) size += zeroRecordBytes(z.header) - pageRecordBytes(z);
    const buf = Buffer.allocUnsafe(size);
    let at = 0;
    for (const z of zeros) {
      at = this.copyInto(z.offset, buf, at);
      at = writeZeroRecord(z, buf, at);
      this.skip(z.offset + pageRecordBytes(z));
    }
    at = this.copyInto(end, buf, at);
    out.push({ kind: "bytes", buffers: [buf] });
  }

  /** Copies the held input from `forwarded` up to `end` into `buf` at `at`; returns the offset after it. */
  private copyInto(end: number, buf: Buffer, at: number): number {
    for (const chunk of this.held) {
      if (chunk.start >= end) break;
      const from = Math.max(0, this.forwarded - chunk.start);
      const to = Math.min(end, chunk.start + chunk.bytes.length) - chunk.start;
      if (to > from) at += chunk.bytes.copy(buf, at, from, to);
    }
    this.skip(end);
    return at;
  }

  /** Moves `forwarded` to `end` (input before it is either out or replaced) and lets go of chunks behind it. */
  private skip(end: number): void {
    if (end > this.forwarded) this.forwarded = end;
    let drop = 0;
    for (const chunk of this.held) {
      if (chunk.start + chunk.bytes.length > this.forwarded) break;
      drop++;
    }
    if (drop > 0) this.held = this.held.slice(drop);
  }

  /** Appends views of the held input from `forwarded` up to `end` to `into`, and lets go of what is behind. */
  private forward(end: number, into: Buffer[]): void {
    for (const chunk of this.held) {
      const chunkEnd = chunk.start + chunk.bytes.length;
      if (chunk.start >= end) break;
      if (chunkEnd > this.forwarded)
        into.push(
          chunk.bytes.subarray(
            Math.max(0, this.forwarded - chunk.start),
            Math.min(end, chunkEnd) - chunk.start,
          ),
        );
    }
    this.skip(end);
  }

  /** What becomes of this batch's PAGE records: a ZERO record, a reference, or (absent) unchanged. */
  private decide(
    records: StreamRecord[],
    refs: RefsAccepted,
  ): Map<StreamRecord, "zero" | Extract<Segment, { kind: "ref" }>> | null {
    const pages: PageRecord[] = [];
    for (const r of records) {
      if (r.kind !== "ram") continue;
      if (r.type === "page") pages.push(r);
      else if (r.type === "xbzrle") this.onXbzrle();
      // The block list comes first in the stream, so a batch's pages are judged after the judge learnt it.
      else if (r.type === "memSize") this.onRamBlocks(r.blocks);
    }
    if (pages.length === 0) return null;
    this.seen += pages.length;
    const judge = this.judgeOrReason;
    if (this.degraded !== null || typeof judge === "string") return null;
    let categories: Uint8Array;
    const started = performance.now();
    try {
      categories = judge.judge(
        pages.map((p): PageRef => ({ block: p.header.block, blockOffset: p.header.addr })),
      );
    } catch (error) {
      this.degrade(`introspection failed mid-way: ${error instanceof Error ? error.message : String(error)}`);
      return null;
    } finally {
      this.judgeMs += performance.now() - started;
      this.batches++;
    }
    const decisions = new Map<StreamRecord, "zero" | Extract<Segment, { kind: "ref" }>>();
    for (let i = 0; i < pages.length; i++) {
      const page = pages[i] as PageRecord;
      const category = categories[i] ?? CATEGORY.unknown;
      this.counts[category] = (this.counts[category] ?? 0) + 1;
      if (!this.drop.has(category)) continue;
      if (category === CATEGORY.cache) {
        // A clean cache page: a reference if its exact bytes are a block of the shared disk (the receiver checks
        // the hash again against the disk as it is then), else it goes in full.
        if (!this.options.cacheIndex) continue;
        if (refs.linkHasRoom) this.cacheWhole++;
        if (!(refs.index || refs.filesystem)) continue;
        const ref: PageRef = { block: page.header.block, blockOffset: page.header.addr };
        const found = this.options.cacheIndex.lookup(page.data, judge.pfnOf?.(ref) ?? -1, refs);
        if (!found) {
          this.cacheMisses++;
          continue;
        }
        const pageHeader = encodePageHeader(page.header).buf;
        this.refs++;
        this.pruned++;
        this.bytesSaved += this.parser.pageSize - REF_OVERHEAD_BYTES;
        if (!this.options.dryRun)
          decisions.set(page, {
            kind: "ref",
            pageHeader,
            target: found.target,
            hash: found.hash,
            page: ref,
          });
        continue;
      }
      this.pruned++;
      this.bytesSaved += this.parser.pageSize - 1;
      if (!this.options.dryRun) decisions.set(page, "zero");
    }
    return decisions.size > 0 ? decisions : null;
  }

  private onRamBlocks(blocks: readonly RamBlock[]): void {
    const judge = this.judgeOrReason;
    if (this.degraded !== null || typeof judge === "string") return;
    const accepted = new Map(blocks.map((b) => [b.idstr, { idstr: b.idstr, length: b.length }]));
    if (!judge.onRamBlocks) {
      this.ramBlocks = accepted;
      return;
    }
    let refused: string | null;
    try {
      refused = judge.onRamBlocks(blocks);
    } catch (error) {
      refused = `the guest's RAM layout could not be matched to the stream's RAM blocks: ${error instanceof Error ? error.message : String(error)}`;
    }
    if (refused !== null) this.degrade(refused);
    else this.ramBlocks = accepted;
  }

  /**
   * For the multifd channels, which share this processor's judge: the RAM blocks the judge knows (from the main
   * channel's block list, which comes before any page on it), or why multifd pages cannot be judged now.
   */
  ramBlocksForMultifd(): ReadonlyMap<string, RamBlock> | string {
    if (typeof this.judgeOrReason === "string") return this.judgeOrReason;
    if (this.degraded !== null) return `the main channel stopped pruning: ${this.degraded}`;
    return this.ramBlocks ?? "it arrived before the main channel's RAM block list (MEM_SIZE)";
  }

  private onXbzrle(): void {
    if (this.degraded !== null || this.options.dryRun) return;
    if (this.pruned > 0)
      throw new Error(
        "QEMU sent an XBZRLE delta after vmprune had zeroed free pages (xbzrle was turned on during the migration): " +
          "failing this migration so the destination cannot apply a delta to a zeroed page; the source keeps running. " +
          "Turn the xbzrle capability off to prune.",
      );
    this.degrade("QEMU sends XBZRLE deltas (xbzrle is on): pruning is off for this migration");
  }

  private degrade(reason: string): void {
    this.degraded = reason;
    this.options.log?.(`vmprune send: ${reason}; passing the rest of the stream through unchanged`);
  }

  report(): PruneReport {
    // Pruning that stopped before judging anything (a refused block list, an early XBZRLE delta) was a passthrough.
    const mode =
      typeof this.judgeOrReason === "string" || (this.degraded !== null && this.batches === 0)
        ? "passthrough"
        : this.options.dryRun
          ? "dry-run"
          : "prune";
    return {
      mode,
      drop: [...this.options.drop],
      judge: typeof this.judgeOrReason === "string" ? null : this.judgeOrReason.description,
      degraded: this.degraded,
      pages: {
        seen: this.seen,
        pruned: this.pruned,
        byCategory: Object.fromEntries(CATEGORY_NAMES.map((n, i) => [n, this.counts[i] ?? 0])) as Record<
          Category,
          number
        >,
      },
      bytesSaved: this.bytesSaved,
      refs: this.refs,
      cacheMisses: this.cacheMisses,
      cacheWhole: this.cacheWhole,
      batches: this.batches,
      judgeMs: Math.round(this.judgeMs),
      unknownWarning: this.unknownWarning(),
      refused: this.refused,
    };
  }

  /** "N of M judged pages (x%) were unknown: why", when more than 1% were. */
  private unknownWarning(): string | null {
    const judged = this.counts.reduce((a, b) => a + b, 0);
    const unknown = this.counts[CATEGORY.unknown] ?? 0;
    if (judged === 0 || unknown <= judged * UNKNOWN_WARNING_SHARE) return null;
    const judge = this.judgeOrReason;
    const causes = typeof judge === "string" ? undefined : judge.unknownCauses?.();
    const why =
      causes && causes.length > 0
        ? causes.map((c) => `${c.pages} ${c.cause}`).join("; ")
        : "the judge gives no cause";
    return `${unknown} of ${judged} judged pages (${((100 * unknown) / judged).toFixed(1)}%) were unknown and not pruned: ${why}`;
  }

  /** What the source sent (records by type, as parsed before rewriting). */
  stream(): StreamSummaryJson {
    return this.summary.toJSON(this.parser);
  }
}
