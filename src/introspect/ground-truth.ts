/**
 * The guest's own view of its pages, as ground truth for the classifier: the lab's `vmwork kpageflags` dump of
 * /proc/kpageflags and /proc/kpagecount (src/lab/guest/README.md), the flags mapped to the categories they allow
 * (../shared/docs/linux-page-introspection.md §4.5; bits from include/uapi/linux/kernel-page-flags.h). Some
 * pages are ambiguous from kpageflags alone (flagless pages are free on a per-CPU list or kernel memory; a
 * hugetlb page is free in the pool or in use), so each PFN gets the set of categories that agree with it.
 */
import { open } from "node:fs/promises";
import { CATEGORY, type Category } from "./classifier.ts";

/** KPF_* bit numbers (include/uapi/linux/kernel-page-flags.h, include/linux/kernel-page-flags.h @v6.1). */
export const KPF = {
  LOCKED: 0,
  UPTODATE: 3,
  DIRTY: 4,
  LRU: 5,
  SLAB: 7,
  WRITEBACK: 8,
  BUDDY: 10,
  MMAP: 11,
  ANON: 12,
  SWAPCACHE: 13,
  SWAPBACKED: 14,
  COMPOUND_HEAD: 15,
  COMPOUND_TAIL: 16,
  HUGE: 17,
  NOPAGE: 20,
  KSM: 21,
  THP: 22,
  OFFLINE: 23,
  PGTABLE: 26,
  RESERVED: 32,
  PRIVATE: 35,
  PRIVATE_2: 36,
} as const;

export interface KpageflagsDump {
  pfns: number;
  flags: BigUint64Array;
  counts: BigUint64Array;
  /** CLOCK_REALTIME of the dump, ns. */
  takenAtNs: bigint;
}

/** Reads a dump from the spare disk image: header "VMPKPF01", pfnCount, flagsOffset, countsOffset, time. */
export async function readKpageflagsDump(image: string): Promise<KpageflagsDump> {
  const handle = await open(image, "r");
  try {
    const header = Buffer.alloc(40);
    await handle.read(header, 0, 40, 0);
    if (header.toString("latin1", 0, 8) !== "VMPKPF01")
      throw new Error(`${image}: no kpageflags dump (run the guest's "vmwork kpageflags" first)`);
    const pfns = Number(header.readBigUInt64LE(8));
    if (pfns <= 0 || pfns > 2 ** 28) throw new Error(`${image}: implausible PFN count ${pfns}`);
    const read = async (offset: bigint) => {
      const buf = Buffer.alloc(pfns * 8);
      await handle.read(buf, 0, buf.length, Number(offset));
      return new BigUint64Array(buf.buffer, buf.byteOffset, pfns);
    };
    return {
      pfns,
      flags: await read(header.readBigUInt64LE(16)),
      counts: await read(header.readBigUInt64LE(24)),
      takenAtNs: header.readBigUInt64LE(32),
    };
  } finally {
    await handle.close();
  }
}

const bit = (n: number) => 1n << BigInt(n);
const has = (flags: bigint, n: number) => (flags & bit(n)) !== 0n;
const set = (...cats: Category[]) => cats.reduce((m, c) => m | (1 << CATEGORY[c]), 0);

/** The categories consistent with one page's kpageflags (tails: see `allowedCategories`). */
function allowedFor(flags: bigint): number {
  if (has(flags, KPF.NOPAGE)) return set("unknown");
  if (has(flags, KPF.BUDDY) || has(flags, KPF.OFFLINE)) return set("free");
  if (has(flags, KPF.HUGE)) return set("anonymous", "free");
  if (has(flags, KPF.ANON) || has(flags, KPF.KSM)) return set("anonymous");
  if (has(flags, KPF.SLAB) || has(flags, KPF.PGTABLE) || has(flags, KPF.RESERVED)) return set("kernel");
  if (has(flags, KPF.LRU) || has(flags, KPF.SWAPBACKED)) {
    if (has(flags, KPF.SWAPBACKED)) return set("shmem");
    const clean =
      has(flags, KPF.UPTODATE) &&
      !has(flags, KPF.DIRTY) &&
      !has(flags, KPF.WRITEBACK) &&
      !has(flags, KPF.LOCKED) &&
      !has(flags, KPF.PRIVATE) &&
      !has(flags, KPF.PRIVATE_2) &&
      !has(flags, KPF.SWAPCACHE) &&
      !has(flags, KPF.MMAP);
    return set(clean ? "cache" : "inode");
  }
  if ((flags & 0xffffffffn) === 0n) return set("free", "kernel"); // per-CPU free lists, or flagless kernel pages
  return set("kernel");
}

