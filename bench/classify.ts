/**
 * Classification speed on a real guest (not a test): boots a 4 GiB Debian 6.1 guest under QEMU 10.0, fills
 * part of its memory (page cache, anon, freed non-zero memory), pauses it, then measures in one run:
 *   - opening the kernel (VMCOREINFO scan, validation, mem_section) once;
 *   - classifying every PFN from the RAM files (best of 3), as ms per 1M PFNs (target < 200) and PFNs/s;
 *   - re-reading and classifying the struct pages of a batch of 256 page records (256 consecutive PFNs at
 *     random places, as QEMU sends them), as µs per batch over 2000 batches.
 * Usage: node --import tsx bench/classify.ts [--memory 4096] [--json]
 */
import { classifyPfns } from "../src/introspect/classifier.ts";
import { classifyGuest, openClassifier } from "../src/introspect/inspect.ts";
import { openLiveVmMemory } from "../src/introspect/live-vm.ts";
import { dataFilePaths } from "../src/lab/data-disk.ts";
import { LabPair } from "../src/lab/lab-vm.ts";
import { type Size, workload } from "../src/lab/workloads.ts";
import { reportJson } from "../src/report/version.ts";
import { requireSetup } from "./common.ts";

requireSetup("bench:classify", { guests: ["6.1"], qemu: ["10.0"] });
const args = process.argv.slice(2);
const memoryMiB = Number(args[args.indexOf("--memory") + 1] || 4096) || 4096;
const json = args.includes("--json");
const log = (line: string) => process.stderr.write(`${line}\n`);

const pair = await LabPair.boot({ kernel: "6.1", qemu: "10.0", memoryMiB });
try {
  log(`booted a ${memoryMiB} MiB guest in ${(pair.bootMs / 1000).toFixed(1)} s; filling memory ...`);
  const agent = pair.src.agent;
  // Sized for the default 4 GiB (1 GiB freed non-zero, 512 MiB anon), scaled down for smaller guests.
  const part = (share: number): Size => `${Math.floor(memoryMiB * share)}M`;
  await agent.run(workload.churn(part(1 / 4), 1), 600_000);
  await agent.run(workload.fillCache(dataFilePaths()), 300_000);
  await agent.run(workload.anon(part(1 / 8)), 300_000);
  await pair.src.monitor.execute("stop");
  const { memory } = await openLiveVmMemory(pair.src.monitor, pair.src.qmpPath, pair.src.pid);
  try {
    const opened = openClassifier(memory);
    let best = Number.POSITIVE_INFINITY;
    let report = classifyGuest(memory).report;
    for (let run = 0; run < 3; run++) {
      const r = classifyGuest(memory).report;
      best = Math.min(best, r.timings.classifyMs);
      report = r;
    }
    const pfns = report.pfns;
    const msPerMillion = (best * 1e6) / pfns;
    // Batches of 256 consecutive PFNs at pseudo-random places.
    const batches = 2000;
    let seed = 12345;
    const ranges = opened.kernel.memmap.presentPfnRanges();
    const candidates = ranges.flatMap((r) => [r.startPfn, r.startPfn + r.count - 256]);
    const started = performance.now();
    for (let b = 0; b < batches; b++) {
      seed = (seed * 1103515245 + 12345) % 2 ** 31;
      const range = ranges[seed % ranges.length] ?? { startPfn: 0, count: 256 };
      const first = range.startPfn + (seed % Math.max(1, range.count - 256));
      const list = Array.from({ length: 256 }, (_, i) => first + i);
      classifyPfns(opened.classifier, opened.kernel.memmap, list, pfns);
    }
    const batchUs = ((performance.now() - started) * 1000) / batches;
    const result = {
      memoryMiB,
      pfns,
      pages: report.pages,
      /** Opening: VMCOREINFO scan and validation, mem_section, kallsyms, BTF located and parsed, the layout. */
      openMs: Math.round(opened.openMs),
      types: opened.btf,
      classifyMs: Math.round(best),
      msPerMillionPfns: Number(msPerMillion.toFixed(1)),
      pfnsPerSecond: Math.round((pfns / best) * 1000),
      batch256Us: Number(batchUs.toFixed(1)),
      candidates: candidates.length,
    };
    if (json) process.stdout.write(reportJson(result));
    else
      process.stdout.write(
        `${memoryMiB} MiB guest, ${pfns} PFNs: open ${result.openMs} ms (target < 1000 for 512 MiB, with ${result.types}); classify all ${result.classifyMs} ms ` +
          `(${result.msPerMillionPfns} ms per 1M PFNs, target < 200; ${result.pfnsPerSecond} PFNs/s); ` +
          `batch of 256 records ${result.batch256Us} µs\npages ${JSON.stringify(report.pages)}\n`,
      );
  } finally {
    memory.close();
  }
} finally {
  await pair.stop();
}
