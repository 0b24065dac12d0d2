/**
 * `vmprune send --drop free` on real guests, QEMU 7.2 and 10.0, kernels 6.1 and 6.12 (1 vCPU: the RAM-compare
 * oracle on 7.2, see ram-oracle.test.ts). The mixed workload leaves tens of thousands of free pages, many holding
 * old non-zero data. Oracle 1: every page that differs between source and destination RAM is free in the final
 * classification, and every other page is identical (on 7.2, but for pages QEMU itself never sent again: the oracle
 * tells them apart, see sent-pages.ts). Oracle 2: the destination guest passes `verify` and keeps
 * running workloads (on 7.2, after a migration in which QEMU lost none of its own: one that did is run again, up
 * to 3 times, since its destination can crash from QEMU's loss alone; oracle 1 holds on every run). The last case is a 3 GiB guest: q35 puts its RAM above 2 GiB at 4 GiB (around the PCI hole), so
 * a RAM file offset is not a guest-physical address there, for send's judge nor for the oracle.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { LabPair } from "../../src/lab/lab-vm.ts";
import { againWhileQemuLoses, migrateThroughPruningSend, ramLayoutOf } from "../../src/lab/prune-oracle.ts";
import { runMixedWorkload, workload } from "../../src/lab/workloads.ts";

const FOUR_GIB = 4 * 1024 * 1024 * 1024;

for (const [qemu, kernel, memoryMiB] of [
  ["7.2", "6.1", 512],
  ["7.2", "6.12", 512],
  ["10.0", "6.1", 512],
  ["10.0", "6.12", 3072],
] as const) {
  test(`QEMU ${qemu}, kernel ${kernel}, ${memoryMiB} MiB: free pages dropped, every differing page is free, the guest verifies`, async (t) => {
    const pair = await LabPair.boot({ kernel, qemu, memoryMiB });
    t.after(() => pair.stop());
    if (memoryMiB > 2816) {
      // 2.75 GiB or more: q35 maps the RAM above 2 GiB at 4 GiB, so the guest's memory is split.
      const layout = await ramLayoutOf(pair.src);
      assert.ok(
        layout.some((m) => m.gpa >= FOUR_GIB && m.size >= (memoryMiB - 2048) * 1024 * 1024),
        `RAM above 4 GiB: ${JSON.stringify(layout.map((m) => [m.gpa, m.size, m.blockOffset]))}`,
      );
    }
    await runMixedWorkload(pair.src.agent);
    // On 7.2, a run in which QEMU lost pages of its own is run again (againWhileQemuLoses): its destination may
    // crash from them. The RAM oracle holds on every run.
    const m = await againWhileQemuLoses(
      pair,
      () => migrateThroughPruningSend(pair),
      (m, attempt) => {
        const prune = m.sent.report?.prune;
        const ram = m.result.info.ram;
        t.diagnostic(
          `attempt ${attempt}: pruned ${prune?.pages.pruned} of ${prune?.pages.seen} pages (${JSON.stringify(prune?.pages.byCategory)}), ` +
            `saved ${prune?.bytesSaved} B, judged in ${prune?.judgeMs} ms over ${prune?.batches} batches; ` +
            `QEMU: ${ram?.normal} normal, ${ram?.duplicate} zero, ${ram?.transferred} B, ${m.result.info["total-time"]} ms; ` +
            `relay sent ${m.sent.report?.relay.channels[0]?.bytesToDestination} B; ` +
            `${m.differing} pages differ, ${m.finalFree} free at the end; ` +
            `QEMU's own loss (7.2: not free, destination holds what QEMU last sent): ${JSON.stringify(m.qemuUnsent)}`,
        );
        assert.equal(m.result.status, "completed");
        assert.ok(prune, `send printed a pruning report (stderr: ${m.sent.stderr})`);
        assert.equal(prune.mode, "prune");
        assert.equal(prune.degraded, null);
        assert.ok(prune.pages.pruned > 10_000, `many free pages dropped (${prune.pages.pruned})`);
        assert.equal(prune.bytesSaved, prune.pages.pruned * 4095);
        // What the destination received: every dropped PAGE became a ZERO record, nothing else changed in number.
        const wire = m.sent.report?.relay.channels[0]?.bytesToDestination ?? 0;
        const received = m.sent.report?.relay.channels[0]?.bytesFromSource ?? 0;
        assert.equal(received - wire, prune.bytesSaved);
        assert.deepEqual(m.differingNotFree, [], "only free pages may differ");
        assert.ok(m.differing > 1000, `dropped pages that held old data now differ (${m.differing})`);
        assert.ok(m.differing - m.qemuUnsent.length <= prune.pages.pruned);
      },
    );

    await m.dst.monitor.execute("cont");
    const verified = await LabPair.verify(m.dst);
    assert.match(verified, /^OK/m);
    await m.dst.agent.run(workload.anon("32M"), 60_000);
    assert.match(await LabPair.verify(m.dst), /^OK/m);
  });
}
