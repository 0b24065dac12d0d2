/**
 * The shared-disk index: build time and throughput, lookups per second for hits and misses, and what D3's sampled
 * fingerprint saves, on the lab's ext4 data disk and on a synthetic 1 GiB raw image, in one run. Three variants
 * of src/storage/disk-index.ts, same code path:
 *   sampled+lazy   sampled fingerprint, strong hash only for confirmed candidates (the default)
 *   sampled+eager  sampled fingerprint, SHA-256 of every window at build
 *   unsampled      SHA-256 of every window as the key, and of every page looked up (no sampling)
 * Builds are medians of 3, lookup rates medians of 5 rounds, with the image in the host page cache (one warm-up read first), so they measure the
 * indexing, not the disk. Usage: node --import tsx bench/storage-index.ts [syntheticMiB=1024]
 */
import { randomBytes } from "node:crypto";
import { mkdtemp, open, readFile, rm, stat } from "node:fs/promises";
import { cpus, loadavg, tmpdir } from "node:os";
import { basename, join } from "node:path";
import { DATA_DISK_LAYOUT, dataFilePaths } from "../src/lab/data-disk.ts";
import { run } from "../src/lab/exec.ts";
import { ensureGuestImage } from "../src/lab/guest-image.ts";
import { REPORT_WIDTH, table, wrap } from "../src/report/table.ts";
import { DiskIndex, type DiskIndexOptions } from "../src/storage/disk-index.ts";
import { PAGE_SIZE_BYTES } from "../src/storage/image-format.ts";
import { requireSetup } from "./common.ts";

const MIB = 1024 * 1024;
const syntheticMiB = Number(process.argv[2] ?? 1024);
const REPS = 3;
const LOOKUPS = 50_000;

const VARIANTS: [string, DiskIndexOptions][] = [
  ["sampled+lazy", { fingerprint: "sampled", strongHashes: "on-lookup" }],
  ["sampled+eager", { fingerprint: "sampled", strongHashes: "at-build" }],
  ["unsampled", { fingerprint: "strong" }],
];

interface Row {
  variant: string;
  buildMs: number;
  buildHashes: number;
  entries: number;
  bytesPerEntry: number;
  hitsPerS: number;
  missesPerS: number;
  hashesPerHit: number;
  hashesPerMiss: number;
  readsPerHit: number;
  falseCandidatesPerLookup: number;
  hitRate: number;
}

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)] ?? Number.NaN;
}

async function warm(path: string): Promise<void> {
  const handle = await open(path, "r");
  const buf = Buffer.allocUnsafe(8 * MIB);
  try {
    for (let pos = 0; ; pos += buf.length)
      if ((await handle.read(buf, 0, buf.length, pos)).bytesRead === 0) break;
  } finally {
    await handle.close();
  }
}

/** Lookups per second over `pages` (median of 5 rounds of >= 200 ms), with the index's counters for one pass. */
function timeLookups(
  index: DiskIndex,
  pages: Buffer[],
): { perS: number; hits: number; hashes: number; reads: number; falseCandidates: number } {
  const s = index.lookupStats;
  const before = { ...s };
  let hits = 0;
  for (const page of pages) if (index.lookup(page) !== null) hits++;
  const once = {
    hashes: s.strongHashes - before.strongHashes,
    reads: s.blockReads - before.blockReads,
    falseCandidates: s.falseCandidates - before.falseCandidates,
  };
  const rates: number[] = [];
  for (let round = 0; round < 5; round++) {
    let n = 0;
    const started = performance.now();
    while (performance.now() - started < 200) {
      for (const page of pages) index.lookup(page);
      n += pages.length;
    }
    rates.push(n / ((performance.now() - started) / 1000));
  }
  return { perS: median(rates), hits, ...once };
}

