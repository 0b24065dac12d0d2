/**
 * kallsyms and BTF location checked on a real guest (any-kernel.test.ts calls this on each kernel's one boot):
 * the guest is paused, its kallsyms decoded from its RAM (the encoding must be the one its version uses, chosen by
 * the VMCOREINFO checks), the BTF located by kallsyms and by the image scan (the same bytes); then the guest runs
 * again and its own /proc/kallsyms and /sys/kernel/btf/vmlinux must agree (symbols do not move while it runs).
 * Kernels without kallsyms in VMCOREINFO (5.10) are located by the image scan alone. The caller set
 * kptr_restrict to 0 before pausing (root sees real addresses only below 2).
 */
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import type { TestContext } from "node:test";
import { BTF_HEADER_PREFIX, kernelImageRange, locateBtf } from "../../src/introspect/btf-locate.ts";
import { type KallsymsEncoding, openKallsyms } from "../../src/introspect/kallsyms.ts";
import type { GuestKernel } from "../../src/introspect/kernel.ts";
import type { LabPair } from "../../src/lab/lab-vm.ts";

/** Symbols compared with the guest's /proc/kallsyms besides a sample of the table. */
const NAMED = ["_stext", "init_uts_ns", "__start_BTF", "__stop_BTF", "page_offset_base", "vmemmap_base"];
const SAMPLE = 40;

/** The shell command that lets root read real addresses in /proc/kallsyms; run it before pausing. */
export const SHOW_KERNEL_ADDRESSES = "echo 0 > /proc/sys/kernel/kptr_restrict";

