/**
 * What a page of the migration stream is to the guest kernel right now. The pruning processor hands it a batch of
 * page records (RAMBlock + offset, as QEMU names them) after the batch reached the relay; the judge maps each to
 * a guest-physical frame through QEMU's RAM layout and classifies the frames by reading their struct pages from
 * guest memory at that moment (invariant 1: classify after read).
 */
import {
  CATEGORY,
  classifyPfns,
  type PageClassifier,
  type StructPageSource,
} from "../introspect/classifier.ts";
import type { GuestMemory, RamMapping } from "../introspect/guest-memory.ts";
import { classifyGuest, openClassifier } from "../introspect/inspect.ts";

/** x86-64 target page size: QEMU's TARGET_PAGE_BITS (12) and the guest's PAGE_SHIFT agree. */
const PAGE_SIZE = 4096;

export interface PageRef {
  block: string;
  /** Byte offset in the RAMBlock, as in the stream's page records. */
  blockOffset: number;
}

export interface PageJudge {
  /** One CATEGORY code per page; "unknown" for pages outside the known RAM layout or unreadable memmap. */
  judge(pages: readonly PageRef[]): Uint8Array;
  /** The page's bytes as guest memory holds them now (to answer a receiver's NACK). */
  readPage?(page: PageRef): Buffer;
  /** What was opened (kernel release, profile), for the report. */
  readonly description: string;
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
  /** The PFN, or -1 if the block offset is not guest RAM in the layout. */
  pfn(ref: PageRef): number {
    for (const m of this.byBlock.get(ref.block) ?? [])
      if (ref.blockOffset >= m.blockOffset && ref.blockOffset < m.blockOffset + m.size)
        return Math.floor((m.gpa + (ref.blockOffset - m.blockOffset)) / PAGE_SIZE);
    return -1;
  }
}

/** Classifies each batch by reading the batch's struct pages from guest memory (the normal mode). */
export class IntrospectionJudge implements PageJudge {
  readonly description: string;
  private readonly classifier: PageClassifier;
  private readonly memmap: StructPageSource;
  private readonly frames: FrameMap;
  private readonly maxPfn: number;

  /** Opens the guest kernel (VMCOREINFO scan, profile); throws an IntrospectionError if it cannot. */
  constructor(
    private readonly memory: GuestMemory,
    layout: readonly RamMapping[],
  ) {
    const opened = openClassifier(memory);
    this.classifier = opened.classifier;
    this.memmap = opened.kernel.memmap;
    this.frames = new FrameMap(layout, memory);
    this.maxPfn = Math.ceil(memory.end / PAGE_SIZE);
    this.description = `Linux ${opened.kernel.release} (${opened.profile.name}), opened in ${opened.openMs.toFixed(0)} ms`;
  }

  readPage(page: PageRef): Buffer {
    const pfn = this.frames.pfn(page);
    if (pfn < 0) throw new Error(`page ${page.block}+0x${page.blockOffset.toString(16)} is not guest RAM`);
    return this.memory.read(pfn * PAGE_SIZE, PAGE_SIZE);
  }

  judge(pages: readonly PageRef[]): Uint8Array {
    const pfns = pages.map((p) => this.frames.pfn(p));
    const mapped = pfns.filter((pfn) => pfn >= 0);
    const classified = classifyPfns(this.classifier, this.memmap, mapped, this.maxPfn);
    const out = new Uint8Array(pages.length).fill(CATEGORY.unknown);
    let k = 0;
    for (let i = 0; i < pfns.length; i++)
      if ((pfns[i] ?? -1) >= 0) out[i] = classified[k++] ?? CATEGORY.unknown;
    return out;
  }
}

/**
 * TEST ONLY: classifies the whole guest once, when created, and answers every later batch from that snapshot.
 * It breaks invariant 1 on purpose, so that a test can show the stale-classification trap is real.
 */
export class SnapshotJudge implements PageJudge {
  readonly description: string;
  private readonly categories: Uint8Array;
  private readonly frames: FrameMap;

  constructor(memory: GuestMemory, layout: readonly RamMapping[]) {
    const g = classifyGuest(memory);
    this.categories = g.categories;
    this.frames = new FrameMap(layout, memory);
    this.description = `Linux ${g.report.kernel.release}, classified ONCE at start (test-only, unsafe)`;
  }

  judge(pages: readonly PageRef[]): Uint8Array {
    return Uint8Array.from(pages, (p) => {
      const pfn = this.frames.pfn(p);
      return pfn >= 0 ? (this.categories[pfn] ?? CATEGORY.unknown) : CATEGORY.unknown;
    });
  }
}
