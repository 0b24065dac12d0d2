/**
 * Where the guest keeps `struct page` of each page frame: decoded from `mem_section`, the sparse memory model's
 * section table, as makedumpfile's get_mm_sparsemem() does (../shared/docs/linux-page-introspection.md §2.4
 * route A). This works on 6.1, which exports no SYMBOL(vmemmap).
 *
 * - SPARSEMEM_EXTREME (Debian): `SYMBOL(mem_section)` is the value of the pointer to an array of
 *   `LENGTH(mem_section)` = NR_SECTION_ROOTS root pointers; each non-NULL root is one page of
 *   `PAGE_SIZE / SIZE(mem_section)` `struct mem_section` (include/linux/mmzone.h).
 * - `section_mem_map` (at `OFFSET(mem_section.section_mem_map)`): bit 0 SECTION_MARKED_PRESENT, bit 1
 *   SECTION_HAS_MEM_MAP, bit 2 SECTION_IS_ONLINE (4.13+), more flags above them as kernels added some
 *   (SECTION_MAP_LAST_BIT grew from 5 to 6 and more); the rest is `mem_map - section_start_pfn` (mm/sparse.c
 *   sparse_encode_mem_map), so struct page of `pfn` is at `coded + pfn * SIZE(page)`. With SPARSEMEM_VMEMMAP
 *   `coded` is vmemmap_base for every section.
 * - Only online sections are read: an offline section's struct pages are stale (memory being added or
 *   removed), so its PFNs have no struct page here and are never judged. Memory onlined later is picked up
 *   by refresh().
 * - Untrusted: only sections below the end of guest RAM are looked at (the table cannot make this allocate more
 *   than one entry per 128 MiB of RAM), every pointer is translated with checks, and each section's memmap
 *   must map.
 *
 * `isBuddyFree` reads the free-page marker (page type PG_buddy in `_mapcount`, order in `private`,
 * mm/page_alloc.c set_buddy_order) so kernel.ts can tell live VMCOREINFO from stale copies.
 */
import type { AddressSpace } from "./address-space.ts";
import type { StructPageSource } from "./classifier.ts";
import { hex, IntrospectError, MemSectionError } from "./errors.ts";
import type { VmcoreInfo } from "./vmcoreinfo.ts";

const PAGE_SIZE = 4096;
const PAGE_SHIFT = 12;
/** SECTION_MARKED_PRESENT, SECTION_HAS_MEM_MAP, SECTION_IS_ONLINE (include/linux/mmzone.h, 4.13-7.x). */
const SECTION_MARKED_PRESENT = 1n;
const SECTION_HAS_MEM_MAP = 2n;
const SECTION_IS_ONLINE = 4n;
/**
 * The flag bits below the coded pointer. The coded value is aligned to the smaller alignment of mem_map (page
 * aligned) and section_nr_to_pfn() * SIZE(page) (include/linux/mmzone.h, the comment above
 * SECTION_MARKED_PRESENT), so on x86-64 its low 12 bits are flags whatever SECTION_MAP_LAST_BIT is.
 */
const SECTION_MAP_MASK = ~0xfffn & ((1n << 64n) - 1n);
const MASK64 = (1n << 64n) - 1n;

export interface MemSectionLayout {
  /** Value of the `mem_section` pointer (direct-map VA of the root array). */
  memSection: bigint;
  roots: number;
  sectionStructSize: number;
  sectionMemMapOffset: number;
  sectionSizeBits: number;
  maxPhysmemBits: number;
  /** `SIZE(page)`. */
  structPageSize: number;
}

