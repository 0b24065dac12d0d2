/**
 * Introspection's lower layers on real lab VMs (QEMU 10.0, paused): the memory map from `info mtree -f`,
 * VMCOREINFO found and validated (release = guest `uname -r`, `_stext` = 0xffffffff81000000 + KERNELOFFSET), the
 * page-table walk (4-level on 6.1, 5-level with `-cpu max` on 6.12), struct pages from mem_section (all present
 * PFNs readable, the kernel image's pages PG_reserved, the VMCOREINFO pages not free), /proc/PID/mem giving the
 * same bytes as the RAM file, the vCPU's CR3 agreeing, and a 4608 MiB guest whose RAM is split around the PCI
 * hole (GPA 4 GiB = RAM-file offset 2 GiB).
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { openClassifier } from "../../src/introspect/inspect.ts";
import {
  discoverQemuLayout,
  type GuestMemory,
  openGuestKernel,
  openMemoryFile,
  openProcessMemory,
  type RamMapping,
} from "../../src/introspect/kernel.ts";
import type { KernelId } from "../../src/lab/kernels.ts";
import { LabPair } from "../../src/lab/lab-vm.ts";
import { workload } from "../../src/lab/workloads.ts";

const GIB = 1024 * 1024 * 1024;

async function bootPaused(kernel: KernelId, memoryMiB: number, cpu?: string) {
  const pair = await LabPair.boot({ kernel, qemu: "10.0", memoryMiB, ...(cpu ? { cpu } : {}) });
  const uname = (await pair.src.agent.run("uname -r")).trim();
  const hmp = async (commandLine: string) =>
    String(await pair.src.monitor.execute("human-monitor-command", { "command-line": commandLine }));
  return { pair, uname, hmp };
}

/** Unrelocated `_stext` of x86-64 (`_text` = __START_KERNEL; Debian's System.map is a stub, doc §1.1). */
const STEXT_LINKED = 0xffffffff81000000n;

/** Compares `length` bytes at each GPA through both memories. */
function assertSameBytes(a: GuestMemory, b: GuestMemory, gpas: number[], length: number): void {
  for (const gpa of gpas)
    assert.ok(a.read(gpa, length).equals(b.read(gpa, length)), `bytes at GPA ${gpa.toString(16)}`);
}

function cr3Of(registers: string): bigint {
  const m = /CR3=([0-9a-f]+)/i.exec(registers);
  if (!m?.[1]) throw new Error(`no CR3 in info registers: ${registers.slice(0, 200)}`);
  return BigInt(`0x${m[1]}`);
}

for (const [kernelId, cpu, levels] of [
  ["6.1", undefined, 4],
  ["6.12", "max", 5],
] as const) {
  test(`kernel ${kernelId}${cpu ? ` -cpu ${cpu}` : ""}: VMCOREINFO, ${levels}-level walk, struct pages, /proc/PID/mem`, async (t) => {
    const { pair, uname, hmp } = await bootPaused(kernelId, 512, cpu);
    t.after(() => pair.stop());
    await pair.src.agent.run(workload.anon("64M"), 60_000);
    await pair.src.monitor.execute("stop");
    const layout = await discoverQemuLayout(hmp);
    const ram = layout.filter((m) => m.block === "ram0");
    assert.deepEqual(
      ram.map(({ gpa, size, blockOffset }) => ({ gpa, size, blockOffset })),
      [{ gpa: 0, size: 512 * 1024 * 1024, blockOffset: 0 }],
    );
    const memory = openMemoryFile(pair.src.ramPath, layout);
    t.after(() => memory.close());
    const k = openGuestKernel(memory);
    t.diagnostic(
      `scan ${k.scan.elapsedMs.toFixed(0)} ms, ${k.scan.candidates} candidate(s) at ${k.vmcoreinfoGpas.map((g) => g.toString(16))}, phys_base ${k.physBase}, vmemmap ${k.memmap.vmemmapBase?.toString(16)}`,
    );
    assert.equal(k.release, uname);
    assert.equal(k.pagingLevels, levels);
    assert.equal(k.scan.rejected.length, 0);
    // _stext is the linked address plus the KASLR slide, and translates to __pa_symbol(_stext).
    const stext = k.info.symbol("SYMBOL(_stext)");
    assert.equal(stext - (k.kernelOffset ?? 0n), STEXT_LINKED);
    assert.equal(k.addressSpace.translate(stext), k.stextPa);
    // The vCPU's CR3 has the same kernel half; choosing by it gives the same kernel.
    const cr3 = cr3Of(await hmp("info registers"));
    assert.equal(openGuestKernel(memory, { cr3 }).rootPa, k.rootPa);

    // struct pages: every present PFN readable, in 2 MiB windows.
    const pageLayout = openClassifier(memory).layout;
    const memmap = k.memmap;
    assert.ok(memmap.vmemmapBase !== null && memmap.vmemmapBase >= 0xff00000000000000n);
    const window = Buffer.alloc(32768 * 64);
    const started = performance.now();
    let pfns = 0;
    for (const r of memmap.presentPfnRanges())
      for (let pfn = r.startPfn; pfn < r.startPfn + r.count; pfn += 32768) {
        const n = Math.min(32768, r.startPfn + r.count - pfn);
        assert.ok(memmap.read(pfn, n, window), `struct pages of PFN ${pfn}..`);
        pfns += n;
      }
    t.diagnostic(`read ${pfns} struct pages in ${(performance.now() - started).toFixed(1)} ms`);
    assert.ok(pfns >= 131072);
    // The kernel image is PG_reserved; the VMCOREINFO pages are in use (not buddy-free).
    const one = Buffer.alloc(64);
    assert.ok(memmap.read(Math.floor(k.stextPa / 4096), 1, one));
    const reservedBit = pageLayout.flags.reserved ?? -1;
    assert.ok(reservedBit >= 0, "PG_reserved from the guest's BTF");
    assert.ok(
      (one.readUInt32LE(0) >>> reservedBit) & 1,
      `_stext's page is PG_reserved (flags ${one.readUInt32LE(0).toString(16)})`,
    );
    for (const gpa of k.vmcoreinfoGpas)
      assert.equal(memmap.isBuddyFree(Math.floor(gpa / 4096), k.info), false);

    // /proc/PID/mem gives the same bytes and the same kernel.
    const proc = openProcessMemory(pair.src.pid, layout);
    t.after(() => proc.close());
    const samples = [0, k.stextPa, k.rootPa, ...k.vmcoreinfoGpas, 0x100000, 0x1fff0000];
    assertSameBytes(memory, proc, samples, 4096);
    assert.ok(memory.read(0, 64 * 1024 * 1024).equals(proc.read(0, 64 * 1024 * 1024)), "first 64 MiB");
    const viaProc = openGuestKernel(proc);
    assert.equal(viaProc.rootPa, k.rootPa);
    t.diagnostic(`scan via /proc/PID/mem ${viaProc.scan.elapsedMs.toFixed(0)} ms`);
  });
}

