/**
 * Everything the classifier must know about a guest kernel's `struct page`, resolved per guest from what that
 * kernel says about itself, never from its version string (../shared/docs/kernel-layouts.md):
 *
 * | source | facts |
 * |---|---|
 * | VMCOREINFO | SIZE(page), OFFSET(page.*), PG_head_mask, PG_lru/private/swapcache/swapbacked/slab/hwpoison, the page-type values (buddy, offline, hugetlb, slab, unaccepted), LENGTH(zone.free_area), compound order and hugetlb markers of older kernels |
 * | BTF (the kernel's own type information, read from guest memory) | every `enum pageflags` bit (dirty, writeback, uptodate, locked, ...), `__NR_PAGEFLAGS`, `enum pagetype`, folio fields (order, large-folio mapcounts), and anything VMCOREINFO lacks |
 * | x86-64 constants that never changed (4.18-7.x) | tail bit 0 of compound_head, buddy order in `private`, PAGE_MAPPING_ANON |
 * | rules keyed on VMCOREINFO's own keys | "no compound_order/_folio_order key" means the order is the low byte of page[1].flags (6.6+) |
 *
 * Every fact carries its source. A capability whose facts are missing is off with the reason; nothing is guessed:
 * free pruning needs VMCOREINFO's facts only, cache pruning also needs the page-flag bits only BTF gives. Where
 * both sources have a fact they must agree (kernel-types.ts checks this before BTF is accepted).
 */
import type { VmcoreInfo } from "./vmcoreinfo.ts";

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

/** `enum pageflags` enumerator of each flag (include/linux/page-flags.h; PG_swapcache is an alias of PG_owner_priv_1). */
export const PAGE_FLAG_ENUMERATORS: Record<PageFlag, string> = {
  locked: "PG_locked",
  referenced: "PG_referenced",
  uptodate: "PG_uptodate",
  dirty: "PG_dirty",
  lru: "PG_lru",
  active: "PG_active",
  slab: "PG_slab",
  swapcache: "PG_swapcache",
  reserved: "PG_reserved",
  private: "PG_private",
  private2: "PG_private_2",
  writeback: "PG_writeback",
  head: "PG_head",
  swapbacked: "PG_swapbacked",
  unevictable: "PG_unevictable",
  mlocked: "PG_mlocked",
  hwpoison: "PG_hwpoison",
};

/**
 * Page types kept in the `_mapcount`/`page_type` word. "other" is a type this layout cannot name (a page table, a
 * guard page, zsmalloc... on a kernel that does not export them): never free, judged as kernel memory.
 */
export type PageType = "buddy" | "offline" | "unaccepted" | "hugetlb" | "slab" | "other";

/** How the type word encodes types (doc §3), derived from the exported buddy value, not from a version. */
export type PageTypeScheme = "bit-clear" | "bit-clear-16" | "top-byte";

/** How a tail page names its head. */
export type TailEncoding =
  /** `compound_head` = head address | 1 (4.5-7.0; 7.1+ without the mask form). */
  | "pointer"
  /**
   * `compound_info` (7.1+): head address | 1, or, with HVO and a power-of-two SIZE(page), GENMASK(63, shift) | 1
   * and head = tail address & mask (include/linux/page-flags.h@7.2 _compound_head). Both forms are decoded.
   */
  | "pointer-or-mask";

/** Where a large folio says it is mapped: a 32-bit counter relative to the head's struct page. */
export interface FolioMapcount {
  name: string;
  /** Byte offset from the head's struct page (page[1] fields include SIZE(page)). */
  offset: number;
  /** -1 for counters that start at -1 (mapped when >= 0), 0 for counters that start at 0 (mapped when > 0). */
  base: -1 | 0;
}

export type HugetlbTest =
  | { kind: "type" }
  /** page[1].flags has this bit (6.6-6.8). */
  | { kind: "tail-flag"; bit: number }
  /** page[1]'s compound destructor byte at `offset` (from the head) equals `value` (<= 6.5). */
  | { kind: "dtor"; offset: number; value: number }
  | { kind: "unknown" };

export interface Fact {
  name: string;
  value: string;
  source: string;
}

