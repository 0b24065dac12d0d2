/**
 * VMCOREINFO on synthetic guests: parsing (printk formats, negative numbers, malformed and absurd values), the
 * page-offset scan (note and data page found, rodata-like copies at other offsets ignored, forged copies bounded),
 * validation (stale release, wrong phys_base), and openGuestKernel end to end: 4- and 5-level, negative
 * phys_base, mem_section → struct page, a stale kernel whose tables survived, a forgery, random bytes.
 */
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { test } from "node:test";
import { IntrospectError, MemSectionError, VmcoreinfoError } from "../../src/introspect/errors.ts";
import { bufferMemory } from "../../src/introspect/guest-memory.ts";
import { openGuestKernel } from "../../src/introspect/kernel.ts";
import {
  BUDDY_MAPCOUNT_61,
  buildSyntheticKernel,
  SIZE_4K,
  type SyntheticKernelOptions,
} from "../../src/introspect/synthetic-guest.ts";
import { scanForVmcoreinfo, VmcoreInfo, validateVmcoreinfo } from "../../src/introspect/vmcoreinfo.ts";

const MIB = 1024 * 1024;

function guest(options: SyntheticKernelOptions = {}, sizeBytes = 32 * MIB) {
  const buf = Buffer.alloc(sizeBytes);
  const kernel = buildSyntheticKernel(buf, options);
  return { buf, kernel, memory: bufferMemory(buf) };
}

const code = (c: string) => (e: unknown) => e instanceof IntrospectError && e.code === c;

test("parse: SYMBOL hex, NUMBER signed decimal or 0x hex, SIZE unsigned, numbers() for profiles", () => {
  const info = VmcoreInfo.parse(
    "OSRELEASE=6.12.9+deb12-cloud-amd64\nPAGESIZE=4096\nSYMBOL(_stext)=ffffffff9a000000\n" +
      "SYMBOL(init_uts_ns)=ffffffff9c000000\nSYMBOL(init_top_pgt)=ffffffff9b000000\nNUMBER(phys_base)=-283115520\n" +
      "NUMBER(VMALLOC_START)=0xffffc90000000000\nSIZE(page)=64\nNUMBER(PAGE_BUDDY_MAPCOUNT_VALUE)=-268435456\n" +
      "NUMBER(pgtable_l5_enabled)=1\nKERNELOFFSET=19000000\n",
  );
  assert.equal(info.osRelease, "6.12.9+deb12-cloud-amd64");
  assert.equal(info.physBase, -283115520n);
  assert.equal(info.symbol("SYMBOL(_stext)"), 0xffffffff9a000000n);
  assert.equal(info.signed("NUMBER(VMALLOC_START)"), 0xffffc90000000000n);
  assert.equal(info.pagingLevels, 5);
  assert.equal(info.kernelOffset, 0x19000000n);
  const numbers = info.numbers();
  assert.equal(numbers.get("SIZE(page)"), 64);
  assert.equal(numbers.get("NUMBER(PAGE_BUDDY_MAPCOUNT_VALUE)"), -268435456);
  assert.equal(numbers.has("NUMBER(VMALLOC_START)"), false, "beyond 2^53: not a number");
});

test("parse: missing keys, malformed lines and absurd values are VmcoreinfoErrors", () => {
  const { kernel } = guest();
  const without = (key: string) =>
    kernel.text.replace(new RegExp(`^${key.replace(/[()]/g, "\\$&")}=.*\\n`, "m"), "");
  assert.throws(() => VmcoreInfo.parse(without("SYMBOL(_stext)")), code("bad-vmcoreinfo"));
  assert.throws(() => VmcoreInfo.parse(without("NUMBER(phys_base)")), code("bad-vmcoreinfo"));
  assert.throws(() => VmcoreInfo.parse(kernel.text.replace("PAGESIZE=4096", "PAGESIZE=65536")), /PAGESIZE/);
  assert.throws(() => VmcoreInfo.parse(`${kernel.text}garbage line\n`), code("bad-vmcoreinfo"));
  assert.throws(() => VmcoreInfo.parse(`${kernel.text}X=\x01\n`), code("bad-vmcoreinfo"));
  assert.throws(
    () => VmcoreInfo.parse(kernel.text.replace("pgtable_l5_enabled)=0", "pgtable_l5_enabled)=7")),
    VmcoreinfoError,
  );
  assert.throws(() => VmcoreInfo.parse(`OSRELEASE=${"x".repeat(100)}\n`), VmcoreinfoError);
  const info = VmcoreInfo.parse(kernel.text.replace("SIZE(page)=64", "SIZE(page)=18446744073709551616"));
  assert.throws(() => info.unsigned("SIZE(page)"), /overflows/);
  assert.throws(() => info.bounded("LENGTH(mem_section)", 1, 10), /outside/);
});

