/**
 * What the classifier must know about a kernel version that VMCOREINFO does not say: the page-flag bits it does
 * not export, how page types are encoded in `_mapcount`, and where a compound page keeps its order. Sources:
 * include/linux/page-flags.h and include/linux/mm_types.h of each version, tabulated in
 * ../shared/docs/linux-page-introspection.md §3.2-3.4 and §6. A kernel without a profile is refused, never
 * guessed: a wrong bit would call a page in use free.
 */

export type PageFlag =
  | "locked"
  | "referenced"
  | "uptodate"
  | "dirty"
  | "lru"
  | "active"
  | "slab"
  | "swapcache"
  | "reserved"
  | "private"
  | "private2"
  | "writeback"
  | "head"
  | "swapbacked"
  | "unevictable"
  | "mlocked"
  | "hwpoison";

export type PageType =
  | "buddy"
  | "offline"
  | "table"
  | "guard"
  | "hugetlb"
  | "slab"
  | "zsmalloc"
  | "unaccepted";

export interface KernelProfile {
  name: string;
  /** Releases this profile covers (`OSRELEASE` from VMCOREINFO). */
  release: RegExp;
  /** Bit numbers in `page->flags` (doc §3.2). A flag the version does not have is absent. */
  flags: Partial<Record<PageFlag, number>>;
  /** Bits of `flags` that are page flags at all (the zone/node fields sit above them). */
  flagsMask: number;
  /** Page type from the `_mapcount`/`page_type` word, or null for a mapcount (doc §3.3). */
  pageType(word: number): PageType | null;
  /** Order of a compound page from its first tail's struct page (64 bytes at `tail`), doc §3.4. */
  compoundOrder(tail: Buffer, at: number): number;
  /** Whether a compound head (with its first tail) is a hugetlb page. */
  isHugetlb(head: Buffer, headAt: number, tail: Buffer, tailAt: number): boolean;
  /** VMCOREINFO keys that must be present with these values, else the profile does not apply. */
  expect: Record<string, number>;
  /**
   * Keys that must have these values when present. PG_hwpoison exists only with CONFIG_MEMORY_FAILURE, which
   * Debian's cloud kernels leave off (their VMCOREINFO has no NUMBER(PG_hwpoison)); it is the highest bit the
   * classifier reads, so its absence moves nothing below it.
   */
  expectIfPresent: Record<string, number>;
}

/** ≤6.9 page types: PAGE_TYPE_BASE 0xf0000000, a type clears its bit (include/linux/page-flags.h@v6.1). */
function pageType61(word: number): PageType | null {
  const w = word >>> 0;
  if ((w & 0xf0000000) >>> 0 !== 0xf0000000 || (w | 0) >= -128) return null;
  // PageX: (page_type & (PAGE_TYPE_BASE | bit)) == PAGE_TYPE_BASE, i.e. the bit is clear.
  if ((w & 0x80) === 0) return "buddy";
  if ((w & 0x100) === 0) return "offline";
  if ((w & 0x200) === 0) return "table";
  if ((w & 0x400) === 0) return "guard";
  return null;
}

/** 6.10+ page types: `enum pagetype` in the top byte (include/linux/page-flags.h@v6.12). */
const TYPES_612: PageType[] = [
  "buddy",
  "offline",
  "table",
  "guard",
  "hugetlb",
  "slab",
  "zsmalloc",
  "unaccepted",
];
function pageType612(word: number): PageType | null {
  const top = (word >>> 24) & 0xff;
  return top >= 0xf0 && top <= 0xf7 ? (TYPES_612[top - 0xf0] ?? null) : null;
}