export interface Capability {
  on: boolean;
  /** Why it is off; empty when on. */
  reason: string;
}

export interface KernelLayout {
  release: string;
  structPageSize: number;
  offsets: {
    flags: number;
    /** compound_head or compound_info. */
    tail: number;
    mapping: number;
    private: number;
    mapcount: number;
    refcount: number;
  };
  tailEncoding: TailEncoding;
  /** Bit numbers in the flags word; a flag this kernel does not have (or nothing says where it is) is absent. */
  flags: Partial<Record<PageFlag, number>>;
  /** Bits of the flags word that are page flags (zone, node, LRU generation and cpupid sit above them). */
  flagsMask: number;
  scheme: PageTypeScheme;
  pageType(word: number): PageType | null;
  /** Highest buddy order (LENGTH(zone.free_area) - 1). */
  maxBuddyOrder: number;
  /** Byte offset (from the head's struct page) of the compound order byte, or null if unknown. */
  compoundOrderOffset: number | null;
  hugetlb: HugetlbTest;
  /** Large-folio mapcounts (BTF); empty when unknown. */
  folioMapcounts: FolioMapcount[];
  capabilities: { free: Capability; cache: Capability };
  facts: Fact[];
}

/** What the resolver asks of the kernel's BTF (kernel-types.ts adapts btf.ts to it). All offsets in bytes. */
export interface KernelTypes {
  /** Where these types came from, e.g. "BTF at 0xffffffff82a00000 (kallsyms __start_BTF)". */
  readonly origin: string;
  structSize(struct: string): number | undefined;
  /** Byte offset of a member, found through anonymous structs and unions; undefined if absent or a bitfield. */
  memberOffset(struct: string, member: string): number | undefined;
  /** Element count of an array member. */
  arrayLength(struct: string, member: string): number | undefined;
  /** An enumerator's value; `enumName` "" searches every enum. */
  enumValue(enumName: string, enumerator: string): number | undefined;
  /** Whether an enum of this name exists. */
  hasEnum(enumName: string): boolean;
}

export class LayoutError extends Error {
  override readonly name = "LayoutError";
}

/** PAGE_MAPPING_ANON, bit 0 of page->mapping (include/linux/page-flags.h, every version 4.18-7.x). */
export const PAGE_MAPPING_ANON = 1;
/** The largest buddy order accepted from any source: a guard against a corrupt LENGTH(zone.free_area). */
const MAX_SANE_BUDDY_ORDER = 15;
/** Struct page fields every layout needs (free pruning), with the VMCOREINFO key and the BTF member of each. */
const PAGE_FIELDS = [
  ["flags", "flags"],
  ["mapping", "mapping"],
  ["private", "private"],
  ["mapcount", "_mapcount"],
  ["refcount", "_refcount"],
] as const;

/** Collects facts with their sources; a missing required fact is recorded as a reason. */
class FactSheet {
  readonly facts: Fact[] = [];
  readonly missingForFree: string[] = [];
  readonly missingForCache: string[] = [];

  constructor(
    readonly info: VmcoreInfo,
    readonly types: KernelTypes | null,
  ) {}

  add(name: string, value: number | string, source: string): void {
    this.facts.push({ name, value: String(value), source });
  }

  /** A VMCOREINFO number within bounds, or undefined (absent or malformed: a malformed value is no fact). */
  vmcoreinfo(key: string, min: number, max: number): number | undefined {
    if (!this.info.has(key)) return undefined;
    try {
      return this.info.bounded(key, min, max);
    } catch {
      return undefined;
    }
  }

  /** A VMCOREINFO NUMBER as an unsigned 32-bit word (page-type values are printed signed: -129). */
  vmcoreinfoWord(key: string): number | undefined {
    if (!this.info.has(key)) return undefined;
    try {
      return Number(BigInt.asUintN(32, this.info.signed(key)));
    } catch {
      return undefined;
    }
  }

