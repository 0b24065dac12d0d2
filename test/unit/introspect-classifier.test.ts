/**
 * The page classifier on synthetic memmaps laid out as Debian's 6.1 and 6.12 kernels lay out struct page (their
 * layouts resolved from the captured VMCOREINFO and the BTF facts of test/support/kernel-facts.ts): each category,
 * compound pages classified by their head (also when the head is outside the batch), buddy blocks covering
 * their whole order, the per-CPU inference switch, and garbage giving "unknown".
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import {
  ATTR,
  CATEGORY,
  classifyPfns,
  countCategories,
  PageClassifier,
  type StructPageSource,
} from "../../src/introspect/classifier.ts";
import { resolveKernelLayout } from "../../src/introspect/kernel-layout.ts";
import { batchPathCheck } from "../../src/introspect/self-check.ts";
import { VmcoreInfo } from "../../src/introspect/vmcoreinfo.ts";
import {
  editVmcoreinfo,
  RELEASE_61,
  RELEASE_612,
  TYPES_61,
  TYPES_612,
  vmcoreinfoText,
} from "../support/kernel-facts.ts";

const VMEMMAP = 0xffffea0000000000n;
const STRUCT_PAGE_SIZE = 64;
const P61 = resolveKernelLayout(VmcoreInfo.parse(vmcoreinfoText(RELEASE_61)), TYPES_61);
const P612 = resolveKernelLayout(VmcoreInfo.parse(vmcoreinfoText(RELEASE_612)), TYPES_612);

class Memmap implements StructPageSource {
  readonly buf: Buffer;
  constructor(readonly pfns: number) {
    this.buf = Buffer.alloc(pfns * STRUCT_PAGE_SIZE);
    for (let pfn = 0; pfn < pfns; pfn++) this.set(pfn, { mapcount: -1, refcount: 1, flags: 1 << 12 });
  }
  set(
    pfn: number,
    f: {
      flags?: number;
      mapping?: bigint;
      private?: number;
      mapcount?: number;
      refcount?: number;
      head?: bigint;
    },
  ): void {
    const at = pfn * STRUCT_PAGE_SIZE;
    this.buf.fill(0, at, at + STRUCT_PAGE_SIZE);
    this.buf.writeBigUInt64LE(BigInt(f.flags ?? 0), at);
    this.buf.writeBigUInt64LE(f.head ?? 0n, at + 8);
    this.buf.writeBigUInt64LE(f.mapping ?? 0n, at + 24);
    this.buf.writeBigUInt64LE(BigInt(f.private ?? 0), at + 40);
    this.buf.writeInt32LE(f.mapcount ?? -1, at + 48);
    this.buf.writeInt32LE(f.refcount ?? 0, at + 52);
  }
  read(pfn: number, count: number, into: Buffer): boolean {
    if (pfn < 0 || pfn + count > this.pfns) return false;
    this.buf.copy(into, 0, pfn * STRUCT_PAGE_SIZE, (pfn + count) * STRUCT_PAGE_SIZE);
    return true;
  }
  structPageAddress(pfn: number): bigint | null {
    return pfn >= 0 && pfn < this.pfns ? VMEMMAP + BigInt(pfn) * 64n : null;
  }
  pfnOfStructPage(address: bigint): number | null {
    const offset = address - VMEMMAP;
    if (offset < 0n || offset % 64n !== 0n || offset / 64n >= BigInt(this.pfns)) return null;
    return Number(offset / 64n);
  }
  range(first: number, count: number): Buffer {
    return this.buf.subarray(first * STRUCT_PAGE_SIZE, (first + count) * STRUCT_PAGE_SIZE);
  }
}

const bits = (...n: number[]) => n.reduce((a, b) => a | (1 << b), 0);
const FILE = 0xffff888001234500n; // an address_space: bits 0-1 clear
const ANON = 0xffff888001234501n;

/** 6.1 flag bits (doc §3.2): uptodate 2, dirty 3, lru 4, slab 9, reserved 12, private 13, head 16, swapbacked 19. */
function layout61(m: Memmap): void {
  m.set(8, { mapcount: -129, private: 3 }); // buddy block of order 3: PFNs 8-15
  for (let p = 9; p < 16; p++) m.set(p, { mapcount: -1 });
  m.set(16, { flags: bits(2, 4), mapping: FILE, refcount: 1 }); // clean unmapped file page → cache
  m.set(17, { flags: bits(2, 3, 4), mapping: FILE, refcount: 1 }); // dirty → inode
  m.set(18, { flags: bits(2, 4), mapping: FILE, refcount: 2, mapcount: 0 }); // mapped → inode
  m.set(19, { flags: bits(2, 4, 13), mapping: FILE, refcount: 2 }); // buffer heads → inode
  m.set(20, { flags: bits(2, 4, 19), mapping: FILE, refcount: 1 }); // tmpfs → shmem
  m.set(21, { flags: bits(2, 4, 19), mapping: ANON, refcount: 1, mapcount: 0 }); // anon
  m.set(22, { flags: bits(9), refcount: 1, mapping: 0xffff888000abc000n }); // slab (slab_cache overlays mapping)
  m.set(23, { flags: bits(12), refcount: 1 }); // reserved
  m.set(24, { mapcount: 0xfffffdff | 0, refcount: 1 }); // page-table type
  m.set(25, { refcount: 0, mapcount: -1 }); // per-CPU list candidate
  m.set(26, { mapcount: -257 }); // offline (balloon)
  // An anon THP-like compound of order 2 at 28: head flag, order in page[1] +17, tails point at the head.
  m.set(28, { flags: bits(16, 19, 4, 2), mapping: ANON, refcount: 4 });
  for (let p = 29; p < 32; p++) m.set(p, { head: (VMEMMAP + 28n * 64n) | 1n, mapping: 0xdead000000000400n });
  m.buf[29 * 64 + 17] = 2;
  m.buf[29 * 64 + 16] = 3; // TRANSHUGE dtor
  m.buf.writeInt32LE(-1, 29 * 64 + 20); // compound_mapcount
}

