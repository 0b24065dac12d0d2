/**
 * Classifies guest page frames from their struct pages, the way the guest kernel itself sees them
 * (../shared/docs/linux-page-introspection.md §3-5):
 *
 * - free: buddy blocks of every order (the head's `private` is the order; the whole block is free), offline and
 *   unaccepted pages, hugetlb pool pages not in use; per-CPU-list pages only with `inferPcpFree` (they look like
 *   any flagless, unreferenced page, doc §3.5).
 * - cache: the papers' redundant cache, what drop_caches would evict: a file page (an address_space mapping, not
 *   swap-backed) that is uptodate, not dirty, not under writeback, not locked, without private data, not in the
 *   swap cache and not mapped (doc §4.2).
 * - inode: every other file page (mapped, dirty, writeback, with buffers, block-device metadata).
 * - anonymous: anon and KSM pages (mapping bit 0), anon THP, hugetlb pages in use.
 * - shmem: swap-backed file pages (tmpfs, memfd, SysV shm).
 * - kernel: slab, page tables, reserved, non-LRU movable pages, everything else referenced.
 *
 * Compound pages (THP, large folios, hugetlb, high-order slab) are classified by their head and the category
 * applies to every page of the compound. Guest memory is untrusted: orders are bounded and checked for
 * alignment, tail pointers that lead nowhere give "unknown", and nothing here allocates per guest value.
 */
import {
  type KernelLayout,
  PAGE_FLAG_ENUMERATORS,
  PAGE_MAPPING_ANON,
  type PageFlag,
} from "./kernel-layout.ts";

/** Category codes, also the byte values of `vmprune inspect --pfn-map`. */
export const CATEGORY = {
  unknown: 0,
  free: 1,
  cache: 2,
  inode: 3,
  anonymous: 4,
  shmem: 5,
  kernel: 6,
} as const;
export type Category = keyof typeof CATEGORY;
export const CATEGORY_NAMES = Object.keys(CATEGORY) as Category[];

/** Attribute bits per PFN. */
export const ATTR = { dirty: 1, mapped: 2, private: 4, writeback: 8, pcpInferred: 16, buddy: 32 } as const;

/** The largest compound order accepted (1 GiB hugetlb pages: order 18). */
const MAX_COMPOUND_ORDER = 18;
const MASK64 = (1n << 64n) - 1n;

/** Where struct pages are read from: the guest's memmap through the introspected address space. */
export interface StructPageSource {
  /** Reads the struct pages of PFNs [pfn, pfn+count) into `into` (SIZE(page) bytes each); false if unreadable. */
  read(pfn: number, count: number, into: Buffer): boolean;
  /** The PFN whose struct page is at this kernel virtual address (a tail's compound_head), or null. */
  pfnOfStructPage(address: bigint): number | null;
  /** Kernel virtual address of the struct page of `pfn` (to apply a 7.1+ compound_info mask), or null. */
  structPageAddress(pfn: number): bigint | null;
}

export interface ClassifyOptions {
  /** Treat unreferenced flagless pages (per-CPU free lists) as free. Off by default: only inferred. */
  inferPcpFree?: boolean;
}

export interface Classification {
  firstPfn: number;
  categories: Uint8Array;
  attributes: Uint8Array;
}

/**
 * The last free buddy block classifyOne found in one read of struct pages: PFNs [head, end). Valid only with that
 * read (the same buffer, so as fresh as the PFNs it is asked about).
 */
export interface FreeBlockMemo {
  head: number;
  end: number;
}

interface HeadVerdict {
  category: number;
  attributes: number;
  /** Pages this verdict covers from the head (1 for a small page, 2^order for a compound or buddy block). */
  pages: number;
}

/** A verdict for `pages` pages (a plain function, not a closure per page: headVerdict runs for every page). */
function covering(category: number, attributes: number, pages: number): HeadVerdict {
  return { category, attributes, pages };
}