  /** A fact from VMCOREINFO if it has it, else from BTF, recorded with its source. */
  pick(
    name: string,
    fromVmcoreinfo: { key: string; min: number; max: number } | null,
    fromTypes: ((t: KernelTypes) => number | undefined) | null,
    btfLabel: string,
  ): number | undefined {
    if (fromVmcoreinfo) {
      const v = this.vmcoreinfo(fromVmcoreinfo.key, fromVmcoreinfo.min, fromVmcoreinfo.max);
      if (v !== undefined) {
        this.add(name, v, `VMCOREINFO ${fromVmcoreinfo.key}`);
        return v;
      }
    }
    if (fromTypes && this.types) {
      const v = fromTypes(this.types);
      if (v !== undefined) {
        this.add(name, v, `BTF ${btfLabel}`);
        return v;
      }
    }
    return undefined;
  }
}

/**
 * Resolves the layout of the kernel that `info` describes, with its BTF when one was found and accepted (`types`),
 * else `typesAbsentReason` says why there is none (it becomes the reason cache pruning is off).
 */
export function resolveKernelLayout(
  info: VmcoreInfo,
  types: KernelTypes | null,
  typesAbsentReason = "no BTF",
): KernelLayout {
  const sheet = new FactSheet(info, types);
  const structPageSize =
    sheet.pick(
      "SIZE(page)",
      { key: "SIZE(page)", min: 32, max: 256 },
      (t) => t.structSize("page"),
      "sizeof(struct page)",
    ) ?? 0;
  if (structPageSize === 0) sheet.missingForFree.push("SIZE(page)");
  const offsetOf = (member: string): number => {
    const v = sheet.pick(
      `OFFSET(page.${member})`,
      { key: `OFFSET(page.${member})`, min: 0, max: Math.max(0, structPageSize - 4) },
      (t) => t.memberOffset("page", member),
      `struct page.${member}`,
    );
    if (v === undefined) {
      sheet.missingForFree.push(`OFFSET(page.${member})`);
      return 0;
    }
    return v;
  };
  const offsets = {
    flags: 0,
    tail: 0,
    mapping: 0,
    private: 0,
    mapcount: 0,
    refcount: 0,
  };
  for (const [field, member] of PAGE_FIELDS) offsets[field] = offsetOf(member);
  // _refcount was _count before 4.6; no kernel in scope (4.18+) has it, so its absence is a missing fact.

  // Tail -> head: compound_head (4.5-7.0) or compound_info (7.1+).
  let tailEncoding: TailEncoding = "pointer";
  const head = sheet.pick(
    "OFFSET(page.compound_head)",
    { key: "OFFSET(page.compound_head)", min: 0, max: Math.max(0, structPageSize - 8) },
    (t) => t.memberOffset("page", "compound_head"),
    "struct page.compound_head",
  );
  if (head !== undefined) offsets.tail = head;
  else {
    const infoAt = sheet.pick(
      "OFFSET(page.compound_info)",
      { key: "OFFSET(page.compound_info)", min: 0, max: Math.max(0, structPageSize - 8) },
      (t) => t.memberOffset("page", "compound_info"),
      "struct page.compound_info",
    );
    if (infoAt === undefined)
      sheet.missingForFree.push("OFFSET(page.compound_head) or OFFSET(page.compound_info)");
    else {
      offsets.tail = infoAt;
      tailEncoding = "pointer-or-mask";
    }
  }

  const flags = resolveFlags(sheet);
  const flagsMask = resolveFlagsMask(sheet, flags);
  const pageTypes = resolvePageTypes(sheet);
  const maxOrder = resolveMaxBuddyOrder(sheet);
  const compoundOrderOffset = resolveCompoundOrder(sheet, structPageSize, offsets.flags);
  const hugetlb = resolveHugetlb(sheet, structPageSize, pageTypes.hugetlbIsType);
  const folioMapcounts = resolveFolioMapcounts(sheet, structPageSize);

  if (maxOrder === undefined) sheet.missingForFree.push("LENGTH(zone.free_area)");
  if (flags.head === undefined) sheet.missingForFree.push("PG_head");
  if (pageTypes.buddy === undefined) sheet.missingForFree.push("NUMBER(PAGE_BUDDY_MAPCOUNT_VALUE)");
  const cacheNeeds: PageFlag[] = [
    "uptodate",
    "dirty",
    "writeback",
    "locked",
    "private",
    "swapbacked",
    "swapcache",
  ];
  for (const f of cacheNeeds)
    if (flags[f] === undefined) sheet.missingForCache.push(`${PAGE_FLAG_ENUMERATORS[f]} (enum pageflags)`);
  if (folioMapcounts.length === 0)
    sheet.missingForCache.push("the large-folio mapcount fields (struct folio)");

  const free: Capability =
    sheet.missingForFree.length === 0
      ? { on: true, reason: "" }
      : { on: false, reason: `the kernel does not say ${sheet.missingForFree.join(", ")}` };
  const missing = sheet.missingForCache.join(", ");
  const cache: Capability = !free.on
    ? { on: false, reason: free.reason }
    : sheet.missingForCache.length === 0
      ? { on: true, reason: "" }
      : sheet.types
        ? { on: false, reason: `the kernel's BTF does not say ${missing}` }
        : { on: false, reason: `${typesAbsentReason}: nothing says ${missing}` };
  return {
    release: info.osRelease,
    structPageSize,
    offsets,
    tailEncoding,
    flags,
    flagsMask,
    scheme: pageTypes.scheme,
    pageType: pageTypes.pageType,
    maxBuddyOrder: Math.max(0, maxOrder ?? 0),
    compoundOrderOffset,
    hugetlb,
    folioMapcounts,
    capabilities: { free, cache },
    facts: sheet.facts,
  };
}