test("6.1: every category, buddy blocks and compound pages as units, attributes", () => {
  const m = new Memmap(40);
  layout61(m);
  const c = new PageClassifier(P61, m).classifyRange(0, 40, m.range(0, 40));
  const at = (pfn: number) => c.categories[pfn];
  for (let p = 8; p < 16; p++) assert.equal(at(p), CATEGORY.free, `buddy block page ${p}`);
  assert.equal(at(16), CATEGORY.cache);
  assert.equal(at(17), CATEGORY.inode);
  assert.equal((c.attributes[17] ?? 0) & ATTR.dirty, ATTR.dirty);
  assert.equal(at(18), CATEGORY.inode);
  assert.equal((c.attributes[18] ?? 0) & ATTR.mapped, ATTR.mapped);
  assert.equal(at(19), CATEGORY.inode);
  assert.equal(at(20), CATEGORY.shmem);
  assert.equal(at(21), CATEGORY.anonymous);
  assert.equal(at(22), CATEGORY.kernel);
  assert.equal(at(23), CATEGORY.kernel);
  assert.equal(at(24), CATEGORY.kernel);
  assert.equal(at(25), CATEGORY.kernel, "per-CPU candidates are not free unless asked");
  assert.equal((c.attributes[25] ?? 0) & ATTR.pcpInferred, ATTR.pcpInferred);
  assert.equal(at(26), CATEGORY.free, "offline pages");
  for (let p = 28; p < 32; p++) assert.equal(at(p), CATEGORY.anonymous, `compound page ${p}`);
  assert.deepEqual(countCategories(c.categories), {
    unknown: 0,
    free: 9,
    cache: 1,
    inode: 3,
    anonymous: 5,
    shmem: 1,
    kernel: 21,
  });
  const withPcp = new PageClassifier(P61, m, { inferPcpFree: true }).classifyRange(0, 40, m.range(0, 40));
  assert.equal(withPcp.categories[25], CATEGORY.free);
});

