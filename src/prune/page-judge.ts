/**
 * What a page of the migration stream is to the guest kernel right now. The pruning processor hands it a batch of
 * page records (RAMBlock + offset, as QEMU names them) after the batch reached the relay; the judge maps each to
 * a guest-physical frame through QEMU's RAM layout and classifies the frames by reading their struct pages from
 * guest memory at that moment (invariant 1: classify after read). The layout comes from QEMU's memory map, or,
 * for a RAM file alone, from the block list at the head of the stream (the processor hands it over before the
 * first page record).
 */
import { CATEGORY, classifyPfns, type FreeBlockMemo, type PageClassifier } from "../introspect/classifier.ts";
import type { GuestMemory, RamMapping } from "../introspect/guest-memory.ts";
import {
  classifyGuest,
  classifyPresent,
  type OpenedClassifier,
  openClassifier,
} from "../introspect/inspect.ts";
import { describeCapabilities } from "../introspect/kernel-layout.ts";
import type { MemMap } from "../introspect/memmap.ts";
import { type SelfCheck, selfCheck } from "../introspect/self-check.ts";
import type { RamBlockEntry } from "../stream/records.ts";

/** x86-64 target page size: QEMU's TARGET_PAGE_BITS (12) and the guest's PAGE_SHIFT agree. */
const PAGE_SIZE = 4096;

export interface PageRef {
  block: string;
  /** Byte offset in the RAMBlock, as in the stream's page records. */
  blockOffset: number;
}

/** A RAMBlock as the stream's block list (the RAM section's MEM_SIZE record) names it. */
export type RamBlock = Pick<RamBlockEntry, "idstr" | "length">;

/**
 * Where the RAMBlocks sit in guest-physical memory: known before the migration (QEMU's memory map, asked over
 * QMP), or worked out when the stream's block list arrives, because a RAM file alone does not say which block it
 * holds. The function returns the layout, or why it cannot tell (a sentence for the report).
 */
export type RamLayoutSource =
  | readonly RamMapping[]
  | ((blocks: readonly RamBlock[]) => readonly RamMapping[] | string);

/** Judged pages that came out "unknown", for one cause. */
export interface UnknownCause {
  cause: string;
  pages: number;
}

export interface PageJudge {
  /** One CATEGORY code per page; "unknown" for pages outside the known RAM layout or unreadable memmap. */
  judge(pages: readonly PageRef[]): Uint8Array;
  /** The guest frame a page of the stream is in, or -1 (outside the RAM layout, or before it is known). */
  pfnOf?(page: PageRef): number;
  /** The page's bytes as guest memory holds them now (to answer a receiver's NACK). */
  readPage?(page: PageRef): Buffer;
  /** What was opened (kernel release, profile), for the report. */
  readonly description: string;
  /**
   * The stream's RAM block list, which QEMU sends before any page record: a judge whose layout depends on it
   * learns it here. Returns why this judge cannot judge the stream's pages (pruning then stops before the first
   * page), or null.
   */
  onRamBlocks?(blocks: readonly RamBlock[]): string | null;
  /** Why judged pages came out "unknown", counted by cause since the judge was opened (for the report). */
  unknownCauses?(): UnknownCause[];
  /**
   * Categories this guest's pages must not be pruned as, with the reason (a layout without the facts, a failed
   * self-check, page poisoning): the processor still counts them, and drops none of them.
   */
  readonly refused?: Partial<Record<"free" | "cache", string>>;
}