/** Flag bits: VMCOREINFO exports a few (NUMBER(PG_*), PG_head_mask); BTF's `enum pageflags` has them all. */
function resolveFlags(sheet: FactSheet): Partial<Record<PageFlag, number>> {
  const flags: Partial<Record<PageFlag, number>> = {};
  const exported: Partial<Record<PageFlag, string>> = {
    lru: "NUMBER(PG_lru)",
    private: "NUMBER(PG_private)",
    swapcache: "NUMBER(PG_swapcache)",
    swapbacked: "NUMBER(PG_swapbacked)",
    slab: "NUMBER(PG_slab)",
    hwpoison: "NUMBER(PG_hwpoison)",
  };
  for (const flag of Object.keys(PAGE_FLAG_ENUMERATORS) as PageFlag[]) {
    const key = exported[flag];
    const enumerator = PAGE_FLAG_ENUMERATORS[flag];
    let bit: number | undefined;
    if (flag === "head") {
      // PG_head_mask = 1UL << PG_head (kernel/vmcore_info.c, every version in scope).
      const mask = sheet.vmcoreinfoWord("NUMBER(PG_head_mask)");
      if (mask !== undefined && mask > 0 && (mask & (mask - 1)) === 0) {
        bit = Math.log2(mask);
        sheet.add(`bit ${enumerator}`, bit, "VMCOREINFO NUMBER(PG_head_mask)");
      }
    }
    bit ??= sheet.pick(
      `bit ${enumerator}`,
      key ? { key, min: 0, max: 63 } : null,
      (t) => t.enumValue("pageflags", enumerator),
      `enum pageflags ${enumerator}`,
    );
    if (bit !== undefined && bit >= 0 && bit < 32) flags[flag] = bit;
  }
  return flags;
}

/** Highest buddy order: LENGTH(zone.free_area) counts the orders in every version (doc §2). */
function resolveMaxBuddyOrder(sheet: FactSheet): number | undefined {
  const n = sheet.pick(
    "buddy orders",
    { key: "LENGTH(zone.free_area)", min: 1, max: MAX_SANE_BUDDY_ORDER + 1 },
    (t) => {
      const length = t.arrayLength("zone", "free_area");
      return length !== undefined && length >= 1 && length <= MAX_SANE_BUDDY_ORDER + 1 ? length : undefined;
    },
    "struct zone.free_area[] length",
  );
  return n === undefined ? undefined : n - 1;
}