test("6.1: batches that start inside a compound page or end on its head resolve it through the source", () => {
  const m = new Memmap(40);
  layout61(m);
  const classifier = new PageClassifier(P61, m);
  const inside = classifier.classifyRange(30, 4, m.range(30, 4));
  assert.deepEqual([...inside.categories.subarray(0, 2)], [CATEGORY.anonymous, CATEGORY.anonymous]);
  const endsOnHead = classifier.classifyRange(27, 2, m.range(27, 2));
  assert.equal(endsOnHead.categories[1], CATEGORY.anonymous);
});

test("6.12: page types in the top byte, folio order in page[1].flags, hugetlb free and in use", () => {
  const m = new Memmap(48);
  m.set(0, { mapcount: 0xf0000000 | 0, private: 2 }); // buddy order 2
  for (let p = 1; p < 4; p++) m.set(p, { mapcount: -1 });
  m.set(4, { mapcount: 0xf5000000 | 0, refcount: 1 }); // slab type
  m.set(5, { mapcount: 0xf2000000 | 0, refcount: 1 }); // page table
  // 6.12 bits: uptodate 3, dirty 4, lru 5, head 6, swapbacked 17.
  m.set(6, { flags: bits(3, 5), mapping: FILE, refcount: 1 });
  m.set(7, { flags: bits(3, 4, 5), mapping: FILE, refcount: 1 });
  // Hugetlb folio of order 3 in use at 16, free at 24: head has the hugetlb type; order in page[1] flags byte 0.
  for (const [head, refcount] of [
    [16, 1],
    [24, 0],
  ] as const) {
    m.set(head, { flags: bits(6), mapcount: 0xf4000000 | 0, refcount });
    for (let p = head + 1; p < head + 8; p++) m.set(p, { head: (VMEMMAP + BigInt(head) * 64n) | 1n });
    m.buf[(head + 1) * 64] = 3;
  }
  const c = new PageClassifier(P612, m).classifyRange(0, 48, m.range(0, 48));
  assert.deepEqual([...c.categories.subarray(0, 8)], [1, 1, 1, 1, 6, 6, 2, 3]);
  assert.ok(c.categories.subarray(16, 24).every((x) => x === CATEGORY.anonymous));
  assert.ok(c.categories.subarray(24, 32).every((x) => x === CATEGORY.free));
});

test("garbage struct pages give unknown or bounded verdicts, never a crash or a huge block", () => {
  const m = new Memmap(64);
  m.set(0, { mapcount: -129, private: 50 }); // buddy with an impossible order
  m.set(1, { mapcount: -129, private: 2 }); // buddy order 2 at an unaligned PFN
  m.set(2, { head: 0x1234567n | 1n }); // tail pointing nowhere
  m.set(3, { head: (VMEMMAP + 60n * 64n) | 1n }); // tail pointing forwards
  m.set(4, { flags: bits(16), mapping: ANON, refcount: 1 }); // head with order 40 in page[1]
  m.buf[5 * 64 + 17] = 40;
  for (let pfn = 8; pfn < 64; pfn++) {
    const at = pfn * 64;
    for (let i = 0; i < 64; i += 4) m.buf.writeUInt32LE((pfn * 2654435761 + i * 40503) >>> 0, at + i);
  }
  const c = new PageClassifier(P61, m).classifyRange(0, 64, m.range(0, 64));
  assert.deepEqual([...c.categories.subarray(0, 4)], [0, 0, 0, 0]);
  assert.equal(c.categories[4], CATEGORY.anonymous, "a bad order makes it a single page");
  assert.equal(c.categories.length, 64);
});

/** 8192 frames of 6.1 with a large buddy block far away (order 10 at 2048) and an anon compound of order 2 at 1024. */
function batchMemmap(): Memmap {
  const m = new Memmap(8192);
  layout61(m);
  m.set(2048, { mapcount: -129, private: 10 });
  for (let p = 2049; p < 3072; p++) m.set(p, { mapcount: -1 });
  m.set(1024, { flags: bits(16, 19, 4, 2), mapping: ANON, refcount: 4 });
  for (let p = 1025; p < 1028; p++) m.set(p, { head: (VMEMMAP + 1024n * 64n) | 1n });
  m.buf[1025 * 64 + 17] = 2;
  return m;
}