test("scan: note at page offset 24 and data page at 0; copies at other offsets are ignored", () => {
  const { buf, kernel, memory } = guest();
  // rodata-like copies: the format string and a full copy not page aligned.
  buf.write("VMCOREINFO\0OSRELEASE=%s\n", 0x1100010, "latin1");
  buf.write(kernel.text, 0x1200100, "latin1");
  // A note header with an absurd size.
  buf.writeUInt32LE(11, 0x1300000);
  buf.writeUInt32LE(0xfffffff0, 0x1300004);
  buf.write("VMCOREINFO\0\0OSRELEASE=x\n", 0x130000c, "latin1");
  const scan = scanForVmcoreinfo(memory);
  assert.equal(scan.candidates.length, 1, "note and page hold the same text: one distinct candidate");
  assert.deepEqual(scan.copies[0], [kernel.notePa, kernel.dataPagePa]);
  assert.equal(scan.candidates[0]?.form, "note");
  assert.equal(scan.scannedBytes, buf.length);
});

test("scan: thousands of forged copies are bounded by maxCandidates", () => {
  const buf = Buffer.alloc(16 * MIB);
  for (let p = 0; p < buf.length; p += SIZE_4K) buf.write(`OSRELEASE=forged-${p}\n`, p, "latin1");
  for (let p = SIZE_4K; p < buf.length; p += 2 * SIZE_4K) buf.fill(0x41, p + 20, p + SIZE_4K); // no NUL in page
  const scan = scanForVmcoreinfo(bufferMemory(buf), { maxCandidates: 8 });
  assert.equal(scan.candidates.length, 8);
  assert.ok(scan.truncated);
  assert.throws(
    () => openGuestKernel(bufferMemory(buf), { scan: { maxCandidates: 8 } }),
    code("unvalidated-vmcoreinfo"),
  );
});

test("validate: the kernel's own page tables translate _stext and hold the release", () => {
  const { kernel, memory } = guest();
  const v = validateVmcoreinfo(memory, VmcoreInfo.parse(kernel.text));
  assert.equal(v.rootPa, kernel.rootPa);
  assert.equal(v.stextPa, kernel.stextPa);
  assert.ok(kernel.physBase < 0n, "the default synthetic kernel has a negative phys_base");
  const wrongRelease = VmcoreInfo.parse(kernel.text.replace(kernel.release, "6.1.0-1-amd64"));
  assert.throws(() => validateVmcoreinfo(memory, wrongRelease), /stale copy/);
  const wrongBase = VmcoreInfo.parse(kernel.text.replace(/phys_base\)=.*/, "phys_base)=4096"));
  assert.throws(() => validateVmcoreinfo(memory, wrongBase), code("unvalidated-vmcoreinfo"));
  const absurdRoot = VmcoreInfo.parse(
    kernel.text.replace(/phys_base\)=.*/, "phys_base)=9223372036854775807"),
  );
  assert.throws(() => validateVmcoreinfo(memory, absurdRoot), code("unvalidated-vmcoreinfo"));
});

for (const levels of [4, 5] as const) {
  test(`openGuestKernel, ${levels}-level: release, mem_section, struct page addresses`, () => {
    const { kernel, memory } = guest({ levels });
    const k = openGuestKernel(memory);
    assert.equal(k.release, kernel.release);
    assert.equal(k.pagingLevels, levels);
    assert.equal(k.physBase, kernel.physBase);
    assert.equal(k.rootPa, kernel.rootPa);
    assert.deepEqual(k.vmcoreinfoGpas, [kernel.notePa, kernel.dataPagePa]);
    assert.equal(k.directMapBase, kernel.directMapBase);
    assert.equal(k.memmap.vmemmapBase, kernel.vmemmapBase);
    assert.equal(k.memmap.structPageAddress(100), kernel.vmemmapBase + 6400n);
    assert.equal(k.memmap.structPageAddress(40000), null, "section 1 is not present");
    assert.equal(k.memmap.pfnOfStructPage(kernel.vmemmapBase + 6400n), 100);
    assert.equal(k.memmap.pfnOfStructPage(kernel.vmemmapBase + 6401n), null);
    assert.deepEqual(k.memmap.presentPfnRanges(), [{ startPfn: 0, count: 32768 }]);
    kernel.setStructPage(7, { flags: 0x1234n, refcount: 3 });
    const out = Buffer.alloc(128);
    assert.ok(k.memmap.read(7, 2, out));
    assert.equal(out.readBigUInt64LE(0), 0x1234n);
    assert.equal(out.readInt32LE(52), 3);
    assert.equal(k.memmap.read(32767, 2, out), false, "PFN 32768 has no struct page");
    // A buddy block of order 3 at PFN 64: every PFN inside is free, the one after is not.
    kernel.setStructPage(64, { mapcount: BUDDY_MAPCOUNT_61, refcount: 0, private: 3n });
    assert.equal(k.memmap.isBuddyFree(71, k.info), true);
    assert.equal(k.memmap.isBuddyFree(72, k.info), false);
  });
}

