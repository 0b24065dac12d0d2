/**
 * The x86-64 page-table walk on synthetic tables: 4- and 5-level, 4 KiB / 2 MiB / 1 GiB pages (with PAT bit 12
 * set in large entries), SME mask, canonical checks, virtual reads across pages, the bounded cache, and
 * untrusted tables: cyclic and self-referencing entries, PSE where reserved, tables outside RAM, random bytes:
 * each ends in a TranslationError or a bounded result, in bounded time.
 */
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { test } from "node:test";
import { AddressSpace, kernelImagePa, START_KERNEL_MAP } from "../../src/introspect/address-space.ts";
import { TranslationError } from "../../src/introspect/errors.ts";
import { bufferMemory } from "../../src/introspect/guest-memory.ts";
import { PageTableBuilder, SIZE_1G, SIZE_2M, SIZE_4K } from "../../src/introspect/synthetic-guest.ts";

const MIB = 1024 * 1024;

function setup(levels: 4 | 5, sizeBytes = 8 * MIB) {
  const buf = Buffer.alloc(sizeBytes);
  const tables = new PageTableBuilder(buf, levels, 0x100000, 0x200000);
  const memory = bufferMemory(buf);
  return { buf, tables, memory, as: () => new AddressSpace(memory, { rootPa: tables.root, levels }) };
}

const isTranslationError = (code: string) => (e: unknown) => e instanceof TranslationError && e.code === code;

for (const levels of [4, 5] as const) {
  test(`${levels}-level: 4 KiB, 2 MiB and 1 GiB pages`, () => {
    const { tables, as: make } = setup(levels);
    const va4k = levels === 5 ? 0xff11000012345000n : 0xffff888012345000n;
    const va2m = 0xffffea0000200000n;
    const va1g = levels === 5 ? 0xff20000040000000n : 0xffff900040000000n;
    tables.map(va4k, 0x300000);
    tables.map(va2m, 0x400000, SIZE_2M, 0x1000n); // PAT bit 12 set: must be masked off
    tables.map(va1g, 0, SIZE_1G);
    const as = make();
    assert.equal(as.translate(va4k + 0x123n), 0x300123);
    assert.equal(as.translate(va2m + 0x1abcden), 0x400000 + 0x1abcde);
    assert.equal(as.translate(va1g + 0x3456789n), 0x3456789);
    assert.equal(as.pageSize(va4k), SIZE_4K);
    assert.equal(as.pageSize(va2m), SIZE_2M);
    assert.equal(as.pageSize(va1g), SIZE_1G);
    assert.throws(() => as.translate(va4k + 0x1000n), isTranslationError("not-mapped"));
    assert.equal(as.tryTranslate(va4k + 0x1000n), -1);
    // 2nd time from the cache, same answer.
    assert.equal(as.translate(va2m + 0x1abcden), 0x400000 + 0x1abcde);
    assert.ok(as.stats.hits >= 1);
  });
}

test("5-level indexes bit 48..56; 4-level rejects addresses canonical only with 57 bits", () => {
  const { tables, memory } = setup(5);
  const va = 0xff11000000000000n; // canonical for LA57, not for 4-level
  tables.map(va, 0x5000);
  const as5 = new AddressSpace(memory, { rootPa: tables.root, levels: 5 });
  assert.equal(as5.translate(va), 0x5000);
  const as4 = new AddressSpace(memory, { rootPa: tables.root, levels: 4 });
  assert.throws(() => as4.translate(va), isTranslationError("non-canonical"));
  assert.throws(() => as5.translate(0x0100000000000000n), isTranslationError("non-canonical"));
});

test("phys_base may be negative: __pa_symbol mod 2^64", () => {
  const physBase = -0x10e00000n;
  const pa = kernelImagePa(0xffffffffb0210000n, physBase);
  assert.equal(pa, 0x1f410000n, "the doc's 5-level boot: init_top_pgt → PA 0x1f410000");
  assert.equal(kernelImagePa(START_KERNEL_MAP, 0n), 0n);
});

test("SME mask bit is cleared from entries", () => {
  const { tables, buf, memory } = setup(4);
  const va = 0xffff888000001000n;
  tables.map(va, 0x7000, SIZE_4K, 1n << 47n);
  const as = new AddressSpace(memory, { rootPa: tables.root, levels: 4, smeMask: 1n << 47n });
  assert.equal(as.translate(va), 0x7000);
  const plain = new AddressSpace(memory, { rootPa: tables.root, levels: 4 });
  const beyond = plain.translate(va);
  assert.equal(beyond, 2 ** 47 + 0x7000, "without the mask the C-bit reads as an address bit");
  assert.ok(beyond > buf.length && !plain.tryReadVirt(va, Buffer.alloc(8)), "…beyond guest RAM");
});