/** `m` as a struct page source that records each read as [first PFN, count]. */
function countingReads(m: Memmap): { reads: Array<[number, number]>; counting: StructPageSource } {
  const reads: Array<[number, number]> = [];
  const counting: StructPageSource = {
    read: (pfn, count, into) => {
      reads.push([pfn, count]);
      return m.read(pfn, count, into);
    },
    pfnOfStructPage: (address) => m.pfnOfStructPage(address),
    structPageAddress: (pfn) => m.structPageAddress(pfn),
  };
  return { reads, counting };
}

test("classifyPfns: scattered PFNs (a batch of page records) get the same verdicts as a full pass", () => {
  const m = batchMemmap();
  const classifier = new PageClassifier(P61, m);
  const full = classifier.classifyRange(0, 8192, m.range(0, 8192)).categories;
  const pfns = [3000, 17, 1025, 9, 2500, 16, 4095, 1024, 2048, 28, 31];
  const batch = classifyPfns(classifier, m, pfns, 8192);
  assert.deepEqual(
    [...batch],
    pfns.map((p) => full[p]),
  );
  assert.equal(batch[0], CATEGORY.free, "a page deep inside an order-10 buddy block is free");
  assert.equal(batch[2], CATEGORY.anonymous, "a tail resolves to its head");
  // Far-apart PFNs are read as separate windows, with the same verdicts.
  const sparse = classifyPfns(classifier, m, [8000, 5, 2100], 8192);
  assert.deepEqual([...sparse], [full[8000], full[5], full[2100]]);
  assert.equal(sparse[2], CATEGORY.free);
});

test("classifyPfns: a batch reads its own struct pages, and below them only for a page that may be a free tail", () => {
  const m = batchMemmap();
  const { reads, counting } = countingReads(m);
  const classifier = new PageClassifier(P61, counting);
  // Pages deep inside the order-10 block at 2048: free, found through a read back to the block's head.
  assert.deepEqual([...classifyPfns(classifier, counting, [2500, 2600, 2501], 8192)], [1, 1, 1]);
  assert.ok(
    reads.some(([pfn]) => pfn === 2048),
    "the struct pages from the span's start were read for a page that looks like a free tail",
  );
  // Pages far into their span that do not look free: their own struct pages, not the ~800 from the span's start.
  m.set(1800, { flags: bits(16, 19, 4, 2), mapping: ANON, refcount: 4 });
  for (let p = 1801; p < 1804; p++) m.set(p, { head: (VMEMMAP + 1800n * 64n) | 1n });
  m.buf[1801 * 64 + 17] = 2;
  reads.length = 0;
  const batch = classifyPfns(classifier, counting, [1801, 1802, 1803], 8192);
  const fresh = classifier.classifyRange(0, 8192, m.range(0, 8192)).categories;
  assert.deepEqual([...batch], [fresh[1801], fresh[1802], fresh[1803]]);
  assert.equal(batch[0], CATEGORY.anonymous, "a tail resolves to its head");
  const pagesRead = reads.reduce((sum, [, count]) => sum + count, 0);
  assert.ok(pagesRead <= 16, `read ${pagesRead} struct pages for 3 PFNs: ${JSON.stringify(reads)}`);
});