test("a stale kernel whose tables survived is told apart: its VMCOREINFO page is free in the live memmap", () => {
  const buf = Buffer.alloc(48 * MIB);
  const live = buildSyntheticKernel(buf, { release: "6.1.0-99-cloud-amd64" });
  const stale = buildSyntheticKernel(buf, {
    release: "6.1.0-98-cloud-amd64",
    imagePa: 0x1000000,
    imageVa: 0xffffffff90000000n,
    tablesPa: 0x1600000,
    memmapPa: 0x800000, // both kernels' vmemmap shows the same (live) struct pages
    miscPa: 0x1800000,
    writeStructPages: false,
  });
  for (const pa of [stale.notePa, stale.notePa + SIZE_4K, stale.dataPagePa])
    live.setStructPage(pa / SIZE_4K, { mapcount: BUDDY_MAPCOUNT_61, refcount: 0, private: 0n });
  const memory = bufferMemory(buf);
  const k = openGuestKernel(memory);
  assert.equal(k.release, live.release);
  assert.equal(k.scan.candidates, 2);
  assert.ok(k.scan.rejected.some((r) => r.gpa === stale.notePa && /stale/.test(r.reason)));
  // The vCPU's CR3 decides as well (PCID bits set).
  const byCr3 = openGuestKernel(memory, { cr3: BigInt(stale.rootPa) | 0x5n });
  assert.equal(byCr3.release, stale.release);
  // A forgery that claims the live kernel's pages are free cannot win: nobody is provably live.
  live.setStructPage(stale.notePa / SIZE_4K, {});
  assert.throws(() => openGuestKernel(memory), code("ambiguous-vmcoreinfo"));
});

test("a stale copy whose page tables are gone is rejected with the reason", () => {
  const { buf, kernel, memory } = guest();
  const stale = kernel.text.replace(/SYMBOL\(init_top_pgt\)=.*/, "SYMBOL(init_top_pgt)=ffffffffa0100000");
  buf.write(stale, 0x1100000, "latin1");
  const k = openGuestKernel(memory);
  assert.equal(k.release, kernel.release);
  assert.equal(k.scan.rejected.length, 1);
  assert.equal(k.scan.rejected[0]?.gpa, 0x1100000);
});

test("mem_section pointers anywhere: typed errors, bounded", () => {
  const cases: [string, (g: ReturnType<typeof guest>) => void][] = [
    ["root pointer into nowhere", (g) => g.buf.writeBigUInt64LE(0xffff888fff000000n, 0xa00000)],
    ["section memmap unmapped", (g) => g.buf.writeBigUInt64LE(0xffffeb0000000003n, 0xa01000)],
    ["no present section", (g) => g.buf.writeBigUInt64LE(0n, 0xa01000)],
  ];
  for (const [name, corrupt] of cases) {
    const g = guest();
    corrupt(g);
    assert.throws(() => openGuestKernel(g.memory), MemSectionError, name);
  }
  const g = guest({ extra: { "LENGTH(mem_section)": "1000000000" } });
  assert.throws(() => openGuestKernel(g.memory), MemSectionError);
  const h = guest({ extra: { "NUMBER(SECTION_SIZE_BITS)": "60" } });
  assert.throws(() => openGuestKernel(h.memory), MemSectionError);
});

test("random bytes: no VMCOREINFO, a clear error", () => {
  const memory = bufferMemory(randomBytes(64 * MIB));
  assert.throws(() => openGuestKernel(memory), /no VMCOREINFO found in 64 MiB of guest RAM/);
});

test("mem_section: offline sections have no struct pages; refresh() picks up memory onlined later", () => {
  const { buf, kernel, memory } = guest({}, 160 * MIB);
  // Section 1 (PFNs 32768..65535): its struct pages mapped in vmemmap, its entry present with a memmap but not
  // online (SECTION_IS_ONLINE, bit 2, clear): memory added and not onlined yet.
  kernel.tables.map(kernel.vmemmapBase + 32768n * 64n, 0xc00000, 2 * MIB);
  const entry1 = 0xa01000 + 32; // the root page at misc + 4 KiB, SIZE(mem_section) 32
  buf.writeBigUInt64LE(kernel.vmemmapBase | 0x3n, entry1);
  const k = openGuestKernel(memory);
  assert.equal(k.memmap.hasStructPage(32768 + 5), false, "an offline section's struct pages are stale");
  assert.equal(k.memmap.refresh(), false, "nothing changed");
  buf.writeBigUInt64LE(kernel.vmemmapBase | 0x7n, entry1);
  assert.equal(k.memmap.refresh(), true, "the section came online");
  assert.equal(k.memmap.hasStructPage(32768 + 5), true);
  assert.deepEqual(k.memmap.presentPfnRanges(), [{ startPfn: 0, count: 65536 }]);
  // Flag bits above bit 4 (SECTION_MAP_LAST_BIT grew) do not move the decoded memmap.
  buf.writeBigUInt64LE(kernel.vmemmapBase | 0x47n, entry1);
  k.memmap.refresh();
  assert.equal(k.memmap.structPageAddress(32768), kernel.vmemmapBase + 32768n * 64n);
  assert.equal(k.memmap.vmemmapBase, kernel.vmemmapBase);
});