/** Checks kallsyms and BTF location on the paused guest, then resumes it and compares with its own view. */
export async function checkKallsymsAndBtf(
  t: TestContext,
  pair: LabPair,
  kernel: GuestKernel,
  encoding: KallsymsEncoding | null,
): Promise<void> {
  const guest = (command: string) => pair.src.agent.run(command, 180_000);
  const sample: { name: string; address: bigint }[] = [];
  let kallsymsCount = 0;
  if (encoding) {
    const ks = openKallsyms(kernel);
    // A second decode measures the warm cost (the first includes compiling the decoder), in CPU time too:
    // the lab host is shared, and wall time there says more about the neighbours than about the decoder.
    const cpu = process.cpuUsage();
    const again = openKallsyms(kernel);
    const { user, system } = process.cpuUsage(cpu);
    const againCpuMs = (user + system) / 1000;
    t.diagnostic(
      `kallsyms: ${ks.count} symbols, ${ks.encoding}, 2-byte counts ${ks.longNames}, decode ${ks.elapsedMs.toFixed(0)} ms (again ${again.elapsedMs.toFixed(0)} ms, ${againCpuMs.toFixed(0)} ms CPU); checks ${ks.checks.map((c) => `${c.symbol}/${c.how}`).join(", ")}`,
    );
    assert.equal(ks.encoding, encoding);
    kallsymsCount = ks.count;
    // VMCOREINFO's own symbols, through the decoded addresses.
    assert.equal(ks.lookup("_stext"), kernel.info.symbol("SYMBOL(_stext)"));
    assert.equal(ks.lookup("init_uts_ns"), kernel.info.symbol("SYMBOL(init_uts_ns)"));
    const memSection = ks.lookup("mem_section");
    assert.ok(memSection !== undefined);
    assert.equal(kernel.addressSpace.readU64(memSection), kernel.info.symbol("SYMBOL(mem_section)"));
    assert.deepEqual(
      ks.checks.map((c) => c.symbol).filter((s) => ["_stext", "init_uts_ns", "mem_section"].includes(s)),
      ["_stext", "init_uts_ns", "mem_section"],
    );
    // page_offset_base holds the direct map's base, which kernel.ts derived from mem_section.
    const pob = ks.lookup("page_offset_base");
    if (pob !== undefined && kernel.directMapBase !== null)
      assert.equal(kernel.addressSpace.readU64(pob), kernel.directMapBase);
    const step = Math.floor(ks.count / SAMPLE);
    for (let i = 0; i < SAMPLE; i++) {
      const s = ks.at(i * step + 7);
      // Names the guest prints differently (clang's .llvm. suffixes) or repeats are left to the named list.
      if (ks.lookupAll(s.name).length === 1 && /^[A-Za-z0-9_.]+$/.test(s.name)) sample.push(s);
    }
    for (const name of NAMED) {
      const address = ks.lookup(name);
      assert.ok(address !== undefined, `kallsyms has ${name}`);
      sample.push({ name, address });
    }
  }

  // BTF: both ways, the same bytes; the range walk is timed on its own too.
  const range = kernelImageRange(kernel);
  const located = locateBtf(kernel, { scan: "always" });
  const scan = located.image;
  assert.ok(scan);
  t.diagnostic(
    `image ${range.start.toString(16)}..${range.end.toString(16)}: ${(range.bytes / 2 ** 20).toFixed(1)} MiB in ${range.runs.length} run(s), flags ${range.referenceFlags?.toString(16)}, ${range.elapsedMs.toFixed(0)} ms; ` +
      `locate: kallsyms ${located.timings.kallsymsMs.toFixed(0)} + ${located.timings.kallsymsBtfMs.toFixed(0)} ms, range ${located.timings.imageRangeMs.toFixed(0)} ms, scan ${located.timings.scanMs.toFixed(0)} ms; notes: ${located.notes.join("; ") || "none"}`,
  );
  const [first] = located.candidates;
  assert.ok(first);
  assert.equal(first.source, encoding ? "kallsyms" : "image-scan");
  assert.ok(first.bytes.subarray(0, 8).equals(BTF_HEADER_PREFIX));
  // The scan found the same blob (deduplicated against the kallsyms one), and nothing else.
  assert.equal(located.candidates.length, 1, located.candidates.map((c) => c.va.toString(16)).join(", "));
  if (encoding) {
    const ks = located.kallsyms;
    assert.ok(ks);
    const start = ks.lookup("__start_BTF");
    const stop = ks.lookup("__stop_BTF");
    assert.ok(start !== undefined && stop !== undefined);
    assert.equal(first.va, start);
    assert.equal(BigInt(first.bytes.length), stop - start);
    const scanned = locateBtf(kernel, { kallsyms: null, scan: "always" }).candidates;
    assert.equal(scanned.length, 1);
    assert.equal(scanned[0]?.source, "image-scan");
    assert.equal(scanned[0]?.va, start);
    assert.ok(scanned[0]?.bytes.equals(first.bytes), "image scan = __start_BTF..__stop_BTF");
  }
  const digest = createHash("sha256").update(first.bytes).digest("hex");
  t.diagnostic(`BTF at ${first.va.toString(16)}: ${first.bytes.length} bytes, sha256 ${digest.slice(0, 16)}`);

  // The guest's own view.
  await pair.src.monitor.execute("cont");
  const sysfs = (await guest("wc -c < /sys/kernel/btf/vmlinux; sha256sum /sys/kernel/btf/vmlinux")).split(
    /\s+/,
  );
  assert.equal(Number(sysfs[0]), first.bytes.length, "/sys/kernel/btf/vmlinux size");
  assert.equal(sysfs[1], digest, "/sys/kernel/btf/vmlinux = the located blob");
  if (encoding) {
    // One fixed-string grep (busybox awk comparing 46 names per line took over a minute); exact names and
    // core symbols (three fields; modules add a fourth) are picked here.
    const lines = await guest(`grep -F -w ${sample.map((s) => `-e '${s.name}'`).join(" ")} /proc/kallsyms`);
    const seen = new Map<string, bigint[]>();
    for (const line of lines.trim().split("\n")) {
      const [address, , name, module] = line.split(/\s+/);
      if (!address || !name || module) continue;
      seen.set(name, [...(seen.get(name) ?? []), BigInt(`0x${address}`)]);
    }
    for (const s of sample)
      assert.ok(
        seen.get(s.name)?.includes(s.address),
        `${s.name}: guest says ${seen.get(s.name)?.map((a) => a.toString(16))}, decoded ${s.address.toString(16)}`,
      );
    // Core symbols: lines without a "[module]" column (busybox awk over 150k lines timed out under TCG).
    const core = Number((await guest("grep -c -v ']' /proc/kallsyms")).trim());
    t.diagnostic(
      `${sample.length} symbols agree with /proc/kallsyms; it lists ${core} core symbols, we decoded ${kallsymsCount}`,
    );
    assert.ok(core >= kallsymsCount, "every decoded symbol is one the guest lists");
  }
}