export class PageClassifier {
  /** Each flag's bit in the low word of page->flags (0 for a flag this kernel lacks or keeps above bit 31). */
  private readonly bit: Record<PageFlag, number>;
  private readonly scratch: Buffer;
  /** SIZE(page): the stride of every struct page buffer. */
  readonly size: number;
  private readonly off: KernelLayout["offsets"];
  private readonly maxBuddyOrder: number;
  /** PFNs a buddy block can span (2^max order): a batch window starts at a multiple of it. */
  readonly buddySpan: number;
  /** log2(SIZE(page)) if it is a power of two, for the 7.1+ compound_info mask form; else -1. */
  private readonly sizeShift: number;
  private readonly cacheOn: boolean;
  /** Folio mapcount fields that lie within page[0..1] (the pair read for a head). */
  private readonly folioMapcounts: KernelLayout["folioMapcounts"];

  constructor(
    readonly layout: KernelLayout,
    private readonly source: StructPageSource,
    private readonly options: ClassifyOptions = {},
  ) {
    if (!layout.capabilities.free.on)
      throw new RangeError(
        `cannot classify pages of Linux ${layout.release}: ${layout.capabilities.free.reason}`,
      );
    // Every flag present (0 when absent), so that the hot path reads a named field and never a missing one.
    const bit = Object.fromEntries(Object.keys(PAGE_FLAG_ENUMERATORS).map((name) => [name, 0])) as Record<
      PageFlag,
      number
    >;
    for (const [name, n] of Object.entries(layout.flags)) bit[name as PageFlag] = n < 32 ? 2 ** n : 0;
    this.bit = bit;
    this.size = layout.structPageSize;
    this.off = layout.offsets;
    this.scratch = Buffer.alloc(2 * this.size);
    this.maxBuddyOrder = layout.maxBuddyOrder;
    this.buddySpan = 2 ** layout.maxBuddyOrder;
    this.sizeShift = (this.size & (this.size - 1)) === 0 ? Math.log2(this.size) : -1;
    this.cacheOn = layout.capabilities.cache.on;
    this.folioMapcounts = layout.folioMapcounts.filter((m) => m.offset + 4 <= 2 * this.size);
  }

  /**
   * Classifies PFNs [firstPfn, firstPfn+count) given their struct pages in `pages` (64 bytes each, as read from
   * the source). Compound pages and buddy blocks that start before the range are resolved through the source.
   */
  classifyRange(firstPfn: number, count: number, pages: Buffer): Classification {
    const categories = new Uint8Array(count);
    const attributes = new Uint8Array(count);
    let i = 0;
    while (i < count) {
      const at = i * this.size;
      const verdict = this.verdictAt(firstPfn + i, pages, at, firstPfn, count);
      const end = Math.min(count, i + Math.max(1, verdict.pages));
      categories.fill(verdict.category, i, end);
      attributes.fill(verdict.attributes, i, end);
      i = end;
    }
    return { firstPfn, categories, attributes };
  }

  /**
   * The category and attributes of one PFN of a range read into `pages` (as classifyRange would give it), without
   * classifying the rest of the range: for batches of page records. The range must start at a multiple of
   * buddySpan (or at the PFN itself), so that a buddy block holding the PFN has its head in the range: a page
   * inside a free block is found by looking for a buddy head of a large enough order at each aligned position
   * below it (as the kernel's page_is_buddy walk does).
   */
  classifyOne(
    pfn: number,
    firstPfn: number,
    count: number,
    pages: Buffer,
    found?: FreeBlockMemo,
  ): { category: number; attributes: number } {
    // Only a page that looks like the tail of a free block can be inside one: skip the search for all others.
    const maybeBuddyTail = this.mayBeInsideFreeBlock(pfn, firstPfn, pages);
    // A free block found for an earlier PFN of the same read holds this one too: the search would end at its head.
    if (maybeBuddyTail && found && pfn >= found.head && pfn < found.end)
      return { category: CATEGORY.free, attributes: ATTR.buddy };
    for (let order = 1; maybeBuddyTail && order <= this.maxBuddyOrder; order++) {
      const head = pfn - (pfn % 2 ** order);
      if (head === pfn) continue;
      if (head < firstPfn) break;
      const headOrder = this.buddyOrderAt(pages, (head - firstPfn) * this.size);
      if (headOrder >= order) {
        // A real buddy head is aligned to its order; only then is the block's extent known.
        if (found && head % 2 ** headOrder === 0) {
          found.head = head;
          found.end = head + 2 ** headOrder;
        }
        return { category: CATEGORY.free, attributes: ATTR.buddy };
      }
    }
    const verdict = this.verdictAt(pfn, pages, (pfn - firstPfn) * this.size, firstPfn, count);
    return { category: verdict.category, attributes: verdict.attributes };
  }

