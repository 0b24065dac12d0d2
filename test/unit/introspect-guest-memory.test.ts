/**
 * GuestMemory: QEMU's flat memory map parsed (incl. RAM split around the PCI hole above 4 GiB), RAMBlock offset ↔
 * GPA, positional reads from files, raw snapshots and buffers across range boundaries, and typed errors for
 * unmapped addresses, short files and absurd sizes.
 */
import assert from "node:assert/strict";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { GuestMemoryError } from "../../src/introspect/errors.ts";
import {
  blockOffsetToGpa,
  bufferMemory,
  gpaToBlockOffset,
  openMemoryFile,
  openRawSnapshot,
  parseGpa2hva,
  parseMtreeFlat,
  type RamMapping,
} from "../../src/introspect/guest-memory.ts";

/** `info mtree -f` of a q35 guest with 4608 MiB on QEMU 10.0 (abridged: I/O view and devices trimmed). */
const MTREE_4608 = `FlatView #0
 AS "I/O", root: io
 Root memory region: io
  0000000000000000-0000000000000007 (prio 0, i/o): dma-chan
  0000000000000510-0000000000000511 (prio 0, i/o): fwcfg

FlatView #1
 AS "memory", root: system
 AS "cpu-memory-0", root: system
 Root memory region: system
  0000000000000000-00000000000c2fff (prio 0, ram): ram0
  00000000000c3000-00000000000e3fff (prio 0, rom): ram0 @00000000000c3000
  00000000000e4000-00000000000effff (prio 0, ram): ram0 @00000000000e4000
  00000000000f0000-00000000000fffff (prio 0, rom): ram0 @00000000000f0000
  0000000000100000-000000007fffffff (prio 0, ram): ram0 @0000000000100000
  00000000b0000000-00000000bfffffff (prio 0, i/o): pcie-mmcfg-mmio
  00000000fec00000-00000000fec00fff (prio 0, i/o): ioapic
  00000000fffc0000-00000000ffffffff (prio 0, rom): pc.bios
  0000000100000000-000000019fffffff (prio 0, ram): ram0 @0000000080000000

FlatView #2
 AS "cpu-smm-0", root: memory
 Root memory region: memory
  0000000000000000-00000000000c2fff (prio 0, ram): ram0
`;

test("info mtree -f: RAM pieces merged, the above-4G part at block offset 2 GiB", () => {
  const layout = parseMtreeFlat(MTREE_4608);
  assert.deepEqual(layout, [
    { gpa: 0, size: 0x80000000, block: "ram0", blockOffset: 0 },
    { gpa: 0xfffc0000, size: 0x40000, block: "pc.bios", blockOffset: 0 },
    { gpa: 0x100000000, size: 0xa0000000, block: "ram0", blockOffset: 0x80000000 },
  ]);
  assert.equal(blockOffsetToGpa(layout, "ram0", 0x80000000), 0x100000000);
  assert.equal(blockOffsetToGpa(layout, "ram0", 0x7fffffff), 0x7fffffff);
  assert.equal(blockOffsetToGpa(layout, "ram0", 0x120000000), null);
  assert.deepEqual(gpaToBlockOffset(layout, 0x19fffffff), { block: "ram0", blockOffset: 0x11fffffff });
  assert.equal(gpaToBlockOffset(layout, 0xb0000000), null);
});

test("info mtree -f: garbage and missing views are typed errors", () => {
  assert.throws(() => parseMtreeFlat("nonsense"), GuestMemoryError);
  assert.throws(
    () => parseMtreeFlat('FlatView #0\n AS "memory", root: system\n  0-f (prio 0, i/o): x\n'),
    (e: unknown) => e instanceof GuestMemoryError && e.code === "bad-layout",
  );
  assert.throws(
    () => parseMtreeFlat('FlatView #0\n AS "memory"\n  ffffffffffffffff-ffffffffffffffff (prio 0, ram): r\n'),
    GuestMemoryError,
  );
  assert.equal(parseGpa2hva("Host virtual address for 0x1000 (ram0) is 0x7f8d2c000000"), 0x7f8d2c000000);
  assert.equal(parseGpa2hva("Error: No memory is mapped at address 0xb0000000"), undefined);
});