test("readVirt crosses pages and merges physically contiguous runs", () => {
  const { tables, buf, as: make } = setup(4);
  const va = 0xffffc90000000000n;
  tables.map(va, 0x300000);
  tables.map(va + 0x1000n, 0x301000);
  tables.map(va + 0x2000n, 0x500000);
  buf.write("abcd", 0x300ffe, "latin1");
  buf.write("wx", 0x301ffe, "latin1");
  buf.write("!!", 0x500000, "latin1");
  const as = make();
  const out = Buffer.alloc(0x1004);
  as.readVirt(va + 0xffen, out);
  assert.equal(out.toString("latin1", 0, 4), "abcd");
  assert.equal(out.toString("latin1", 0x1000, 0x1004), "wx!!");
  assert.equal(as.readCString(va + 0xffen, 3), "abc");
  assert.ok(!as.tryReadVirt(va + 0x2ffcn, Buffer.alloc(8)), "runs into an unmapped page");
});

test("cyclic and self-referencing tables: every walk ends after `levels` reads", () => {
  const { buf, memory } = setup(4);
  const root = 0x100000;
  // Every entry of the root points back to the root: a four-fold self-reference (the 'recursive mapping').
  for (let i = 0; i < 512; i++) buf.writeBigUInt64LE(BigInt(root) | 0x63n, root + i * 8);
  const as = new AddressSpace(memory, { rootPa: root, levels: 4 });
  for (let i = 0; i < 10_000; i++) {
    const va = BigInt.asUintN(64, 0xffff800000000000n + BigInt(i) * 0x1234567000n);
    const pa = as.tryTranslate(va);
    assert.ok(pa === -1 || (pa >= root && pa < root + SIZE_4K), `walk lands on the table itself (${pa})`);
  }
  // Two tables pointing at each other, with PSE at the PML4 (reserved there) on one entry.
  buf.fill(0, 0x101000, 0x103000);
  for (let i = 0; i < 512; i++) {
    buf.writeBigUInt64LE(0x102000n | 0x63n, 0x101000 + i * 8);
    buf.writeBigUInt64LE(0x101000n | 0x63n, 0x102000 + i * 8);
  }
  buf.writeBigUInt64LE(0x102000n | 0xe3n, 0x101000 + 511 * 8);
  const ping = new AddressSpace(memory, { rootPa: 0x101000, levels: 5 });
  assert.equal(typeof ping.translate(0x1000n), "number");
  assert.throws(() => ping.translate(0xffffffffffff0000n), isTranslationError("bad-page-table"));
  // A virtual read through a cyclic mapping is bounded by the caller's buffer.
  const out = Buffer.alloc(64 * 1024);
  ping.readVirt(0x1000n, out);
});

test("tables pointing outside guest RAM and a root outside RAM are typed errors", () => {
  const { buf, memory } = setup(4);
  buf.writeBigUInt64LE(0xffffff000n | 0x63n, 0x100000);
  const as = new AddressSpace(memory, { rootPa: 0x100000, levels: 4 });
  assert.throws(() => as.translate(0x0n), isTranslationError("bad-page-table"));
  assert.throws(() => new AddressSpace(memory, { rootPa: 2 ** 40, levels: 4 }), TranslationError);
  assert.throws(() => new AddressSpace(memory, { rootPa: 0x100010, levels: 4 }), TranslationError);
});

test("random bytes as page tables: only TranslationErrors or in-RAM results, bounded time", () => {
  const buf = randomBytes(4 * MIB);
  const memory = bufferMemory(buf);
  const as = new AddressSpace(memory, { rootPa: 0x1000, levels: 5, cacheEntries: 64 });
  let mapped = 0;
  for (let i = 0; i < 20_000; i++) {
    const va = BigInt.asUintN(64, BigInt.asIntN(57, randomBytes(8).readBigUInt64LE(0)));
    try {
      const pa = as.translate(va);
      assert.ok(pa >= 0 && pa < buf.length);
      mapped++;
    } catch (error) {
      assert.ok(error instanceof TranslationError, String(error));
    }
  }
  assert.ok(mapped >= 0);
});

test("the translation cache stays bounded", () => {
  const { tables, memory } = setup(4, 16 * MIB);
  const base = 0xffffc90000000000n;
  for (let i = 0; i < 2000; i++) tables.map(base + BigInt(i) * 0x1000n, 0x300000 + (i % 256) * 0x1000);
  const as = new AddressSpace(memory, { rootPa: tables.root, levels: 4, cacheEntries: 100 });
  for (let round = 0; round < 2; round++)
    for (let i = 0; i < 2000; i++)
      assert.equal(as.translate(base + BigInt(i) * 0x1000n), 0x300000 + (i % 256) * 0x1000);
  const small = (as as unknown as { small: Map<number, number> }).small;
  assert.ok(small.size <= 100, `cache holds ${small.size} entries`);
});