/** The mem_section parameters from VMCOREINFO, each bounded to what a real kernel could have. */
export function memSectionLayout(info: VmcoreInfo): MemSectionLayout {
  try {
    const layout: MemSectionLayout = {
      memSection: info.symbol("SYMBOL(mem_section)"),
      roots: info.bounded("LENGTH(mem_section)", 1, 1 << 20),
      sectionStructSize: info.bounded("SIZE(mem_section)", 8, PAGE_SIZE),
      sectionMemMapOffset: info.has("OFFSET(mem_section.section_mem_map)")
        ? info.bounded("OFFSET(mem_section.section_mem_map)", 0, 64)
        : 0,
      sectionSizeBits: info.bounded("NUMBER(SECTION_SIZE_BITS)", 15, 34),
      maxPhysmemBits: info.bounded("NUMBER(MAX_PHYSMEM_BITS)", 32, 52),
      structPageSize: info.bounded("SIZE(page)", 32, 256),
    };
    if (layout.sectionMemMapOffset + 8 > layout.sectionStructSize)
      throw new MemSectionError(
        "bad-mem-section",
        "OFFSET(mem_section.section_mem_map) is past SIZE(mem_section)",
      );
    // SPARSEMEM_EXTREME: NR_SECTION_ROOTS = DIV_ROUND_UP(NR_MEM_SECTIONS, SECTIONS_PER_ROOT) (mmzone.h).
    const perRoot = Math.floor(PAGE_SIZE / layout.sectionStructSize);
    const expected = Math.ceil(2 ** (layout.maxPhysmemBits - layout.sectionSizeBits) / perRoot);
    if (layout.roots !== expected)
      throw new MemSectionError(
        "bad-mem-section",
        `LENGTH(mem_section)=${layout.roots}, SPARSEMEM_EXTREME would have ${expected}: unsupported memory model`,
      );
    return layout;
  } catch (error) {
    if (error instanceof MemSectionError) throw error;
    if (error instanceof IntrospectError) throw new MemSectionError("bad-mem-section", error.message);
    throw error;
  }
}

export interface PfnRange {
  startPfn: number;
  count: number;
}

export class MemMap implements StructPageSource {
  readonly pfnsPerSection: number;
  /** Per section number below the end of RAM: `coded` (see header), 0n if the section has no memmap. */
  private coded: BigUint64Array;
  private common: bigint | null = null;
  private present = 0;
  /** Times refresh() found sections come online or go away. */
  refreshes = 0;
  readonly structPageSize: number;
  private readonly sizeBig: bigint;
  private readonly pagePair: Buffer;

  private constructor(
    readonly addressSpace: AddressSpace,
    readonly layout: MemSectionLayout,
    coded: BigUint64Array,
    private readonly info: VmcoreInfo,
    private readonly ramEnd: number,
  ) {
    this.pfnsPerSection = 2 ** (layout.sectionSizeBits - PAGE_SHIFT);
    this.coded = coded;
    this.structPageSize = layout.structPageSize;
    this.sizeBig = BigInt(layout.structPageSize);
    this.pagePair = Buffer.alloc(layout.structPageSize);
    this.adopt(coded);
  }

  /** The common `coded` value (vmemmap_base) if every present section has the same, else null. */
  get vmemmapBase(): bigint | null {
    return this.common;
  }

  get presentSections(): number {
    return this.present;
  }

  private adopt(coded: BigUint64Array): void {
    this.coded = coded;
    let common: bigint | null = null;
    let present = 0;
    let same = true;
    for (const c of coded) {
      if (c === 0n) continue;
      present++;
      if (common === null) common = c;
      else if (common !== c) same = false;
    }
    this.present = present;
    this.common = same ? common : null;
  }

  /**
   * Reads mem_section again (memory onlined, hot-added or removed since the decode): true if the set of online
   * sections changed. A table that no longer decodes leaves the current one in place.
   */
  refresh(): boolean {
    let fresh: MemMap;
    try {
      fresh = MemMap.decode(this.addressSpace, this.info, this.ramEnd);
    } catch (error) {
      if (error instanceof IntrospectError) return false;
      throw error;
    }
    const changed =
      fresh.coded.length !== this.coded.length || fresh.coded.some((c, i) => c !== this.coded[i]);
    if (changed) {
      this.adopt(fresh.coded);
      this.refreshes++;
    }
    return changed;
  }