  /** The buddy order of the struct page at `at` if it is a free buddy block's head (PageBuddy), else -1. */
  buddyOrderAt(pages: Buffer, at: number): number {
    if (this.layout.pageType(pages.readUInt32LE(at + this.off.mapcount)) !== "buddy") return -1;
    const privateLo = pages.readUInt32LE(at + this.off.private);
    const privateHi = pages.readUInt32LE(at + this.off.private + 4);
    return privateHi === 0 && privateLo <= this.maxBuddyOrder ? privateLo : -1;
  }

  /**
   * Whether the page at `pfn` could be the tail of a free buddy block, judged from its own struct page: no flags,
   * no references, no page type, no mapping, and not the tail of a compound page (freeing a compound clears its
   * tails' compound_head, free_tail_page_prepare in mm/page_alloc.c). Only such a page needs the search for a
   * buddy head below it.
   */
  mayBeInsideFreeBlock(pfn: number, firstPfn: number, pages: Buffer): boolean {
    const at = (pfn - firstPfn) * this.size;
    const off = this.off;
    return (
      (pages.readUInt32LE(at + off.flags) & this.layout.flagsMask) === 0 &&
      (pages.readUInt32LE(at + off.tail) & 1) === 0 &&
      pages.readInt32LE(at + off.refcount) === 0 &&
      pages.readInt32LE(at + off.mapcount) === -1 &&
      pages.readUInt32LE(at + off.mapping) === 0 &&
      pages.readUInt32LE(at + off.mapping + 4) === 0
    );
  }

  /** The verdict for the page at `pfn` (struct page at `at` in `pages`), covering it and maybe pages after it. */
  private verdictAt(pfn: number, pages: Buffer, at: number, firstPfn: number, count: number): HeadVerdict {
    const flagsLo = pages.readUInt32LE(at + this.off.flags);
    if ((pages.readUInt32LE(at + this.off.tail) & 1) === 1 && (flagsLo & this.bit.head) === 0) {
      // A tail: classify by its head; the verdict covers the tail and the rest of the compound.
      const headPfn = this.headOfTail(pfn, pages.readBigUInt64LE(at + this.off.tail));
      if (headPfn === null || headPfn >= pfn || pfn - headPfn > 2 ** MAX_COMPOUND_ORDER)
        return { category: CATEGORY.unknown, attributes: 0, pages: 1 };
      const head = this.readHeadPair(headPfn, pages, firstPfn, count);
      if (!head) return { category: CATEGORY.unknown, attributes: 0, pages: 1 };
      const verdict = this.headVerdict(headPfn, head.buf, head.at);
      const remaining = headPfn + verdict.pages - pfn;
      if (remaining <= 0) return { category: CATEGORY.unknown, attributes: 0, pages: 1 };
      return { ...verdict, pages: remaining };
    }
    // A small page or a head: the first tail (page[1]) is in `pages` unless the head is the last of the range.
    if ((flagsLo & this.bit.head) !== 0 && at + 2 * this.size > pages.length) {
      const pair = this.readHeadPair(pfn, pages, firstPfn, count);
      if (!pair) return { category: CATEGORY.unknown, attributes: 0, pages: 1 };
      return this.headVerdict(pfn, pair.buf, pair.at);
    }
    return this.headVerdict(pfn, pages, at);
  }

  /**
   * The head PFN a tail's compound_head/compound_info names: head address | 1 (every version), or on 7.1+ with
   * HVO a mask GENMASK(63, order + log2(SIZE(page))) | 1 to apply to the tail's own address (page-flags.h@7.2).
   * A value whose bits above bit 0 are ones from bit 63 down, then zeros, cannot be a head address (no
   * vmemmap lies there), so the two forms never collide.
   */
  private headOfTail(pfn: number, info: bigint): number | null {
    const value = info & ~1n & MASK64;
    if (this.layout.tailEncoding === "pointer-or-mask" && this.sizeShift > 0) {
      const low = (~value & MASK64) + 1n; // 2^shift for a GENMASK(63, shift)
      if ((low & (low - 1n)) === 0n && low > 1n << BigInt(this.sizeShift)) {
        const self = this.source.structPageAddress(pfn);
        return self === null ? null : this.source.pfnOfStructPage(self & value);
      }
    }
    return this.source.pfnOfStructPage(value);
  }

