/**
 * Shared storage at the sizes operators have: what `vmprune send --drop free,cache` costs before a migration and
 * in memory, and how many clean cache pages it places on the disk, with the page locator (the guest kernel's own
 * metadata, storage/page-locator.ts) against the content index (D3's sampled fingerprints over the whole image,
 * storage/disk-index.ts). Not a test.
 *
 *   npm run bench:storage -- [--sizes 1,16,64] [--json]
 *
 * For each size: a sparse raw data disk of that many GiB holding 19 files of 16 MiB (304 MiB, made by mkfs.ext4
 * -d), a 768 MiB lab guest (kernel 6.12, QEMU 10.0, 1 vCPU) that reads all of them (clean page cache), then two
 * live migrations on loopback through real `vmprune send` and `vmprune receive` processes (the CLI, as operators
 * run it): `--cache-refs locator` and `--cache-refs index`, the second from the first one's destination (the
 * order alternates between sizes). Per row:
 *   prepare     send's preparation of the cache references (report cacheRefs.prepareMs: superblocks for the
 *               locator; the whole image read for the index);
 *   send RSS    send's peak resident memory (its report's vmprune.peakRssBytes, getrusage), and receive's, both
 *               run from the build (dist/, as installed; `npm run build` first, done here);
 *   placed      references sent / clean cache pages judged (prune report), the share each way places;
 *   total       QEMU's total migration time.
 * The guest's own page cache is what both read, so the placed share compares the two on the same pages.
 */
import { randomBytes } from "node:crypto";
import { writeFile } from "node:fs/promises";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { dataFilePaths } from "../src/lab/data-disk.ts";
import { run } from "../src/lab/exec.ts";
import { LabPair } from "../src/lab/lab-vm.ts";
import { workload } from "../src/lab/workloads.ts";
import { prepareIncoming } from "../src/qemu/migration.ts";
import { REPORT_WIDTH, table, wrap } from "../src/report/table.ts";
import { requireSetup } from "./common.ts";
import { migrateThroughProcesses } from "./process-run.ts";

const MIB = 1024 * 1024;
const FILES = 19;
const FILE_MIB = 16;

const { values } = parseArgs({
  options: { sizes: { type: "string", default: "1,16,64" }, json: { type: "boolean", default: false } },
});
const sizes = values.sizes.split(",").map(Number);
if (sizes.some((s) => !Number.isInteger(s) || s < 1)) throw new Error("--sizes: GiB, e.g. 1,16,64");
requireSetup("bench:storage", { guests: ["6.12"], qemu: ["10.0"], commands: ["mkfs.ext4"] });
// send and receive run as installed (dist/), not through tsx, so that their memory is theirs.
await run("npm", ["run", "-s", "build"]);

interface Row {
  sizeGiB: number;
  mode: "locator" | "index";
  prepareMs: number;
  sendPeakRssMB: number;
  receivePeakRssMB: number;
  refs: number;
  cachePages: number;
  placedShare: number;
  notLocated: Record<string, number>;
  totalMs: number;
  indexEntries: number | null;
}

async function migrateOnce(pair: LabPair, key: string, mode: Row["mode"], sizeGiB: number): Promise<Row> {
  const disk = join(pair.diskDir, "data.img");
  const dst = await pair.startDestination();
  const dstUri = await prepareIncoming(dst.monitor, { incomingUri: "tcp:127.0.0.1:0" });
  const { result, send, receive } = await migrateThroughProcesses(pair, dstUri, {
    drop: "free,cache",
    key,
    disk,
    cacheRefs: mode,
    migration: { timeoutMs: 600_000 },
    // The content index reads the whole image before send listens.
    startTimeoutMs: 900_000,
  });
  if (!send.cacheRefs || !send.prune || !receive) throw new Error("send or receive reported no references");
  const refs = send.prune.refs;
  const cachePages = send.prune.pages.byCategory.cache ?? 0;
  await pair.promoteDestination();
  return {
    sizeGiB,
    mode,
    prepareMs: send.cacheRefs.prepareMs,
    sendPeakRssMB: send.vmprune.peakRssBytes / MIB,
    receivePeakRssMB: receive.vmprune.peakRssBytes / MIB,
    refs,
    cachePages,
    placedShare: cachePages > 0 ? refs / cachePages : 0,
    notLocated: send.cacheRefs.notLocated as Record<string, number>,
    totalMs: result.info["total-time"] ?? 0,
    indexEntries: send.diskIndex?.entries ?? null,
  };
}

const rows: Row[] = [];
for (const [i, sizeGiB] of sizes.entries()) {
  process.stderr.write(`bench:storage: ${sizeGiB} GiB data disk (${FILES} x ${FILE_MIB} MiB files)\n`);
  const pair = await LabPair.boot({
    kernel: "6.12",
    qemu: "10.0",
    memoryMiB: 768,
    storage: { dataLayout: { fileCount: FILES, fileSizeMiB: FILE_MIB, imageSizeMiB: sizeGiB * 1024 } },
  });
  try {
    const key = join(pair.diskDir, "link.key");
    await writeFile(key, randomBytes(32));
    await pair.src.agent.run(
      workload.fillCache(dataFilePaths({ fileCount: FILES, fileSizeMiB: FILE_MIB, imageSizeMiB: 0 })),
      300_000,
    );
    // The first migration of a guest takes longer than the second (measured: ~2.5 s at 1 GiB, either way), so
    // the order alternates between sizes.
    const modes = i % 2 === 0 ? (["locator", "index"] as const) : (["index", "locator"] as const);
    for (const mode of modes) {
      const row = await migrateOnce(pair, key, mode, sizeGiB);
      process.stderr.write(`  ${mode}: ${JSON.stringify(row)}\n`);
      rows.push(row);
    }
  } finally {
    await pair.stop();
  }
}

if (values.json) process.stdout.write(`${JSON.stringify(rows, null, 2)}\n`);
else {
  const pct = (x: number) => `${(100 * x).toFixed(1)}%`;
  process.stdout.write(
    `${table(
      [
        "disk",
        "cache refs by",
        "prepare",
        "send peak RSS",
        "receive peak RSS",
        "placed / clean cache",
        "migration",
      ],
      rows.map((r) => [
        `${r.sizeGiB} GiB`,
        r.mode === "index" ? `index (${r.indexEntries} blocks)` : "locator",
        `${r.prepareMs} ms`,
        `${r.sendPeakRssMB.toFixed(0)} MB`,
        `${r.receivePeakRssMB.toFixed(0)} MB`,
        `${r.refs} / ${r.cachePages} (${pct(r.placedShare)})`,
        `${(r.totalMs / 1000).toFixed(1)} s`,
      ]),
    )}\n`,
  );
  const misses = rows
    .filter((r) => r.mode === "locator")
    .map((r) => `${r.sizeGiB} GiB: ${JSON.stringify(r.notLocated)}`);
  process.stdout.write(`${wrap(`not located, by reason: ${misses.join("; ")}`, REPORT_WIDTH).join("\n")}\n`);
}