  /**
   * Decodes mem_section for the sections below `ramEnd` (guest-physical bytes). Throws MemSectionError if the
   * table cannot be read or no section is present.
   */
  static decode(addressSpace: AddressSpace, info: VmcoreInfo, ramEnd = addressSpace.memory.end): MemMap {
    const layout = memSectionLayout(info);
    const perRoot = Math.floor(PAGE_SIZE / layout.sectionStructSize);
    const sectionBytes = 2 ** layout.sectionSizeBits;
    const sections = Math.min(
      Math.ceil(ramEnd / sectionBytes),
      2 ** (layout.maxPhysmemBits - layout.sectionSizeBits),
    );
    const roots = Math.min(layout.roots, Math.ceil(sections / perRoot));
    const coded = new BigUint64Array(sections);
    const rootPtrs = Buffer.alloc(roots * 8);
    const page = Buffer.alloc(PAGE_SIZE);
    const as = addressSpace;
    const fail = (what: string, error: unknown): never => {
      const detail = error instanceof Error ? error.message : String(error);
      throw new MemSectionError("bad-mem-section", `mem_section: ${what}: ${detail}`);
    };
    try {
      as.readVirt(layout.memSection, rootPtrs);
    } catch (error) {
      fail(`root array at ${hex(layout.memSection)}`, error);
    }
    for (let r = 0; r < roots; r++) {
      const root = rootPtrs.readBigUInt64LE(r * 8);
      if (root === 0n) continue;
      try {
        as.readVirt(root, page);
      } catch (error) {
        fail(`root ${r} at ${hex(root)}`, error);
      }
      for (let i = 0; i < perRoot; i++) {
        const nr = r * perRoot + i;
        if (nr >= sections) break;
        const smm = page.readBigUInt64LE(i * layout.sectionStructSize + layout.sectionMemMapOffset);
        const wanted = SECTION_MARKED_PRESENT | SECTION_HAS_MEM_MAP | SECTION_IS_ONLINE;
        if ((smm & wanted) !== wanted) continue;
        const c = smm & SECTION_MAP_MASK;
        // The section's first struct page must be mapped: a forged pointer is caught here, not on every read.
        const first =
          (c +
            BigInt(nr) * BigInt(2 ** (layout.sectionSizeBits - PAGE_SHIFT)) * BigInt(layout.structPageSize)) &
          MASK64;
        if (c === 0n || as.tryTranslate(first) < 0)
          throw new MemSectionError(
            "bad-mem-section",
            `mem_section[${nr}]: memmap at ${hex(first)} is not mapped (section_mem_map ${hex(smm)})`,
          );
        coded[nr] = c;
      }
    }
    const map = new MemMap(as, layout, coded, info, ramEnd);
    if (map.presentSections === 0)
      throw new MemSectionError(
        "bad-mem-section",
        `mem_section at ${hex(layout.memSection)}: no present section`,
      );
    return map;
  }

  /** Number of sections covered (below the end of RAM). */
  get sections(): number {
    return this.coded.length;
  }

  /** Whether `pfn` lies in a present section (has a struct page). */
  hasStructPage(pfn: number): boolean {
    const s = Math.floor(pfn / this.pfnsPerSection);
    return pfn >= 0 && s < this.coded.length && this.coded[s] !== 0n;
  }

  /** Kernel virtual address of struct page of `pfn`, or null if its section is not present. */
  structPageAddress(pfn: number): bigint | null {
    if (!Number.isSafeInteger(pfn) || pfn < 0) return null;
    const s = Math.floor(pfn / this.pfnsPerSection);
    const c = s < this.coded.length ? (this.coded[s] as bigint) : 0n;
    if (c === 0n) return null;
    return (c + BigInt(pfn) * this.sizeBig) & MASK64;
  }

  /** PFN ranges of present sections, adjacent sections merged. */
  presentPfnRanges(): PfnRange[] {
    const out: PfnRange[] = [];
    for (let s = 0; s < this.coded.length; s++) {
      if (this.coded[s] === 0n) continue;
      const startPfn = s * this.pfnsPerSection;
      const last = out.at(-1);
      if (last && last.startPfn + last.count === startPfn) last.count += this.pfnsPerSection;
      else out.push({ startPfn, count: this.pfnsPerSection });
    }
    return out;
  }