/** Maps (block, offset) to guest-physical page frames; small layouts (a few entries), so a linear search. */
class FrameMap {
  private readonly byBlock = new Map<string, RamMapping[]>();
  /** Only the RAM `memory` can read: ROM and device blocks in QEMU's layout (firmware mapped high) are left out. */
  constructor(layout: readonly RamMapping[], memory: GuestMemory) {
    for (const m of layout) {
      if (!memory.contains(m.gpa, m.size)) continue;
      const list = this.byBlock.get(m.block) ?? [];
      list.push(m);
      this.byBlock.set(m.block, list);
    }
  }
  /** The blocks with guest RAM in the layout. */
  get blocks(): string[] {
    return [...this.byBlock.keys()];
  }
  /** The PFN, or -1 if the block offset is not guest RAM in the layout. */
  pfn(ref: PageRef): number {
    for (const m of this.byBlock.get(ref.block) ?? [])
      if (ref.blockOffset >= m.blockOffset && ref.blockOffset < m.blockOffset + m.size)
        return Math.floor((m.gpa + (ref.blockOffset - m.blockOffset)) / PAGE_SIZE);
    return -1;
  }
}

/**
 * What the judges share: page records mapped to guest page frames through the RAM layout (given, or learnt from
 * the stream's block list), and the reasons pages came out unknown, counted. Subclasses classify the frames.
 */
export abstract class FrameJudge implements PageJudge {
  abstract readonly description: string;
  /** Null while the layout waits for the stream's block list (or was refused): every page is then unknown. */
  private frames: FrameMap | null;
  /** Pages whose block offset was not guest RAM in the layout, by block (a handful of blocks per stream). */
  private readonly outsideLayout = new Map<string, number>();
  /** Pages mapped to a frame whose struct page the classifier could not read or make sense of. */
  private unclassified = 0;

  constructor(
    protected readonly memory: GuestMemory,
    private readonly layout: RamLayoutSource,
  ) {
    this.frames = typeof layout === "function" ? null : new FrameMap(layout, memory);
  }

  onRamBlocks(blocks: readonly RamBlock[]): string | null {
    // A layout from QEMU's own memory map is already exact: the block list adds nothing to it.
    if (typeof this.layout !== "function") return null;
    const learnt = this.layout(blocks);
    if (typeof learnt === "string") {
      this.frames = null;
      return learnt;
    }
    this.frames = new FrameMap(learnt, this.memory);
    return null;
  }

  /** The page's frame, or -1 if its block offset is not guest RAM in the layout. */
  protected pfn(page: PageRef): number {
    return this.frames?.pfn(page) ?? -1;
  }

  pfnOf(page: PageRef): number {
    return this.pfn(page);
  }

  judge(pages: readonly PageRef[]): Uint8Array {
    const pfns = pages.map((p) => this.pfn(p));
    const classified = this.classifyFrames(pfns.filter((pfn) => pfn >= 0));
    const out = new Uint8Array(pages.length).fill(CATEGORY.unknown);
    let k = 0;
    for (let i = 0; i < pfns.length; i++) {
      if ((pfns[i] ?? -1) < 0) {
        const block = pages[i]?.block ?? "";
        this.outsideLayout.set(block, (this.outsideLayout.get(block) ?? 0) + 1);
        continue;
      }
      out[i] = classified[k++] ?? CATEGORY.unknown;
      if (out[i] === CATEGORY.unknown) this.unclassified++;
    }
    return out;
  }

  /** One category per frame (each one guest RAM in the layout), as guest memory says now. */
  protected abstract classifyFrames(pfns: readonly number[]): Uint8Array;

  unknownCauses(): UnknownCause[] {
    const inLayout = this.frames?.blocks ?? [];
    const known = inLayout.length > 0 ? inLayout.map((b) => `'${b}'`).join(", ") : "none";
    const causes: UnknownCause[] = [...this.outsideLayout].map(([block, pages]) => ({
      cause: this.frames
        ? `pages of block '${block}' that are not guest RAM in the layout (RAM blocks in it: ${known})`
        : `pages of block '${block}' judged while the RAM layout was unknown (no usable RAM block list from the stream)`,
      pages,
    }));
    if (this.unclassified > 0)
      causes.push({
        cause: "pages whose struct page was unreadable or not understood",
        pages: this.unclassified,
      });
    return causes;
  }
}