test("4608 MiB guest: RAM split around the PCI hole, GPA 4 GiB at RAM-file offset 2 GiB", async (t) => {
  const { pair, uname, hmp } = await bootPaused("6.1", 4608);
  t.after(() => pair.stop());
  await pair.src.monitor.execute("stop");
  const layout = await discoverQemuLayout(hmp);
  const ram: RamMapping[] = layout.filter((m) => m.block === "ram0");
  assert.deepEqual(
    ram.map(({ gpa, size, blockOffset }) => ({ gpa, size, blockOffset })),
    [
      { gpa: 0, size: 2 * GIB, blockOffset: 0 },
      { gpa: 4 * GIB, size: 2.5 * GIB, blockOffset: 2 * GIB },
    ],
  );
  const memory = openMemoryFile(pair.src.ramPath, layout);
  t.after(() => memory.close());
  const k = openGuestKernel(memory);
  t.diagnostic(
    `scan of 4.5 GiB: ${k.scan.elapsedMs.toFixed(0)} ms; VMCOREINFO at ${k.vmcoreinfoGpas.map((g) => g.toString(16))}`,
  );
  assert.equal(k.release, uname);
  // The guest kernel agrees: sections in the hole (2..4 GiB) have no struct pages, those above 4 GiB have.
  assert.equal(k.memmap.hasStructPage((3 * GIB) / 4096), false);
  assert.equal(k.memmap.hasStructPage((5 * GIB) / 4096), true);
  assert.equal(k.memmap.hasStructPage((6.5 * GIB) / 4096 - 1), true);
  // memblock allocates top-down: the memmap itself lies above 4 GiB, read through the split.
  const memmapPa = k.addressSpace.translate(k.memmap.structPageAddress(0) ?? 0n);
  assert.ok(memmapPa >= 4 * GIB, `struct page of PFN 0 at PA ${memmapPa.toString(16)}`);
  const window = Buffer.alloc(32768 * 64);
  let pfns = 0;
  const started = performance.now();
  for (const r of k.memmap.presentPfnRanges())
    for (let pfn = r.startPfn; pfn < r.startPfn + r.count; pfn += 32768) {
      assert.ok(k.memmap.read(pfn, Math.min(32768, r.startPfn + r.count - pfn), window));
      pfns += Math.min(32768, r.startPfn + r.count - pfn);
    }
  t.diagnostic(`read ${pfns} struct pages in ${(performance.now() - started).toFixed(1)} ms`);
  // Above 4 GiB the file layout and QEMU's own host addresses (gpa2hva) read the same bytes.
  const proc = openProcessMemory(pair.src.pid, layout);
  t.after(() => proc.close());
  const above = [
    4 * GIB,
    memmapPa - (memmapPa % 4096),
    ...k.vmcoreinfoGpas.filter((g) => g >= 4 * GIB),
    6.5 * GIB - 4096,
  ];
  assertSameBytes(memory, proc, [...above, 0x100000, 2 * GIB - 4096], 4096);
  assert.ok(
    memory.read(memmapPa - (memmapPa % 4096), 4096).some((b) => b !== 0),
    "the memmap page is not empty",
  );
});