/** The page-flag bits of the flags word: below `__NR_PAGEFLAGS` (BTF), else up to the highest flag known. */
function resolveFlagsMask(sheet: FactSheet, flags: Partial<Record<PageFlag, number>>): number {
  const nr = sheet.types?.enumValue("pageflags", "__NR_PAGEFLAGS");
  if (nr !== undefined && nr > 0 && nr <= 32) {
    sheet.add("page flag bits", nr, "BTF enum pageflags __NR_PAGEFLAGS");
    return nr === 32 ? 0xffffffff : 2 ** nr - 1;
  }
  // Without BTF: every flag up to the highest one known. Bits above it are zone/node fields or flags this layout
  // cannot read; a free page has none of its flags set either way (PAGE_FLAGS_CHECK_AT_FREE), so a narrower mask
  // only lets more pages into the buddy-head search, which decides alone.
  const highest = Math.max(-1, ...Object.values(flags));
  sheet.add("page flag bits", highest + 1, "highest flag bit known + 1 (no __NR_PAGEFLAGS without BTF)");
  return highest < 0 ? 0 : 2 ** (highest + 1) - 1;
}

interface ResolvedTypes {
  scheme: PageTypeScheme;
  buddy: number | undefined;
  hugetlbIsType: boolean;
  pageType(word: number): PageType | null;
}

/** Named types: the VMCOREINFO key of each and its `enum pagetype` enumerators (6.12+ PGTY_*, 6.10-6.11 PG_*). */
const TYPE_SOURCES: { type: PageType; key: string | null; enumerators: [string, string] }[] = [
  { type: "buddy", key: "NUMBER(PAGE_BUDDY_MAPCOUNT_VALUE)", enumerators: ["PGTY_buddy", "PG_buddy"] },
  {
    type: "offline",
    key: "NUMBER(PAGE_OFFLINE_MAPCOUNT_VALUE)",
    enumerators: ["PGTY_offline", "PG_offline"],
  },
  {
    type: "hugetlb",
    key: "NUMBER(PAGE_HUGETLB_MAPCOUNT_VALUE)",
    enumerators: ["PGTY_hugetlb", "PG_hugetlb"],
  },
  { type: "slab", key: "NUMBER(PAGE_SLAB_MAPCOUNT_VALUE)", enumerators: ["PGTY_slab", "PG_slab"] },
  {
    type: "unaccepted",
    key: "NUMBER(PAGE_UNACCEPTED_MAPCOUNT_VALUE)",
    enumerators: ["PGTY_unaccepted", "PG_unaccepted"],
  },
];

/**
 * The page-type scheme and the word of each named type (doc §3). The scheme follows from the buddy value: low
 * 24 bits zero -> the type is the top byte (6.12+); low 16 bits all ones -> a cleared bit among bits 16-30 with
 * the low 16 bits the owner's (6.11); otherwise a cleared bit in a word that is otherwise all ones (<= 6.10).
 */