test("classifyPfns: a later batch inside the free block an earlier one found reads only that block's head, as it is now", () => {
  const m = batchMemmap();
  const { reads, counting } = countingReads(m);
  const classifier = new PageClassifier(P61, counting);
  const lastFreeBlock = { head: -1, end: -1 };
  // The first batch finds the order-10 block at 2048 by reading from the span's start.
  assert.deepEqual([...classifyPfns(classifier, counting, [2500, 2501], 8192, lastFreeBlock)], [1, 1]);
  assert.deepEqual(lastFreeBlock, { head: 2048, end: 3072 });
  // The next batches, further in: their own struct pages and the head's, nothing between.
  reads.length = 0;
  assert.deepEqual(
    [...classifyPfns(classifier, counting, [2900, 2901, 2902], 8192, lastFreeBlock)],
    [1, 1, 1],
  );
  const pagesRead = reads.reduce((sum, [, count]) => sum + count, 0);
  assert.ok(pagesRead <= 8, `read ${pagesRead} struct pages: ${JSON.stringify(reads)}`);
  assert.ok(
    reads.some(([pfn, count]) => pfn === 2048 && count === 1),
    "the head was read again",
  );
  // The block is split since (its upper half allocated as an anonymous page, the head now of order 9): the hint
  // does not stand in for guest memory: the verdicts are those of a full pass over memory as it is now.
  m.set(2048, { mapcount: -129, private: 9 });
  m.set(2900, { flags: bits(4), mapping: ANON, refcount: 1, mapcount: 0 });
  const fresh = classifier.classifyRange(0, 8192, m.range(0, 8192)).categories;
  const batch = classifyPfns(classifier, counting, [2900, 2950, 2300], 8192, lastFreeBlock);
  assert.deepEqual([...batch], [fresh[2900], fresh[2950], fresh[2300]]);
  assert.equal(batch[0], CATEGORY.anonymous);
  assert.equal(batch[2], CATEGORY.free, "the lower half is still free, in the order-9 block");
});

test("classifyPfns: PFNs beyond guest RAM (ROM mapped high) or negative are unknown, and the call ends", () => {
  const m = new Memmap(4096);
  layout61(m);
  const classifier = new PageClassifier(P61, m);
  const full = classifier.classifyRange(0, 4096, m.range(0, 4096)).categories;
  // 0xfffc0: the PFN of QEMU's pc.bios at 4 GiB - 256 KiB, far beyond a 16 MiB guest.
  const pfns = [0xfffc0, 5, -1, 4096, 4095, 0xfffc1, 1 << 30];
  const batch = classifyPfns(classifier, m, pfns, 4096);
  assert.deepEqual(
    [...batch],
    [
      CATEGORY.unknown,
      full[5],
      CATEGORY.unknown,
      CATEGORY.unknown,
      full[4095],
      CATEGORY.unknown,
      CATEGORY.unknown,
    ],
  );
});

// ---------------------------------------------------------------------------------------------------------
// The layout resolver: the 6.1 and 6.12 profiles vmprune used to carry are reproduced as regression fixtures;
// versions Debian does not package are built from the documented facts (doc §2-§5).

test("layout: 6.1 and 6.12 resolve to the former per-version profiles, each fact with its source", () => {
  assert.deepEqual(P61.flags, {
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
  });
  assert.equal(P61.flagsMask, 0xffffff);
  assert.equal(P61.scheme, "bit-clear");
  assert.equal(P61.compoundOrderOffset, 64 + 17);
  assert.deepEqual(P61.hugetlb, { kind: "dtor", offset: 64 + 16, value: 2 });
  assert.deepEqual(P612.flags, {
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
  });
  assert.equal(P612.flagsMask, 0x1fffff);
  assert.equal(P612.scheme, "top-byte");
  assert.equal(P612.compoundOrderOffset, 64);
  assert.deepEqual(P612.hugetlb, { kind: "type" });
  for (const l of [P61, P612]) {
    assert.deepEqual(l.offsets, { flags: 0, tail: 8, mapping: 24, private: 40, mapcount: 48, refcount: 52 });
    assert.equal(l.maxBuddyOrder, 10);
    assert.ok(l.capabilities.free.on && l.capabilities.cache.on);
  }
  const source = (l: typeof P61, name: string) => l.facts.find((f) => f.name === name)?.source;
  assert.equal(source(P612, "bit PG_lru"), "VMCOREINFO NUMBER(PG_lru)");
  assert.equal(source(P612, "bit PG_dirty"), "BTF enum pageflags PG_dirty");
  assert.equal(source(P612, "bit PG_head"), "VMCOREINFO NUMBER(PG_head_mask)");
  assert.equal(source(P61, "OFFSET(page.mapping)"), "VMCOREINFO OFFSET(page.mapping)");
  assert.deepEqual(
    P612.folioMapcounts.map((m) => m.name),
    ["_entire_mapcount", "_large_mapcount"],
  );
});