async function measure(
  path: string,
  hits: Buffer[],
  misses: Buffer[],
  alignmentBytes: number | "auto",
): Promise<Row[]> {
  await warm(path);
  const rows: Row[] = [];
  for (const [variant, options] of VARIANTS) {
    const times: number[] = [];
    let index: DiskIndex | null = null;
    for (let rep = 0; rep < REPS; rep++) {
      await index?.close();
      index = await DiskIndex.build(path, { ...options, alignmentBytes });
      times.push(index.buildStats.buildMs);
    }
    if (index === null) throw new Error("no build");
    const hit = timeLookups(index, hits);
    const miss = timeLookups(index, misses);
    rows.push({
      variant,
      buildMs: median(times),
      buildHashes: index.buildStats.strongHashes,
      entries: index.entries,
      bytesPerEntry: index.memoryBytes / index.entries,
      hitsPerS: hit.perS,
      missesPerS: miss.perS,
      hashesPerHit: hit.hashes / hits.length,
      hashesPerMiss: miss.hashes / misses.length,
      readsPerHit: hit.reads / hits.length,
      falseCandidatesPerLookup: (hit.falseCandidates + miss.falseCandidates) / (hits.length + misses.length),
      hitRate: hit.hits / hits.length,
    });
    if (miss.hits !== 0) throw new Error(`${variant}: ${miss.hits} random pages found on disk`);
    await index.close();
  }
  return rows;
}

/** One column per variant (their figures are too many for one line each within REPORT_WIDTH), then a summary. */
function print(title: string, sizeBytes: number, rows: Row[]): void {
  console.log(`\n== ${title}`);
  const mbps = (ms: number) => sizeBytes / MIB / (ms / 1000);
  const figures: [string, (r: Row) => string][] = [
    ["build (ms)", (r) => r.buildMs.toFixed(0)],
    ["build (MiB/s)", (r) => mbps(r.buildMs).toFixed(0)],
    ["SHA-256 at build", (r) => String(r.buildHashes)],
    ["entries", (r) => String(r.entries)],
    ["bytes per entry", (r) => r.bytesPerEntry.toFixed(1)],
    ["hits/s", (r) => r.hitsPerS.toFixed(0)],
    ["misses/s", (r) => r.missesPerS.toFixed(0)],
    ["SHA-256 per hit", (r) => r.hashesPerHit.toFixed(2)],
    ["SHA-256 per miss", (r) => r.hashesPerMiss.toFixed(2)],
    ["reads per hit", (r) => r.readsPerHit.toFixed(2)],
    ["false cand./lookup", (r) => r.falseCandidatesPerLookup.toFixed(4)],
    ["hit rate (%)", (r) => (r.hitRate * 100).toFixed(2)],
  ];
  console.log(
    table(
      ["", ...rows.map((r) => r.variant)],
      figures.map(([name, show]) => [name, ...rows.map(show)]),
    ),
  );
  const lazy = rows.find((r) => r.variant === "sampled+lazy");
  const eager = rows.find((r) => r.variant === "sampled+eager");
  const none = rows.find((r) => r.variant === "unsampled");
  if (!lazy || !eager || !none) return;
  const summary =
    `sampling saves: build ${none.buildHashes} -> ${lazy.buildHashes} SHA-256 (all of them), build time ` +
    `x${(none.buildMs / lazy.buildMs).toFixed(2)} faster (lazy) / x${(none.buildMs / eager.buildMs).toFixed(2)} (eager); ` +
    `per miss ${none.hashesPerMiss.toFixed(2)} -> ${lazy.hashesPerMiss.toFixed(2)} SHA-256, misses/s ` +
    `x${(lazy.missesPerS / none.missesPerS).toFixed(1)} (lazy) / x${(eager.missesPerS / none.missesPerS).toFixed(1)} (eager); ` +
    `hits/s x${(lazy.hitsPerS / none.hitsPerS).toFixed(2)} (lazy, one 4 KiB read per hit) / ` +
    `x${(eager.hitsPerS / none.hitsPerS).toFixed(2)} (eager)`;
  console.log(wrap(summary, REPORT_WIDTH).join("\n"));
}

/** Pages of the lab's data files (what the guest's page cache holds after reading them). */
async function labFilePages(vmwork: string): Promise<Buffer[]> {
  const tmp = await mkdtemp(join(tmpdir(), "vmprune-bench-storage-"));
  try {
    const pages: Buffer[] = [];
    const files = dataFilePaths();
    const perFile = Math.ceil(LOOKUPS / files.length);
    for (const guestPath of files) {
      const file = join(tmp, basename(guestPath));
      await run(vmwork, ["gen", file, `${DATA_DISK_LAYOUT.fileSizeMiB}M`]);
      const content = await readFile(file);
      const count = content.length / PAGE_SIZE_BYTES;
      for (let i = 0; i < perFile; i++) {
        const page = Math.floor(Math.random() * count);
        pages.push(Buffer.from(content.subarray(page * PAGE_SIZE_BYTES, (page + 1) * PAGE_SIZE_BYTES)));
      }
      await rm(file);
    }
    return pages.slice(0, LOOKUPS);
  } finally {
    await rm(tmp, { recursive: true, force: true });
  }
}