  /** The struct pages of a head and its first tail: from the batch if it holds both, else from the source. */
  private readHeadPair(headPfn: number, pages: Buffer, firstPfn: number, count: number) {
    if (headPfn >= firstPfn && headPfn + 1 < firstPfn + count)
      return { buf: pages, at: (headPfn - firstPfn) * this.size };
    return this.source.read(headPfn, 2, this.scratch) ? { buf: this.scratch, at: 0 } : null;
  }

  /** Verdict for a small page or a compound head (with page[1] right after it in `buf`). */
  private headVerdict(pfn: number, buf: Buffer, at: number): HeadVerdict {
    const p = this.layout;
    const off = this.off;
    const flagsLo = buf.readUInt32LE(at + off.flags);
    const mappingLo = buf.readUInt32LE(at + off.mapping);
    const mappingHi = buf.readUInt32LE(at + off.mapping + 4);
    const privateLo = buf.readUInt32LE(at + off.private);
    const privateHi = buf.readUInt32LE(at + off.private + 4);
    const mapcountWord = buf.readUInt32LE(at + off.mapcount);
    const refcount = buf.readInt32LE(at + off.refcount);
    const type = p.pageType(mapcountWord);
    const isHead = (flagsLo & this.bit.head) !== 0;

    let pages = 1;
    if (isHead && p.compoundOrderOffset !== null && p.compoundOrderOffset < 2 * this.size) {
      const order = buf[at + p.compoundOrderOffset] ?? 0;
      if (order >= 1 && order <= MAX_COMPOUND_ORDER && pfn % 2 ** order === 0) pages = 2 ** order;
    }

    if (type === "buddy") {
      // The buddy order lives in page->private (set_buddy_order, mm/page_alloc.c).
      const order = privateHi === 0 && privateLo <= this.maxBuddyOrder ? privateLo : -1;
      if (order < 0 || pfn % 2 ** order !== 0) return { category: CATEGORY.unknown, attributes: 0, pages: 1 };
      return { category: CATEGORY.free, attributes: ATTR.buddy, pages: 2 ** order };
    }
    if (type === "offline" || type === "unaccepted") return covering(CATEGORY.free, 0, pages);
    if (type === "slab" || type === "other") return covering(CATEGORY.kernel, 0, pages);
    if ((flagsLo & this.bit.slab) !== 0) return covering(CATEGORY.kernel, 0, pages);
    if (type === "hugetlb" || (isHead && this.isHugetlbHead(buf, at)))
      return covering(refcount === 0 ? CATEGORY.free : CATEGORY.anonymous, 0, pages);
    if ((flagsLo & this.bit.reserved) !== 0) return covering(CATEGORY.kernel, 0, pages);

    const mapped = this.isMapped(buf, at, mapcountWord, isHead && pages > 1);
    let attributes = mapped ? ATTR.mapped : 0;
    if ((flagsLo & this.bit.dirty) !== 0) attributes |= ATTR.dirty;
    if ((flagsLo & this.bit.writeback) !== 0) attributes |= ATTR.writeback;
    if ((flagsLo & this.bit.private) !== 0 || (flagsLo & this.bit.private2) !== 0) attributes |= ATTR.private;

    const mappingLow = mappingLo & 3;
    const hasMapping = mappingLo !== 0 || mappingHi !== 0;
    if (hasMapping && (mappingLow & PAGE_MAPPING_ANON) === PAGE_MAPPING_ANON)
      return covering(CATEGORY.anonymous, attributes, pages); // anon, KSM
    if (hasMapping && mappingLow === 0) {
      if ((flagsLo & this.bit.swapbacked) !== 0) return covering(CATEGORY.shmem, attributes, pages);
      // Without the flags that tell a clean page (no BTF), no file page is called droppable.
      const droppable =
        this.cacheOn &&
        (flagsLo & this.bit.uptodate) !== 0 &&
        (flagsLo & this.bit.dirty) === 0 &&
        (flagsLo & this.bit.writeback) === 0 &&
        (flagsLo & this.bit.locked) === 0 &&
        (flagsLo & this.bit.private) === 0 &&
        (flagsLo & this.bit.private2) === 0 &&
        (flagsLo & this.bit.swapcache) === 0 &&
        !mapped;
      return covering(droppable ? CATEGORY.cache : CATEGORY.inode, attributes, pages);
    }
    if (hasMapping) return covering(CATEGORY.kernel, attributes, pages); // non-LRU movable (zsmalloc, balloon)
    const flagless = (flagsLo & p.flagsMask) === 0;
    if (refcount === 0 && flagless && (mapcountWord | 0) === -1 && !isHead) {
      return this.options.inferPcpFree
        ? covering(CATEGORY.free, ATTR.pcpInferred, pages)
        : covering(CATEGORY.kernel, ATTR.pcpInferred, pages);
    }
    return covering(CATEGORY.kernel, attributes, pages);
  }

