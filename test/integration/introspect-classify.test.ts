/**
 * The classifier against the guest's own view, on real Debian kernels under QEMU 10.0: a guest running the
 * mixed workload (page cache, mapped files, dirty files, anon, tmpfs, freed non-zero memory) dumps
 * /proc/kpageflags to its spare disk with O_DIRECT and is paused right after; its RAM file is then classified
 * from outside. At least 99.5% of PFNs and 99.9% of free PFNs must agree, every category must occur, the buddy
 * pages must equal the kernel's own NR_FREE_PAGES (read from the zones) up to that counter's per-CPU lag (a few
 * pages; usually exactly) and MemFree closely, and
 * `vmprune inspect --qmp` (on the VM's second monitor) must report the same as the library and write the same PFN map.
 */
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { readFile, rm } from "node:fs/promises";
import { join } from "node:path";
import { test } from "node:test";
import { promisify } from "node:util";
import { ATTR } from "../../src/introspect/classifier.ts";
import {
  allowedCategories,
  compareWithGroundTruth,
  readKpageflagsDump,
} from "../../src/introspect/ground-truth.ts";
import { openRawSnapshot } from "../../src/introspect/guest-memory.ts";
import { classifyGuest, type InspectReport } from "../../src/introspect/inspect.ts";
import { kernelFreePages } from "../../src/introspect/zone-stats.ts";
import { LabPair } from "../../src/lab/lab-vm.ts";
import { REPO_ROOT } from "../../src/lab/paths.ts";
import { guestMeminfo, runMixedWorkload, workload } from "../../src/lab/workloads.ts";
import { QmpClient } from "../../src/qemu/qmp.ts";

const execFileAsync = promisify(execFile);
/** The most NR_FREE_PAGES can lag the buddy lists in these guests (1 vCPU, zones DMA and DMA32; see below). */
const NR_FREE_PAGES_DRIFT = 6 + 2;

// 4-level agreement on every kernel is any-kernel.test.ts's; here 5-level paging and the CLI on the same checks.
for (const [kernel, cpu, levels] of [
  ["6.12", undefined, 4],
  ["6.1", "max", 5],
] as const) {
  test(`kernel ${kernel}, ${levels}-level paging: classification agrees with the guest's kpageflags`, async (t) => {
    const pair = await LabPair.boot({ kernel, qemu: "10.0", memoryMiB: 512, ...(cpu ? { cpu } : {}) });
    t.after(() => pair.stop());
    const agent = pair.src.agent;
    await runMixedWorkload(agent);
    const release = (await agent.run("uname -r")).trim();
    // Let the allocator settle (6.12 drains its per-CPU lists gradually after the churn's large frees), read
    // MemFree, then dump and pause at once: whatever the guest does after the dump skews the comparison.
    await agent.run("sleep 2");
    const memFreeKiB = (await guestMeminfo(agent)).MemFree ?? 0;
    await agent.run(workload.kpageflags(), 120_000);
    await pair.src.monitor.execute("stop");

    const memory = openRawSnapshot(pair.src.ramPath);
    t.after(() => memory.close());
    const g = classifyGuest(memory);
    const dump = await readKpageflagsDump(join(pair.diskDir, "spare.img"));
    const a = compareWithGroundTruth(g.categories, allowedCategories(dump), dump);
    let buddy = 0;
    let perCpu = 0;
    for (const x of g.attributes) {
      if (x & ATTR.buddy) buddy++;
      if (x & ATTR.pcpInferred) perCpu++;
    }
    const counter = kernelFreePages(g.kernel);
    t.diagnostic(
      `${JSON.stringify(g.report.pages)}; agreement ${(100 * a.ratio).toFixed(3)}%, free ${(100 * a.freeRatio).toFixed(3)}%, ` +
        `false free ${a.falseFree}, confusion ${JSON.stringify(a.confusion)}; buddy ${buddy}, NR_FREE_PAGES ${counter}, ` +
        `MemFree ${memFreeKiB / 4} pages, per-CPU ${perCpu}; open ${g.report.timings.openMs.toFixed(0)} ms, classify ${g.report.timings.classifyMs.toFixed(0)} ms`,
    );
    assert.equal(g.report.kernel.release, release);
    assert.equal(g.report.kernel.pagingLevels, levels);
    assert.equal(g.report.pfns, dump.pfns);
    assert.ok(a.ratio >= 0.995, `${(100 * a.ratio).toFixed(3)}% of PFNs agree`);
    assert.ok(a.freeRatio >= 0.999, `${(100 * a.freeRatio).toFixed(3)}% of free PFNs agree`);
    // NR_FREE_PAGES is folded from per-CPU deltas only once one passes the zone's stat threshold (mm/vmstat.c,
    // __mod_zone_page_state; calculate_normal_threshold: 2 × fls(cpus) × (1 + fls(zone MiB / 128)), at most 125),
    // so the counter may lag the buddy lists by up to that per zone and CPU: for the 1-vCPU 512 MiB guest
    // 2 × 1 × (1 + fls(3)) = 6 in DMA32 (~496 MiB) and 2 × 1 × (1 + 0) = 2 in DMA. It usually is exact.
    assert.ok(
      Math.abs(buddy - counter) <= NR_FREE_PAGES_DRIFT,
      `buddy pages ${buddy} = the kernel's NR_FREE_PAGES ${counter}, up to its per-CPU drift`,
    );
    // MemFree was read a moment before the dump; pages move between the per-CPU lists and the buddy lists.
    assert.ok(
      Math.abs(buddy - memFreeKiB / 4) <= 0.02 * buddy + perCpu,
      `buddy pages ≈ MemFree read just before the dump (per-CPU-list pages ${perCpu})`,
    );
    const p = g.report.pages;
    assert.ok(p.free > 10_000 && p.cache > 5_000 && p.inode > 2_000, "free, cache and inode pages");
    assert.ok(p.anonymous > 10_000 && p.shmem > 5_000 && p.kernel > 5_000, "anon, shmem and kernel pages");
    assert.ok(p.unknown < 100, `few unknown pages (${p.unknown})`);

    if (kernel === "6.12") {
      // The lab's client holds the main monitor: a second client there gets a clear error, not a hang.
      await assert.rejects(QmpClient.connect(pair.src.qmpPath, 1_000), /another client probably holds/);
      const mapPath = join(pair.diskDir, "pfn.map");
      const { stdout } = await execFileAsync(
        "node",
        [
          "--import",
          "tsx",
          join(REPO_ROOT, "src/cli/main.ts"),
          "inspect",
          "--qmp",
          pair.src.toolQmpPath,
          "--json",
          "--pfn-map",
          mapPath,
        ],
        { cwd: REPO_ROOT, timeout: 120_000 },
      );
      const cli = JSON.parse(stdout) as InspectReport;
      assert.deepEqual(cli.pages, g.report.pages);
      assert.deepEqual(cli.kernel, g.report.kernel);
      assert.ok((await readFile(mapPath)).equals(Buffer.from(g.categories)));
      await rm(mapPath);
    }
  });
}
