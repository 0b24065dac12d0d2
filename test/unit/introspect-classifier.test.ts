/**
 * The page classifier on synthetic memmaps laid out as Debian's 6.1 and 6.12 kernels lay out struct page: each
 * category, compound pages classified by their head (also when the head is outside the batch), buddy blocks
 * covering their whole order, the per-CPU inference switch, garbage giving "unknown", and profile selection
 * refusing kernels and layouts it does not know.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import {
  ATTR,
  CATEGORY,
  classifyPfns,
  countCategories,
  PageClassifier,
  STRUCT_PAGE_SIZE,
  type StructPageSource,
} from "../../src/introspect/classifier.ts";
import { PROFILES, selectProfile, UnsupportedKernelError } from "../../src/introspect/kernel-profiles.ts";

const VMEMMAP = 0xffffea0000000000n;
const [P61, P612] = PROFILES;
if (!P61 || !P612) throw new Error("profiles missing");

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

test("profile selection: by release, checked against VMCOREINFO; unknown kernels and layouts are refused", () => {
  const numbers61 = new Map(Object.entries(P61.expect));
  assert.equal(selectProfile("6.1.0-56-cloud-amd64", numbers61).name, "linux-6.1");
  assert.equal(
    selectProfile("6.12.95+deb12-cloud-amd64", new Map(Object.entries(P612.expect))).name,
    "linux-6.12",
  );
  assert.throws(() => selectProfile("5.10.0-30-amd64", numbers61), UnsupportedKernelError);
  assert.throws(
    () => selectProfile("6.1.0-56-cloud-amd64", new Map([...numbers61, ["NUMBER(PG_lru)", 5]])),
    /NUMBER\(PG_lru\)=5, profile linux-6.1 expects 4/,
  );
  const missing = new Map(numbers61);
  missing.delete("SIZE(page)");
  assert.throws(() => selectProfile("6.1.0-56-cloud-amd64", missing), /SIZE\(page\)=\(missing\)/);
});

test("classifyPfns: scattered PFNs (a batch of page records) get the same verdicts as a full pass", () => {
  const m = new Memmap(8192);
  layout61(m);
  // A large buddy block far away (order 10 at 2048) and an anon compound of order 2 at 1024.
  m.set(2048, { mapcount: -129, private: 10 });
  for (let p = 2049; p < 3072; p++) m.set(p, { mapcount: -1 });
  m.set(1024, { flags: bits(16, 19, 4, 2), mapping: ANON, refcount: 4 });
  for (let p = 1025; p < 1028; p++) m.set(p, { head: (VMEMMAP + 1024n * 64n) | 1n });
  m.buf[1025 * 64 + 17] = 2;
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