  /**
   * Reads the struct pages of PFNs [pfn, pfn+count) into `into` (SIZE(page) bytes each): one virtual read per
   * section piece, i.e. one positional read per 2 MiB of vmemmap. False if any of them has no readable struct
   * page (StructPageSource contract).
   */
  read(pfn: number, count: number, into: Buffer): boolean {
    if (count < 0 || count * this.structPageSize > into.length) return false;
    let done = 0;
    while (done < count) {
      const p = pfn + done;
      const address = this.structPageAddress(p);
      if (address === null) return false;
      const inSection = this.pfnsPerSection - (p % this.pfnsPerSection);
      const n = Math.min(count - done, inSection);
      if (!this.addressSpace.tryReadVirt(address, into, done * this.structPageSize, n * this.structPageSize))
        return false;
      done += n;
    }
    return true;
  }

  /** The PFN whose struct page starts at `address`, or null (not a struct page of a present section). */
  pfnOfStructPage(address: bigint): number | null {
    if (this.vmemmapBase !== null) {
      const delta = (address - this.vmemmapBase) & MASK64;
      if (delta % this.sizeBig !== 0n) return null;
      const pfn = delta / this.sizeBig;
      if (pfn >= BigInt(this.coded.length * this.pfnsPerSection)) return null;
      return this.hasStructPage(Number(pfn)) ? Number(pfn) : null;
    }
    for (let s = 0; s < this.coded.length; s++) {
      const c = this.coded[s] as bigint;
      if (c === 0n) continue;
      const delta = (address - c) & MASK64;
      if (delta % this.sizeBig !== 0n) continue;
      const pfn = delta / this.sizeBig;
      if (pfn >= BigInt(s * this.pfnsPerSection) && pfn < BigInt((s + 1) * this.pfnsPerSection))
        return Number(pfn);
    }
    return null;
  }

  /**
   * Whether `pfn` is in a free buddy block: some aligned head at order k ≤ max has the buddy page type in
   * `_mapcount` and order ≥ k in `private` (mm/page_alloc.c; include/linux/page-flags.h). Uses
   * `NUMBER(PAGE_BUDDY_MAPCOUNT_VALUE)`: -129 (6.1 scheme, exact) or a top-byte type (6.10+ scheme, the low 24
   * bits are the owner's), and `LENGTH(zone.free_area)` orders. Null when the kernel does not export them.
   */
  isBuddyFree(pfn: number, info: VmcoreInfo): boolean | null {
    let buddy: number;
    let maxOrder: number;
    let mapcountAt: number;
    let privateAt: number;
    try {
      buddy = Number(BigInt.asUintN(32, info.signed("NUMBER(PAGE_BUDDY_MAPCOUNT_VALUE)")));
      maxOrder = info.bounded("LENGTH(zone.free_area)", 1, 16) - 1;
      mapcountAt = info.bounded("OFFSET(page._mapcount)", 0, this.structPageSize - 4);
      privateAt = info.bounded("OFFSET(page.private)", 0, this.structPageSize - 8);
    } catch {
      return null;
    }
    const topByteOnly = (buddy & 0xffffff) === 0;
    for (let order = 0; order <= maxOrder; order++) {
      const head = pfn - (pfn % 2 ** order);
      if (!this.read(head, 1, this.pagePair)) continue;
      const mapcount = this.pagePair.readUInt32LE(mapcountAt);
      const isBuddy = topByteOnly ? mapcount >>> 24 === buddy >>> 24 : mapcount === buddy;
      if (!isBuddy) continue;
      const blockOrder = this.pagePair.readBigUInt64LE(privateAt);
      if (blockOrder >= BigInt(order) && blockOrder <= BigInt(maxOrder)) return true;
    }
    return false;
  }
}