test("layout: without BTF free pruning stays on from VMCOREINFO alone, cache pruning is off with the reason", () => {
  const l = resolveKernelLayout(VmcoreInfo.parse(vmcoreinfoText(RELEASE_612)), null, "BTF unreadable");
  assert.ok(l.capabilities.free.on);
  assert.equal(l.capabilities.cache.on, false);
  assert.match(l.capabilities.cache.reason, /BTF unreadable: nothing says PG_uptodate .*PG_dirty/);
  assert.equal(l.flags.dirty, undefined, "no guessed flag");
  assert.equal(l.flags.lru, 5);
  // The mask reaches the highest flag known (PG_hwpoison 20) without __NR_PAGEFLAGS.
  assert.equal(l.flagsMask, 0x1fffff);
  // A clean, unmapped file page is not called cache without the flags that prove it clean.
  const m = new Memmap(4);
  m.set(1, { flags: bits(3, 5), mapping: FILE, refcount: 1 });
  assert.equal(new PageClassifier(l, m).classifyRange(0, 4, m.range(0, 4)).categories[1], CATEGORY.inode);
});

test("layout: a kernel that does not say SIZE(page) or its buddy value cannot be classified (free off, reason)", () => {
  for (const key of ["SIZE(page)", "NUMBER(PAGE_BUDDY_MAPCOUNT_VALUE)", "LENGTH(zone.free_area)"]) {
    const l = resolveKernelLayout(editVmcoreinfo(vmcoreinfoText(RELEASE_612), { [key]: null }), null);
    assert.equal(l.capabilities.free.on, false, key);
    assert.match(l.capabilities.free.reason, new RegExp(key.replace(/[()]/g, "\\$&")));
    assert.throws(() => new PageClassifier(l, new Memmap(1)), /cannot classify/);
  }
  // BTF fills in what VMCOREINFO lacks.
  const filled = resolveKernelLayout(
    editVmcoreinfo(vmcoreinfoText(RELEASE_612), { "SIZE(page)": null }),
    TYPES_612,
  );
  assert.ok(filled.capabilities.free.on);
  assert.equal(filled.facts.find((f) => f.name === "SIZE(page)")?.source, "BTF sizeof(struct page)");
});

/** A compound page at `head` of `order` whose tails name the head the pointer way. */
function compound(m: Memmap, head: number, order: number, f: Parameters<Memmap["set"]>[1]): void {
  m.set(head, f);
  for (let p = head + 1; p < head + 2 ** order; p++) m.set(p, { head: (VMEMMAP + BigInt(head) * 64n) | 1n });
}

