/**
 * Guests that must not be pruned as usual, on real kernels under QEMU 10.0 (1 vCPU):
 * - `page_poison=1` (Debian's generic 7.2 kernel builds page poisoning in): the allocator would report a zeroed
 *   free page as memory corruption, so free pages are not dropped, the report says why, and the migrated guest
 *   verifies with no corruption report in its log;
 * - a guest whose BTF cannot be read (its header overwritten in guest RAM): free pruning still works from
 *   VMCOREINFO alone, cache pruning is off with the reason;
 * - memory that is offline when the judge opens (a pc-dimm with `memhp_default_state=offline`): its stale struct
 *   pages are never read (its pages are unknown, so they pass unchanged), and once the guest onlines it the
 *   judge reads mem_section again and judges those pages (mostly free: memory the guest has not used yet).
 */
import assert from "node:assert/strict";
import { open } from "node:fs/promises";
import { test } from "node:test";
import { locateBtf } from "../../src/introspect/btf-locate.ts";
import { CATEGORY } from "../../src/introspect/classifier.ts";
import { openRawSnapshot } from "../../src/introspect/guest-memory.ts";
import { classifyGuest } from "../../src/introspect/inspect.ts";
import { openGuestKernel } from "../../src/introspect/kernel.ts";
import { LabPair } from "../../src/lab/lab-vm.ts";
import { migrateThroughPruningSend } from "../../src/lab/prune-oracle.ts";
import { runMixedWorkload } from "../../src/lab/workloads.ts";
import { openGuestJudge } from "../../src/migrate/guest-judge.ts";
import { QmpClient } from "../../src/qemu/qmp.ts";

test("page_poison=1 guest: free pages are not dropped, the reason is reported, the guest verifies", async (t) => {
  const pair = await LabPair.boot({
    kernel: "7.2",
    qemu: "10.0",
    memoryMiB: 512,
    kernelArgs: "page_poison=1",
  });
  t.after(() => pair.stop());
  await runMixedWorkload(pair.src.agent);
  const m = await migrateThroughPruningSend(pair);
  const prune = m.sent.report?.prune;
  t.diagnostic(
    `refused: ${JSON.stringify(prune?.refused)}; judge: ${prune?.judge}; ${m.differing} pages differ`,
  );
  assert.equal(m.result.status, "completed");
  assert.ok(prune);
  assert.match(prune.refused.free ?? "", /poison/);
  assert.equal(prune.pages.pruned, 0);
  assert.ok(prune.pages.byCategory.free > 10_000, "free pages were seen, and kept");
  assert.equal(m.differing, 0, "the destination's RAM is the source's");
  await m.dst.monitor.execute("cont");
  assert.match(await LabPair.verify(m.dst), /^OK/m);
  const log = await m.dst.agent.run("dmesg");
  assert.doesNotMatch(log, /memory corruption|pagealloc/i);
});

test("a guest whose BTF is unreadable: free pages pruned from VMCOREINFO alone, cache pruning off with the reason", async (t) => {
  const pair = await LabPair.boot({ kernel: "6.12", qemu: "10.0", memoryMiB: 512 });
  t.after(() => pair.stop());
  await runMixedWorkload(pair.src.agent);
  await pair.src.monitor.execute("stop");
  // Overwrite the BTF header's magic in guest RAM (the kernel does not read its BTF unless BPF asks for it).
  const memory = openRawSnapshot(pair.src.ramPath);
  t.after(() => memory.close());
  const kernel = openGuestKernel(memory);
  const located = locateBtf(kernel);
  const candidate = located.candidates[0];
  assert.ok(candidate, `the guest's BTF is found first (${located.notes.join("; ")})`);
  const pa = kernel.addressSpace.translate(candidate.va);
  const ram = await open(pair.src.ramPath, "r+");
  try {
    await ram.write(Buffer.alloc(8), 0, 8, pa);
  } finally {
    await ram.close();
  }
  const g = classifyGuest(memory);
  t.diagnostic(`cache: ${JSON.stringify(g.report.layout.cache)}; types: ${g.report.layout.btf}`);
  assert.ok(g.report.layout.free.on);
  assert.equal(g.report.layout.cache.on, false);
  assert.match(g.report.layout.cache.reason, /BTF/);
  assert.equal(g.report.pages.cache, 0, "no page called cache without the flags that prove it clean");
  assert.ok(g.report.pages.free > 10_000);

  await pair.src.monitor.execute("cont");
  const m = await migrateThroughPruningSend(pair);
  const prune = m.sent.report?.prune;
  assert.equal(m.result.status, "completed");
  assert.ok(prune && prune.pages.pruned > 10_000, `free pages dropped (${prune?.pages.pruned})`);
  assert.match(prune.judge ?? "", /cache off/);
  assert.deepEqual(m.differingNotFree, []);
  await m.dst.monitor.execute("cont");
  assert.match(await LabPair.verify(m.dst), /^OK/m);
});

test("memory onlined after the judge opened is picked up; offline sections are never judged", async (t) => {
  const pair = await LabPair.boot({
    kernel: "7.2",
    qemu: "10.0",
    memoryMiB: 512,
    dimmMiB: 256,
    kernelArgs: "memhp_default_state=offline",
  });
  t.after(() => pair.stop());
  const qmp = await QmpClient.connect(pair.src.toolQmpPath);
  t.after(() => qmp.close());
  const opened = await openGuestJudge({ qmp: { client: qmp, path: pair.src.toolQmpPath } });
  t.after(() => opened.close());
  const judge = opened.judge;
  assert.ok(typeof judge !== "string", String(judge));
  // 64 pages spread over the 256 MiB DIMM (RAMBlock "dimm0").
  const pages = Array.from({ length: 64 }, (_, i) => ({
    block: "dimm0",
    blockOffset: i * 4 * 1024 * 1024 + 4096,
  }));
  const offline = judge.judge(pages);
  assert.ok(
    offline.every((c) => c === CATEGORY.unknown),
    `offline memory is not judged: ${[...offline].join(",")}`,
  );
  const memTotal = async () =>
    Number(/MemTotal:\s+(\d+)/.exec(await pair.src.agent.run("cat /proc/meminfo"))?.[1]);
  const totalBefore = await memTotal();
  await pair.src.agent.run(
    "for f in /sys/devices/system/memory/memory*/state; do grep -q offline $f && echo online > $f; done; true",
  );
  const totalAfter = await memTotal();
  assert.ok(
    totalAfter >= totalBefore + 200 * 1024,
    `the guest onlined the DIMM (${totalBefore} -> ${totalAfter} KiB)`,
  );
  await new Promise((resolve) => setTimeout(resolve, 1100));
  const online = judge.judge(pages);
  const free = online.filter((c) => c === CATEGORY.free).length;
  t.diagnostic(
    `after onlining: ${free} of ${pages.length} sampled DIMM pages free; ${[...online].join(",")}`,
  );
  assert.ok(
    online.every((c) => c !== CATEGORY.unknown),
    "every page of the onlined memory is judged",
  );
  assert.ok(free > pages.length / 2, "memory the guest has not used yet is free");
});