/**
 * A synthetic raw image: 3/4 random 4 KiB blocks, 1/4 zero blocks in runs (unused space), and every 64th data
 * block a copy of an earlier one (duplicated files). Returns the path and pages of data blocks for the hits.
 */
async function syntheticImage(dir: string, sizeMiB: number): Promise<{ path: string; hits: Buffer[] }> {
  const path = join(dir, "synthetic.raw");
  const handle = await open(path, "w");
  const chunk = Buffer.alloc(64 * MIB);
  const blocksPerChunk = chunk.length / PAGE_SIZE_BYTES;
  const hits: Buffer[] = [];
  const totalBlocks = (sizeMiB * MIB) / PAGE_SIZE_BYTES;
  const hitEvery = Math.max(1, Math.floor(totalBlocks / LOOKUPS));
  try {
    for (let pos = 0; pos < sizeMiB * MIB; pos += chunk.length) {
      randomBytes(chunk.length).copy(chunk);
      for (let b = 0; b < blocksPerChunk; b++) {
        const at = b * PAGE_SIZE_BYTES;
        if (b % 16 >= 12) chunk.fill(0, at, at + PAGE_SIZE_BYTES);
        else if (b % 64 === 1) chunk.copy(chunk, at, 0, PAGE_SIZE_BYTES);
        else if (b % hitEvery === 0 || hits.length < LOOKUPS / 4)
          if (hits.length < LOOKUPS) hits.push(Buffer.from(chunk.subarray(at, at + PAGE_SIZE_BYTES)));
      }
      await handle.write(chunk, 0, Math.min(chunk.length, sizeMiB * MIB - pos), pos);
    }
  } finally {
    await handle.close();
  }
  return { path, hits };
}

/**
 * Data-file pages found, entries and build time when the lab disk is indexed at its 1 KiB block size ("auto") and
 * at 4 KiB. On this image (written once by mke2fs -d) every extent happens to keep physical = logical mod 4, so
 * 4 KiB finds as much; ext4 does not promise that for files the guest writes later, hence "auto".
 */
async function alignmentEffect(image: string, pages: Buffer[]): Promise<string> {
  const parts: string[] = [];
  for (const alignmentBytes of ["auto", 4096] as const) {
    const index = await DiskIndex.build(image, { alignmentBytes });
    const found = pages.filter((p) => index.lookup(p) !== null).length;
    parts.push(
      `${index.alignmentBytes}-byte: ${((found / pages.length) * 100).toFixed(2)}% found, ${index.entries} entries, ` +
        `${index.buildStats.buildMs.toFixed(0)} ms`,
    );
    await index.close();
  }
  return parts.join("; ");
}

requireSetup("bench:storage", { guests: ["6.1"] });
const misses = Array.from({ length: LOOKUPS }, () => randomBytes(PAGE_SIZE_BYTES));
const { dataDisk, programs } = await ensureGuestImage("6.1");
const labPages = await labFilePages(programs.vmwork);
const labSize = (await stat(dataDisk)).size;
console.log(
  `node ${process.version}; ${LOOKUPS} hit pages and ${LOOKUPS} random (miss) pages per image; ` +
    `${cpus().length} CPUs, load average ${loadavg()[0]?.toFixed(2)} at start (other work on the host skews times)`,
);
print(
  `lab data disk ${dataDisk} (${labSize / MIB} MiB ext4, 1 KiB blocks: every 1 KiB-aligned window; hits = pages of its data files)`,
  labSize,
  await measure(dataDisk, labPages, misses, "auto"),
);
console.log(`alignment (one build each): ${await alignmentEffect(dataDisk, labPages)}`);

const dir = await mkdtemp(join(tmpdir(), "vmprune-bench-storage-"));
try {
  const synthetic = await syntheticImage(dir, syntheticMiB);
  print(
    `synthetic ${syntheticMiB} MiB raw image (4 KiB alignment; 3/4 random blocks, 1/4 zero, 1/64 duplicates)`,
    syntheticMiB * MIB,
    await measure(synthetic.path, synthetic.hits, misses, 4096),
  );
} finally {
  await rm(dir, { recursive: true, force: true });
}