test("layouts Debian does not package (6.3-6.5, 6.6-6.8, 6.9, 6.10, 6.11): order, hugetlb and page types", () => {
  const text61 = vmcoreinfoText(RELEASE_61);
  const noOrder = { "OFFSET(page.compound_order)": null, "OFFSET(page.compound_dtor)": null };
  const cases = [
    {
      name: "6.3-6.5: folio._folio_order, folio._folio_dtor",
      info: editVmcoreinfo(text61, {
        ...noOrder,
        "OFFSET(folio._folio_order)": "81",
        "OFFSET(folio._folio_dtor)": "80",
      }),
      order: (m: Memmap, head: number, o: number) => {
        m.buf[head * 64 + 81] = o;
      },
      hugetlb: (m: Memmap, head: number) => {
        m.buf[head * 64 + 80] = 2;
      },
      buddy: -129,
    },
    {
      name: "6.6-6.8: order in page[1].flags, PG_hugetlb in page[1].flags",
      info: editVmcoreinfo(text61, {
        ...noOrder,
        "NUMBER(HUGETLB_PAGE_DTOR)": null,
        "NUMBER(PG_hugetlb)": "8",
      }),
      order: (m: Memmap, head: number, o: number) => {
        m.buf[(head + 1) * 64] = o;
      },
      hugetlb: (m: Memmap, head: number) => {
        // PG_hugetlb = PG_active, bit 8 in 6.6's order: above the order byte (page-flags.h@v6.6).
        const at = (head + 1) * 64 + 1;
        m.buf[at] = (m.buf[at] ?? 0) | 1;
      },
      buddy: -129,
    },
    {
      name: "6.9: hugetlb a cleared-bit page type",
      info: editVmcoreinfo(text61, {
        ...noOrder,
        "NUMBER(HUGETLB_PAGE_DTOR)": null,
        "NUMBER(PAGE_HUGETLB_MAPCOUNT_VALUE)": String(~0x800),
      }),
      order: (m: Memmap, head: number, o: number) => {
        m.buf[(head + 1) * 64] = o;
      },
      hugetlb: (m: Memmap, head: number) => m.buf.writeInt32LE(~0x800, head * 64 + 48),
      buddy: -129,
    },
    {
      name: "6.11: PAGE_TYPE_BASE 0x80000000, low 16 bits the owner's",
      info: editVmcoreinfo(text61, {
        ...noOrder,
        "NUMBER(HUGETLB_PAGE_DTOR)": null,
        "NUMBER(PG_slab)": null,
        "NUMBER(PAGE_BUDDY_MAPCOUNT_VALUE)": String(~0x40000000),
        "NUMBER(PAGE_OFFLINE_MAPCOUNT_VALUE)": String(~0x20000000),
        "NUMBER(PAGE_HUGETLB_MAPCOUNT_VALUE)": String(~0x04000000),
        "NUMBER(PAGE_SLAB_MAPCOUNT_VALUE)": String(~0x02000000),
      }),
      order: (m: Memmap, head: number, o: number) => {
        m.buf[(head + 1) * 64] = o;
      },
      hugetlb: (m: Memmap, head: number) => m.buf.writeInt32LE(~0x04000000, head * 64 + 48),
      buddy: ~0x40000000,
    },
  ];
  for (const c of cases) {
    const l = resolveKernelLayout(c.info, null);
    assert.ok(l.capabilities.free.on, `${c.name}: ${l.capabilities.free.reason}`);
    const m = new Memmap(64);
    m.set(0, { mapcount: c.buddy, private: 3 }); // free block of order 3
    for (let p = 1; p < 8; p++) m.set(p, { mapcount: -1 });
    compound(m, 8, 3, { flags: bits(16, 19, 4, 2), mapping: ANON, refcount: 8 }); // anon THP-like, order 3
    c.order(m, 8, 3);
    compound(m, 16, 2, { flags: bits(16), refcount: 0 }); // a free hugetlb folio of order 2
    c.order(m, 16, 2);
    c.hugetlb(m, 16);
    compound(m, 24, 2, { flags: bits(16), refcount: 1 }); // in use
    c.order(m, 24, 2);
    c.hugetlb(m, 24);
    const got = new PageClassifier(l, m).classifyRange(0, 32, m.range(0, 32)).categories;
    assert.ok(
      got.subarray(0, 8).every((x) => x === CATEGORY.free),
      `${c.name}: buddy block`,
    );
    assert.ok(
      got.subarray(8, 16).every((x) => x === CATEGORY.anonymous),
      `${c.name}: compound by its order`,
    );
    assert.ok(
      got.subarray(16, 20).every((x) => x === CATEGORY.free),
      `${c.name}: free hugetlb`,
    );
    assert.ok(
      got.subarray(20, 24).every((x) => x === CATEGORY.kernel),
      `${c.name}: after it`,
    );
    assert.ok(
      got.subarray(24, 28).every((x) => x === CATEGORY.anonymous),
      `${c.name}: hugetlb in use`,
    );
  }
  // 6.11: an owner's low 16 bits do not hide the type; an unnamed type is kernel memory, never free.
  const c611 = cases[3];
  assert.ok(c611);
  const l611 = resolveKernelLayout(c611.info, null);
  assert.equal(l611.scheme, "bit-clear-16");
  assert.equal(l611.pageType(~0x40000000 & ~0x1234), "buddy");
  assert.equal(l611.pageType(~0x10000000), "other", "a page table (PG_table) is not exported");
  assert.equal(l611.pageType(-1), null);
  assert.equal(l611.pageType(-5), null, "mapcount underflow");
});