export const PROFILES: KernelProfile[] = [
  {
    name: "linux-6.1",
    release: /^6\.1\.\d+/,
    flags: {
      locked: 0,
      referenced: 1,
      uptodate: 2,
      dirty: 3,
      lru: 4,
      active: 5,
      slab: 9,
      swapcache: 10,
      reserved: 12,
      private: 13,
      private2: 14,
      writeback: 15,
      head: 16,
      swapbacked: 19,
      unevictable: 20,
      mlocked: 21,
      hwpoison: 23,
    },
    flagsMask: 0xffffff,
    pageType: pageType61,
    // page[1].compound_order: u8 at +17 (OFFSET(page.compound_order), mm_types.h@v6.1).
    compoundOrder: (tail, at) => tail[at + 17] ?? 0,
    // page[1].compound_dtor == HUGETLB_PAGE_DTOR (2), u8 at +16.
    isHugetlb: (_head, _headAt, tail, tailAt) => tail[tailAt + 16] === 2,
    expect: {
      "NUMBER(PG_lru)": 4,
      "NUMBER(PG_private)": 13,
      "NUMBER(PG_swapcache)": 10,
      "NUMBER(PG_swapbacked)": 19,
      "NUMBER(PG_slab)": 9,
      "NUMBER(PG_head_mask)": 65536,
      "NUMBER(PAGE_BUDDY_MAPCOUNT_VALUE)": -129,
      "SIZE(page)": 64,
      "OFFSET(page.flags)": 0,
      "OFFSET(page.mapping)": 24,
      "OFFSET(page.private)": 40,
      "OFFSET(page._mapcount)": 48,
      "OFFSET(page._refcount)": 52,
      "OFFSET(page.compound_head)": 8,
    },
    expectIfPresent: { "NUMBER(PG_hwpoison)": 23 },
  },
  {
    name: "linux-6.12",
    release: /^6\.12\.\d+/,
    flags: {
      locked: 0,
      writeback: 1,
      referenced: 2,
      uptodate: 3,
      dirty: 4,
      lru: 5,
      head: 6,
      active: 8,
      swapcache: 10,
      reserved: 13,
      private: 14,
      private2: 15,
      swapbacked: 17,
      unevictable: 18,
      mlocked: 19,
      hwpoison: 20,
    },
    flagsMask: 0x1fffff,
    pageType: pageType612,
    // folio->_flags_1 & 0xff: the order, in the low byte of page[1].flags (mm_types.h@v6.12).
    compoundOrder: (tail, at) => tail[at] ?? 0,
    // Hugetlb is a page type of the head (PGTY_hugetlb, 0xf4) since 6.10.
    isHugetlb: (head, headAt) => pageType612(head.readUInt32LE(headAt + 48)) === "hugetlb",
    expect: {
      "NUMBER(PG_lru)": 5,
      "NUMBER(PG_private)": 14,
      "NUMBER(PG_swapcache)": 10,
      "NUMBER(PG_swapbacked)": 17,
      "NUMBER(PG_head_mask)": 64,
      "SIZE(page)": 64,
      "OFFSET(page.flags)": 0,
      "OFFSET(page.mapping)": 24,
      "OFFSET(page.private)": 40,
      "OFFSET(page._mapcount)": 48,
      "OFFSET(page._refcount)": 52,
      "OFFSET(page.compound_head)": 8,
    },
    expectIfPresent: { "NUMBER(PG_hwpoison)": 20 },
  },
];

export class UnsupportedKernelError extends Error {
  override readonly name = "UnsupportedKernelError";
}

/**
 * The profile for a kernel, checked against every VMCOREINFO value it depends on. Throws UnsupportedKernelError
 * naming the release and the first mismatch: vmprune then migrates without pruning.
 */
export function selectProfile(release: string, numbers: ReadonlyMap<string, number>): KernelProfile {
  const profile = PROFILES.find((p) => p.release.test(release));
  if (!profile)
    throw new UnsupportedKernelError(
      `no page-layout profile for Linux ${release} (known: ${PROFILES.map((p) => p.name).join(", ")}): not pruning`,
    );
  for (const [key, value] of Object.entries(profile.expect)) {
    const actual = numbers.get(key);
    if (actual !== value)
      throw new UnsupportedKernelError(
        `Linux ${release}: VMCOREINFO ${key}=${actual ?? "(missing)"}, profile ${profile.name} expects ${value}: not pruning`,
      );
  }
  for (const [key, value] of Object.entries(profile.expectIfPresent)) {
    const actual = numbers.get(key);
    if (actual !== undefined && actual !== value)
      throw new UnsupportedKernelError(
        `Linux ${release}: VMCOREINFO ${key}=${actual}, profile ${profile.name} expects ${value}: not pruning`,
      );
  }
  return profile;
}