  /** Whether a compound head (page[1] right after it in `buf`) is a hugetlb folio, by the layout's test. */
  private isHugetlbHead(buf: Buffer, at: number): boolean {
    const h = this.layout.hugetlb;
    if (h.kind === "dtor") return h.offset < 2 * this.size && buf[at + h.offset] === h.value;
    if (h.kind === "tail-flag")
      return h.bit < 32 && ((buf.readUInt32LE(at + this.size + this.off.flags) >>> h.bit) & 1) === 1;
    return false;
  }

  /**
   * Mapped into a process: a small page's `_mapcount` >= 0; a large folio's own or entire mapcount, at the
   * offsets the layout found in BTF (compound_mapcount, _entire_mapcount, _large_mapcount, ...).
   */
  private isMapped(buf: Buffer, at: number, mapcountWord: number, compound: boolean): boolean {
    if ((mapcountWord | 0) >= 0) return true;
    if (!compound) return false;
    for (const m of this.folioMapcounts) if (buf.readInt32LE(at + m.offset) > m.base) return true;
    return false;
  }
}

/** Counts of each category in a classification. */
export function countCategories(categories: Uint8Array): Record<Category, number> {
  const counts = new Array<number>(CATEGORY_NAMES.length).fill(0);
  for (const c of categories) counts[c] = (counts[c] ?? 0) + 1;
  return Object.fromEntries(CATEGORY_NAMES.map((name, i) => [name, counts[i] ?? 0])) as Record<
    Category,
    number
  >;
}

/**
 * classifyPfns' read buffer, reused across calls (it runs for every batch of page records during a migration;
 * a fresh zeroed buffer per batch was a tenth of the relay's allocations). Only read within one synchronous call.
 */
let structPageScratch = Buffer.allocUnsafe(0);
/** One struct page: a free block's head, read apart from the batch's window (freeBlockHolds). */
let headScratch = Buffer.alloc(0);

/**
 * Classifies a set of PFNs (e.g. the pages of a batch of migration records) with as few struct-page reads as
 * possible: PFNs are grouped into windows aligned to the largest buddy block, so that a free page inside a
 * buddy block is seen together with its block's head; each window's struct pages are read once. Returns the
 * category per requested PFN (in the order given); PFNs whose struct pages cannot be read are "unknown".
 */