test("7.1+: compound_info names the head by pointer or, with HVO, by a mask of the tail's own address", () => {
  const info = editVmcoreinfo(vmcoreinfoText(RELEASE_612), {
    "OFFSET(page.compound_head)": null,
    "OFFSET(page.compound_info)": "8",
  });
  const l = resolveKernelLayout(info, null);
  assert.equal(l.tailEncoding, "pointer-or-mask");
  const m = new Memmap(64);
  // Order-3 anon folio at 16 with mask tails: GENMASK(63, 3 + 6) | 1.
  m.set(16, { flags: bits(6, 17), mapping: ANON, refcount: 8 });
  const mask = ((1n << 64n) - 1n) ^ ((1n << 9n) - 1n);
  for (let p = 17; p < 24; p++) m.set(p, { head: mask | 1n });
  m.buf[17 * 64] = 3;
  // Order-2 anon folio at 32 with pointer tails (7.1+ without HVO).
  compound(m, 32, 2, { flags: bits(6, 17), mapping: ANON, refcount: 4 });
  m.buf[33 * 64] = 2;
  const got = new PageClassifier(l, m).classifyRange(0, 64, m.range(0, 64)).categories;
  assert.ok(
    got.subarray(16, 24).every((x) => x === CATEGORY.anonymous),
    "mask tails resolve to their head",
  );
  assert.ok(
    got.subarray(32, 36).every((x) => x === CATEGORY.anonymous),
    "pointer tails too",
  );
  // Reading the mask as a pointer ("pointer - 1") would make every tail unknown: the 6.12 layout shows it.
  const fromTail = new PageClassifier(l, m).classifyRange(20, 4, m.range(20, 4)).categories;
  assert.ok(
    fromTail.every((x) => x === CATEGORY.anonymous),
    "a batch starting at a mask tail",
  );
  const asPointer = new PageClassifier(P612, m).classifyRange(20, 4, m.range(20, 4)).categories;
  assert.ok(asPointer.every((x) => x === CATEGORY.unknown));
});

test("batch-path check: the stream's path agrees with the whole pass; a guest that allocates between them fails it", () => {
  const m = batchMemmap();
  const classifier = new PageClassifier(P61, m);
  const ok = batchPathCheck(classifier, m, 8192);
  assert.equal(ok.verdict, "ok", ok.detail);
  assert.match(
    ok.detail,
    /^8192 pages in 8 windows: 0 free only to the batch path, 0 only to the whole pass/,
  );
  // The order-10 block at 2048 is allocated (anonymous pages) right after the batch path read it: the whole pass,
  // which reads the window next, sees no free page there. The check cannot tell that from a batch path that calls
  // pages in use free, and refuses.
  const allocating: StructPageSource = {
    read: (pfn, count, into) => {
      // The whole pass reads the window at once; the batch path reads a batch's own struct pages.
      if (pfn === 2048 && count === 1024) {
        for (let p = 2048; p < 3072; p++)
          m.set(p, { flags: bits(16, 19, 4, 2), mapping: ANON, refcount: 1, mapcount: 0 });
      }
      return m.read(pfn, count, into);
    },
    pfnOfStructPage: (address) => m.pfnOfStructPage(address),
    structPageAddress: (pfn) => m.structPageAddress(pfn),
  };
  const failed = batchPathCheck(new PageClassifier(P61, allocating), allocating, 8192);
  assert.equal(failed.verdict, "failed", failed.detail);
  assert.match(failed.detail, / 1024 free only to the batch path/);
  // No window with a readable memmap: nothing to compare.
  const unreadable: StructPageSource = { ...allocating, read: () => false };
  assert.equal(batchPathCheck(new PageClassifier(P61, unreadable), unreadable, 8192).verdict, "skipped");
});