function resolvePageTypes(sheet: FactSheet): ResolvedTypes {
  const words = new Map<PageType, number>();
  const t = sheet.types;
  const pagetypeEnum = t?.hasEnum("pagetype") ?? false;
  for (const { type, key, enumerators } of TYPE_SOURCES) {
    const v = key ? sheet.vmcoreinfoWord(key) : undefined;
    if (v !== undefined) {
      words.set(type, v);
      sheet.add(`page type ${type}`, `0x${v.toString(16)}`, `VMCOREINFO ${key}`);
      continue;
    }
    if (!t || !pagetypeEnum) continue;
    const top = t.enumValue("pagetype", enumerators[0]);
    if (top !== undefined && top >= 0 && top <= 0xff) {
      const word = (top << 24) >>> 0;
      words.set(type, word);
      sheet.add(`page type ${type}`, `0x${word.toString(16)}`, `BTF enum pagetype ${enumerators[0]} << 24`);
      continue;
    }
    const bit = t.enumValue("pagetype", enumerators[1]);
    if (bit !== undefined && bit > 0 && bit < 2 ** 31 && (bit & (bit - 1)) === 0) {
      const word = ~bit >>> 0;
      words.set(type, word);
      sheet.add(`page type ${type}`, `0x${word.toString(16)}`, `BTF enum pagetype ~${enumerators[1]}`);
    }
  }
  const buddy = words.get("buddy");
  const named = [...words.entries()];
  if (buddy === undefined) return { scheme: "bit-clear", buddy, hugetlbIsType: false, pageType: () => null };
  if ((buddy & 0xffffff) === 0) {
    const byTop = new Map<number, PageType>(named.map(([type, w]) => [w >>> 24, type]));
    sheet.add(
      "page type scheme",
      "top byte",
      "buddy value has 24 low zero bits (include/linux/page-flags.h 6.12+)",
    );
    return {
      scheme: "top-byte",
      buddy,
      hugetlbIsType: words.has("hugetlb"),
      // 0x00-0x7f are mapcounts, 0x80-0xef mapcount overflow, 0xff underflow (enum pagetype, 6.12-7.2).
      pageType: (word) => {
        const top = word >>> 24;
        if (top < 0xf0 || top === 0xff) return null;
        return byTop.get(top) ?? "other";
      },
    };
  }
  if ((buddy & 0xffff) === 0xffff) {
    const byHigh = new Map<number, PageType>(named.map(([type, w]) => [w >>> 16, type]));
    sheet.add(
      "page type scheme",
      "cleared bit, low 16 bits the owner's",
      "buddy value's low 16 bits are ones (6.11)",
    );
    return {
      scheme: "bit-clear-16",
      buddy,
      hugetlbIsType: words.has("hugetlb"),
      // PAGE_TYPE_BASE 0x80000000; 0xffff0000 and up are mapcount underflows (page-flags.h@6.11).
      pageType: (word) => {
        const w = word >>> 0;
        if (w < 0x80000000 || w >= 0xffff0000) return null;
        return byHigh.get(w >>> 16) ?? "other";
      },
    };
  }
  const byWord = new Map<number, PageType>(named.map(([type, w]) => [w, type]));
  sheet.add("page type scheme", "cleared bit", "buddy value is a word with one bit cleared (<= 6.10)");
  return {
    scheme: "bit-clear",
    buddy,
    hugetlbIsType: words.has("hugetlb"),
    // PAGE_TYPE_BASE 0xf0000000 and values >= -128 are mapcounts (page-flags.h@6.1 page_has_type).
    pageType: (word) => {
      const w = word >>> 0;
      if ((w & 0xf0000000) >>> 0 !== 0xf0000000 || (w | 0) >= -128) return null;
      return byWord.get(w) ?? "other";
    },
  };
}

/**
 * Where a compound page keeps its order, relative to the head's struct page: page[1].compound_order (<= 6.2),
 * folio._folio_order (6.3-6.5), else the low byte of page[1].flags (6.6+: folio->_flags_1 & 0xff, include/linux/
 * mm.h folio_order). The last rule applies only when VMCOREINFO lacks both keys older kernels export.
 */
function resolveCompoundOrder(sheet: FactSheet, size: number, flagsOffset: number): number | null {
  if (size === 0) return null;
  const inPage = sheet.pick(
    "compound order at",
    { key: "OFFSET(page.compound_order)", min: 0, max: size - 1 },
    (t) => t.memberOffset("page", "compound_order"),
    "struct page.compound_order",
  );
  if (inPage !== undefined) return size + inPage;
  const inFolio = sheet.pick(
    "compound order at",
    { key: "OFFSET(folio._folio_order)", min: 0, max: 4 * size },
    (t) => t.memberOffset("folio", "_folio_order"),
    "struct folio._folio_order",
  );
  if (inFolio !== undefined) return inFolio;
  const flags1 = sheet.types?.memberOffset("folio", "_flags_1");
  if (flags1 !== undefined) {
    sheet.add("compound order at", flags1, "BTF struct folio._flags_1, low byte");
    return flags1;
  }
  if (!sheet.info.has("OFFSET(page.compound_order)") && !sheet.info.has("OFFSET(folio._folio_order)")) {
    sheet.add(
      "compound order at",
      size + flagsOffset,
      "low byte of page[1].flags: VMCOREINFO has neither OFFSET(page.compound_order) nor OFFSET(folio._folio_order) (6.6+)",
    );
    return size + flagsOffset;
  }
  return null;
}