export function classifyPfns(
  classifier: PageClassifier,
  source: StructPageSource,
  pfns: readonly number[],
  maxPfn: number,
  lastFreeBlock?: FreeBlockMemo,
): Uint8Array {
  const out = new Uint8Array(pfns.length);
  const span = classifier.buddySpan;
  const size = classifier.size;
  const order = pfns.map((_, i) => i).sort((a, b) => (pfns[a] ?? 0) - (pfns[b] ?? 0));
  let k = 0;
  while (k < order.length) {
    const first = pfns[order[k] ?? 0] ?? 0;
    if (first >= maxPfn || first < 0) {
      // Beyond guest RAM (e.g. a ROM block mapped high): no struct page to read. Sorted, so the rest are too,
      // except negative ones, which come first and are equally unknown.
      out[order[k] ?? 0] = CATEGORY.unknown;
      k++;
      continue;
    }
    const start = first - (first % span);
    // Extend the window over following PFNs while they stay within a few spans (keeps reads contiguous).
    let end = Math.min(maxPfn, start + span);
    let j = k;
    while (j < order.length && (pfns[order[j] ?? 0] ?? 0) < Math.min(maxPfn, end + span * 3)) {
      const pfn = pfns[order[j] ?? 0] ?? 0;
      if (pfn >= end) end = Math.min(maxPfn, pfn - (pfn % span) + span);
      j++;
    }
    // Read the requested PFNs' own struct pages, to just past the last one (a head's first tail holds its order).
    // Only a PFN that looks like the tail of a free block needs the struct pages below it, back to its span's
    // aligned start where such a block has its head (the window's start: later spans start above `first`): those
    // are read when one comes. Most batches are not free pages, and reading from the aligned start every time
    // cost up to 64 KiB per batch, for the few hundred bytes of the batch's own struct pages.
    const last = pfns[order[j - 1] ?? 0] ?? start;
    const stop = Math.min(maxPfn, last + 2);
    let from = first;
    let pages = readStructPages(source, from, stop - from, size);
    const found: FreeBlockMemo = { head: -1, end: -1 };
    for (let i = k; i < j; i++) {
      const index = order[i] ?? 0;
      const pfn = pfns[index] ?? 0;
      if (
        pages !== null &&
        pfn - (pfn % span) < from &&
        !(pfn >= found.head && pfn < found.end) &&
        classifier.mayBeInsideFreeBlock(pfn, from, pages)
      ) {
        // The free block an earlier batch found may hold this page: read its head's struct page alone, now, and
        // if it is still a buddy head covering the page, the page is free (a block split or allocated since has
        // another order or no PageBuddy there). QEMU walks a large free block in many batches: reading from the
        // span's start for each cost 10 KiB a batch on average, 114 MB per migration of the demo's guest.
        if (lastFreeBlock && freeBlockHolds(classifier, source, lastFreeBlock, pfn, found)) {
          out[index] = CATEGORY.free;
          continue;
        }
        from = start;
        pages = readStructPages(source, from, stop - from, size);
      }
      out[index] = pages
        ? classifier.classifyOne(pfn, from, stop - from, pages, found).category
        : CATEGORY.unknown;
    }
    // The window's free block, for the next batch to look at first.
    if (lastFreeBlock && found.end > found.head) {
      lastFreeBlock.head = found.head;
      lastFreeBlock.end = found.end;
    }
    k = j;
  }
  return out;
}

/**
 * Whether `block` (a free block found before) still holds `pfn`, read now from its head's struct page; if so,
 * `found` becomes that block (the rest of the batch inside it needs no read). A block that is no longer a buddy
 * head of that order is forgotten.
 */
function freeBlockHolds(
  classifier: PageClassifier,
  source: StructPageSource,
  block: FreeBlockMemo,
  pfn: number,
  found: FreeBlockMemo,
): boolean {
  if (!(pfn > block.head && pfn < block.end)) return false;
  // Its own buffer: the batch's window is a view of structPageScratch.
  if (headScratch.length < classifier.size) headScratch = Buffer.alloc(classifier.size);
  const head = headScratch.subarray(0, classifier.size);
  const order = source.read(block.head, 1, head) ? classifier.buddyOrderAt(head, 0) : -1;
  if (order < 0 || block.head % 2 ** order !== 0 || pfn >= block.head + 2 ** order) {
    block.head = -1;
    block.end = -1;
    return false;
  }
  block.end = block.head + 2 ** order;
  found.head = block.head;
  found.end = block.end;
  return true;
}

/** Struct pages of PFNs [pfn, pfn+count) into the shared scratch buffer, or null if the source cannot read them. */
function readStructPages(source: StructPageSource, pfn: number, count: number, size: number): Buffer | null {
  if (structPageScratch.length < count * size) structPageScratch = Buffer.allocUnsafe(count * size);
  const pages = structPageScratch.subarray(0, count * size);
  return source.read(pfn, count, pages) ? pages : null;
}