/** Classifies each batch by reading the batch's struct pages from guest memory (the normal mode). */
export class IntrospectionJudge extends FrameJudge {
  readonly description: string;
  private readonly classifier: PageClassifier;
  private readonly memmap: MemMap;
  private readonly maxPfn: number;
  private lastRefreshMs = 0;
  /** The last free block a batch found: where the next batch looks first (classifyPfns reads it again). */
  private readonly lastFreeBlock: FreeBlockMemo = { head: -1, end: -1 };
  readonly refused: Partial<Record<"free" | "cache", string>>;
  /** The checks made before pruning (self-check.ts). */
  readonly checks: SelfCheck[];
  /** The opened guest kernel: its memory map, layout and types (the cache page locator reads through them). */
  readonly guest: OpenedClassifier;

  /**
   * Opens the guest kernel (VMCOREINFO, BTF, layout) and checks it against the kernel's own counters; throws an
   * IntrospectError if it cannot be opened. What the layout or a check rules out is in `refused`.
   */
  constructor(memory: GuestMemory, layout: RamLayoutSource) {
    super(memory, layout);
    const opened = openClassifier(memory);
    this.guest = opened;
    this.classifier = opened.classifier;
    this.memmap = opened.kernel.memmap;
    this.maxPfn = Math.ceil(memory.end / PAGE_SIZE);
    const checked = selfCheck(opened, memory, () => classifyPresent(opened, this.maxPfn));
    this.checks = checked.checks;
    const { free, cache } = opened.layout.capabilities;
    this.refused = {
      ...(free.on ? {} : { free: free.reason }),
      ...(cache.on ? {} : { cache: cache.reason }),
      ...checked.refused,
    };
    const checks = checked.checks.map((c) => `${c.name} ${c.verdict}`).join(", ");
    this.description =
      `Linux ${opened.kernel.release} (${describeCapabilities(opened.layout)}; types: ${opened.btf}; checks: ${checks}), ` +
      `opened in ${opened.openMs.toFixed(0)} ms, checked in ${checked.elapsedMs.toFixed(0)} ms`;
  }

  readPage(page: PageRef): Buffer {
    const pfn = this.pfn(page);
    if (pfn < 0) throw new Error(`page ${page.block}+0x${page.blockOffset.toString(16)} is not guest RAM`);
    return this.memory.read(pfn * PAGE_SIZE, PAGE_SIZE);
  }

  protected classifyFrames(pfns: readonly number[]): Uint8Array {
    // A frame of guest RAM without an online section: memory onlined (or hot-added) since the open? Read
    // mem_section again, at most once a second; until then such pages are unknown and pass unchanged.
    const now = performance.now();
    if (
      now - this.lastRefreshMs > REFRESH_INTERVAL_MS &&
      pfns.some((p) => p < this.maxPfn && !this.memmap.hasStructPage(p))
    ) {
      this.lastRefreshMs = now;
      this.memmap.refresh();
    }
    return classifyPfns(this.classifier, this.memmap, pfns, this.maxPfn, this.lastFreeBlock);
  }
}

/** How often a judge may re-read mem_section when it meets frames without struct pages. */
const REFRESH_INTERVAL_MS = 1000;

/**
 * TEST ONLY: classifies the whole guest once, when created, and answers every later batch from that snapshot.
 * It breaks invariant 1 on purpose, so that a test can show the stale-classification trap is real.
 */
export class SnapshotJudge extends FrameJudge {
  readonly description: string;
  private readonly categories: Uint8Array;

  constructor(memory: GuestMemory, layout: RamLayoutSource) {
    super(memory, layout);
    const g = classifyGuest(memory);
    this.categories = g.categories;
    this.description = `Linux ${g.report.kernel.release}, classified ONCE at start (test-only, unsafe)`;
  }

  protected classifyFrames(pfns: readonly number[]): Uint8Array {
    return Uint8Array.from(pfns, (pfn) => this.categories[pfn] ?? CATEGORY.unknown);
  }
}