/**
 * Per PFN, a bitmask of the categories (1 << CATEGORY[c]) that agree with the guest's kpageflags. On 6.1 a
 * compound tail carries only COMPOUND_TAIL (plus ANON/SLAB/HUGE/THP, which look through to the head), so a tail
 * without those gets its head's set.
 */
export function allowedCategories(dump: KpageflagsDump): Uint8Array {
  const out = new Uint8Array(dump.pfns);
  let headAllowed = set("unknown");
  for (let pfn = 0; pfn < dump.pfns; pfn++) {
    const flags = dump.flags[pfn] ?? 0n;
    let allowed = allowedFor(flags);
    if (has(flags, KPF.COMPOUND_HEAD)) headAllowed = allowed;
    else if (has(flags, KPF.COMPOUND_TAIL) && (flags & ~(bit(KPF.COMPOUND_TAIL) | bit(KPF.MMAP))) === 0n)
      allowed = headAllowed;
    out[pfn] = allowed;
  }
  return out;
}

export interface Agreement {
  pfns: number;
  agreeing: number;
  /** Share of PFNs whose category is one kpageflags allows. */
  ratio: number;
  /** PFNs kpageflags shows as free (BUDDY/OFFLINE), and how many of them the classifier calls free. */
  groundFree: number;
  freeAgreeing: number;
  freeRatio: number;
  /** PFNs the classifier calls free that kpageflags does not allow to be free: the dangerous error. */
  falseFree: number;
  /** The first of those PFNs (at most FALSE_FREE_LISTED), to say which pages and what the guest showed for them. */
  falseFreePfns: number[];
  /** Disagreements by "ours→allowed" for diagnosis. */
  confusion: Record<string, number>;
}

/** How many false-free PFNs an agreement lists. */
export const FALSE_FREE_LISTED = 32;

export function compareWithGroundTruth(
  ours: Uint8Array,
  allowed: Uint8Array,
  dump: KpageflagsDump,
): Agreement {
  const pfns = Math.min(ours.length, allowed.length);
  let agreeing = 0;
  let groundFree = 0;
  let freeAgreeing = 0;
  let falseFree = 0;
  const falseFreePfns: number[] = [];
  const confusion: Record<string, number> = {};
  const names = Object.keys(CATEGORY) as Category[];
  for (let pfn = 0; pfn < pfns; pfn++) {
    const c = ours[pfn] ?? 0;
    const a = allowed[pfn] ?? 0;
    const flags = dump.flags[pfn] ?? 0n;
    const truthFree = has(flags, KPF.BUDDY) || has(flags, KPF.OFFLINE);
    if (truthFree) {
      groundFree++;
      if (c === CATEGORY.free) freeAgreeing++;
    }
    if ((a >> c) & 1) agreeing++;
    else {
      if (c === CATEGORY.free && falseFree++ < FALSE_FREE_LISTED) falseFreePfns.push(pfn);
      const key = `${names[c]}→${names.filter((_, i) => (a >> i) & 1).join("|")}`;
      confusion[key] = (confusion[key] ?? 0) + 1;
    }
  }
  return {
    pfns,
    agreeing,
    ratio: agreeing / pfns,
    groundFree,
    freeAgreeing,
    freeRatio: groundFree ? freeAgreeing / groundFree : 1,
    falseFree,
    falseFreePfns,
    confusion,
  };
}