/** How to tell a hugetlb folio: a page type (6.9+), PG_hugetlb in page[1].flags (6.6-6.8), or a destructor (<= 6.5). */
function resolveHugetlb(sheet: FactSheet, size: number, isType: boolean): HugetlbTest {
  if (isType) return { kind: "type" };
  const bit = sheet.pick(
    "hugetlb flag bit (page[1])",
    { key: "NUMBER(PG_hugetlb)", min: 0, max: 31 },
    (t) => t.enumValue("pageflags", "PG_hugetlb"),
    "enum pageflags PG_hugetlb",
  );
  if (bit !== undefined) return { kind: "tail-flag", bit };
  const value = sheet.pick(
    "HUGETLB_PAGE_DTOR",
    { key: "NUMBER(HUGETLB_PAGE_DTOR)", min: 0, max: 255 },
    (t) => t.enumValue("compound_dtor_id", "HUGETLB_PAGE_DTOR"),
    "enum compound_dtor_id HUGETLB_PAGE_DTOR",
  );
  if (value === undefined || size === 0) return { kind: "unknown" };
  const inPage = sheet.pick(
    "compound dtor at",
    { key: "OFFSET(page.compound_dtor)", min: 0, max: size - 1 },
    (t) => t.memberOffset("page", "compound_dtor"),
    "struct page.compound_dtor",
  );
  if (inPage !== undefined) return { kind: "dtor", offset: size + inPage, value };
  const inFolio = sheet.pick(
    "compound dtor at",
    { key: "OFFSET(folio._folio_dtor)", min: 0, max: 4 * size },
    (t) => t.memberOffset("folio", "_folio_dtor"),
    "struct folio._folio_dtor",
  );
  return inFolio === undefined ? { kind: "unknown" } : { kind: "dtor", offset: inFolio, value };
}

/**
 * Large-folio mapcounts (BTF only): compound_mapcount in page[1] (<= 6.1), folio._total_mapcount (6.2),
 * _entire_mapcount and _nr_pages_mapped (6.3+), _large_mapcount (6.11+), doc §2.
 */
function resolveFolioMapcounts(sheet: FactSheet, size: number): FolioMapcount[] {
  const t = sheet.types;
  if (!t || size === 0) return [];
  const out: FolioMapcount[] = [];
  const add = (name: string, offset: number | undefined, base: -1 | 0, label: string) => {
    if (offset === undefined) return;
    out.push({ name, offset, base });
    sheet.add(`mapcount ${name} at`, offset, `BTF ${label}`);
  };
  const inPage = t.memberOffset("page", "compound_mapcount");
  add(
    "compound_mapcount",
    inPage === undefined ? undefined : size + inPage,
    -1,
    "struct page.compound_mapcount (page[1])",
  );
  add("_total_mapcount", t.memberOffset("folio", "_total_mapcount"), -1, "struct folio._total_mapcount");
  add("_entire_mapcount", t.memberOffset("folio", "_entire_mapcount"), -1, "struct folio._entire_mapcount");
  add("_large_mapcount", t.memberOffset("folio", "_large_mapcount"), -1, "struct folio._large_mapcount");
  // _nr_pages_mapped only where _large_mapcount is absent: 6.15+ may leave it unused (CONFIG_NO_PAGE_MAPCOUNT).
  if (!out.some((m) => m.name === "_large_mapcount"))
    add("_nr_pages_mapped", t.memberOffset("folio", "_nr_pages_mapped"), 0, "struct folio._nr_pages_mapped");
  return out;
}

/** A one-line summary for logs: "free on, cache off (no BTF ...)". */
export function describeCapabilities(layout: KernelLayout): string {
  const one = (name: string, c: Capability) => (c.on ? `${name} on` : `${name} off (${c.reason})`);
  return `${one("free", layout.capabilities.free)}, ${one("cache", layout.capabilities.cache)}`;
}

/** Turns a capability off (a self-check failed, page poisoning is on), keeping the first reason. */
export function disableCapability(layout: KernelLayout, which: "free" | "cache", reason: string): void {
  if (layout.capabilities[which].on) layout.capabilities[which] = { on: false, reason };
}