function splitLayout(below: number, above: number): RamMapping[] {
  return [
    { gpa: 0, size: below, block: "ram0", blockOffset: 0 },
    { gpa: 0x10000, size: above, block: "ram0", blockOffset: below },
  ];
}

test("reads across a split: each piece from its block offset; gaps are unmapped-gpa", () => {
  const buf = Buffer.alloc(0x3000);
  for (let i = 0; i < buf.length; i++) buf[i] = (i * 7 + (i >> 8)) & 0xff;
  const mem = bufferMemory(buf, splitLayout(0x1000, 0x2000));
  assert.equal(mem.size, 0x3000);
  assert.equal(mem.end, 0x12000);
  assert.deepEqual(mem.read(0x10000, 16), buf.subarray(0x1000, 0x1010));
  assert.deepEqual(mem.read(0x11ff0, 16), buf.subarray(0x2ff0, 0x3000));
  assert.ok(mem.contains(0, 0x1000) && !mem.contains(0xff0, 0x20) && !mem.contains(-1, 1));
  assert.throws(
    () => mem.read(0xff8, 16),
    (e: unknown) => e instanceof GuestMemoryError && e.code === "unmapped-gpa" && e.gpa === 0x1000,
  );
  assert.throws(() => mem.read(0x12000, 1), GuestMemoryError);
  assert.throws(() => mem.read(0, 2 ** 40), GuestMemoryError, "absurd sizes do not allocate");
  assert.throws(() => mem.readInto(Number.MAX_SAFE_INTEGER + 1, Buffer.alloc(1)), GuestMemoryError);
});

test("adjacent ranges read as one; overlapping layouts are refused", () => {
  const buf = Buffer.from([...Array(32).keys()]);
  const mem = bufferMemory(buf, [
    { gpa: 0, size: 16, block: "a", blockOffset: 16 },
    { gpa: 16, size: 16, block: "a", blockOffset: 0 },
  ]);
  assert.deepEqual([...mem.read(12, 8)], [28, 29, 30, 31, 0, 1, 2, 3]);
  assert.throws(
    () =>
      bufferMemory(buf, [
        { gpa: 0, size: 16, block: "a", blockOffset: 0 },
        { gpa: 8, size: 16, block: "a", blockOffset: 16 },
      ]),
    (e: unknown) => e instanceof GuestMemoryError && e.code === "bad-layout",
  );
});

test("memory files and raw snapshots: positional reads, short files refused", (t) => {
  const dir = mkdtempSync(join(tmpdir(), "introspect-gm-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const file = join(dir, "ram");
  const data = Buffer.alloc(0x4000);
  data.write("below", 0x0ff0);
  data.write("above", 0x1000);
  writeFileSync(file, data);
  const mem = openMemoryFile(file, splitLayout(0x1000, 0x3000));
  t.after(() => mem.close());
  assert.equal(mem.read(0x0ff0, 5).toString(), "below");
  assert.equal(mem.read(0x10000, 5).toString(), "above");
  const snap = openRawSnapshot(file);
  assert.equal(snap.read(0x1000, 5).toString(), "above");
  assert.deepEqual(snap.ranges, [{ gpa: 0, size: 0x4000 }]);
  snap.close();
  assert.throws(() => openMemoryFile(file, splitLayout(0x1000, 0x8000)), /exceed the file/);
  assert.throws(() => openMemoryFile(file, splitLayout(0x1000, 0x1000), "pc.ram"), /no RAM mapping/);
  mem.close();
  assert.throws(
    () => mem.read(0, 1),
    (e: unknown) => e instanceof GuestMemoryError && e.code === "read-failed",
  );
});
