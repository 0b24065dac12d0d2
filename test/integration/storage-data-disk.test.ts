/**
 * The disk index on the lab's real ext4 data disk (no VM): every 4 KiB page of every data file, as the guest's
 * page cache would hold it, is found at the offset where ext4 put it, and the receiver's block reader rebuilds it;
 * random pages are not found.
 *
 * The file contents come from the lab's own generator (`vmwork gen`, seeded by the file's name, as
 * src/lab/data-disk.ts writes them); where ext4 stored each file comes from its extent tree (`debugfs -R ex`).
 * The lab disk is below 512 MiB, so mke2fs gives it 1 KiB blocks: pages may start at any 1 KiB boundary (the
 * index uses the block size as its alignment), and a page whose four blocks span two extents is in no contiguous
 * window of the image, so it must not be found.
 */
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { basename, join } from "node:path";
import { test } from "node:test";
import { DATA_DISK_LAYOUT, dataFilePaths } from "../../src/lab/data-disk.ts";
import { run } from "../../src/lab/exec.ts";
import { ensureGuestImage } from "../../src/lab/guest-image.ts";
import { BlockReader } from "../../src/storage/block-reader.ts";
import { DiskIndex } from "../../src/storage/disk-index.ts";
import { PAGE_SIZE_BYTES } from "../../src/storage/image-format.ts";

interface Extent {
  logicalStart: number;
  logicalEnd: number;
  physicalStart: number;
}

/** Leaf extents of a file in an ext4 image, in filesystem blocks. */
async function extents(image: string, pathInImage: string): Promise<Extent[]> {
  const out = await run("debugfs", ["-R", `ex ${pathInImage}`, image]);
  const result: Extent[] = [];
  // " 0/ 0   1/  3     0 -   204   7988 -   8192    205 ": level, entry, logical range, physical range, length.
  // Index nodes (depth > 0) have a single physical block and do not match.
  for (const line of out.split("\n")) {
    const m = /^\s*\d+\/\s*\d+\s+\d+\/\s*\d+\s+(\d+)\s*-\s*(\d+)\s+(\d+)\s*-\s*\d+\s+\d+/.exec(line);
    if (m) result.push({ logicalStart: Number(m[1]), logicalEnd: Number(m[2]), physicalStart: Number(m[3]) });
  }
  return result;
}

test("disk index of the lab data disk: every data-file page on disk is found, random pages are not", async (t) => {
  // The data disk does not depend on the kernel; any kernel id ensures it.
  const { dataDisk: image, programs } = await ensureGuestImage("6.1");
  const dumpe2fs = await run("dumpe2fs", ["-h", image]);
  const blockSize = Number(/^Block size:\s+(\d+)/m.exec(dumpe2fs)?.[1]);

  const index = await DiskIndex.build(image);
  t.after(() => index.close());
  assert.equal(index.alignmentBytes, Math.min(blockSize, PAGE_SIZE_BYTES), index.alignmentSource);
  const reader = await BlockReader.open(image);
  t.after(() => reader.close());
  assert.equal(reader.alignmentBytes, index.alignmentBytes);

  const tmp = await mkdtemp(join(tmpdir(), "vmprune-storage-disk-"));
  t.after(() => rm(tmp, { recursive: true, force: true }));
  const blocksPerPage = PAGE_SIZE_BYTES / blockSize;
  let found = 0;
  let split = 0;
  let aligned4k = 0;
  for (const guestPath of dataFilePaths()) {
    // The generator seeds by basename: a copy with the same name has the same bytes as the file on the disk.
    const expected = join(tmp, basename(guestPath));
    await run(programs.vmwork, ["gen", expected, `${DATA_DISK_LAYOUT.fileSizeMiB}M`]);
    const content = await readFile(expected);
    const map = await extents(image, guestPath.replace(/^\/data/, ""));
    assert.ok(map.length > 0, `${guestPath} has extents`);
    for (let page = 0; page * PAGE_SIZE_BYTES < content.length; page++) {
      const bytes = content.subarray(page * PAGE_SIZE_BYTES, (page + 1) * PAGE_SIZE_BYTES);
      const first = page * blocksPerPage;
      const last = first + blocksPerPage - 1;
      const extent = map.find((e) => e.logicalStart <= first && first <= e.logicalEnd);
      assert.ok(extent, `${guestPath} page ${page} is mapped`);
      const ref = index.lookup(bytes);
      if (last > extent.logicalEnd) {
        split++;
        assert.equal(ref, null, `${guestPath} page ${page} spans two extents: in no window of the image`);
        continue;
      }
      const offset = (extent.physicalStart + (first - extent.logicalStart)) * blockSize;
      assert.ok(ref, `${guestPath} page ${page} (image offset ${offset}) found`);
      assert.equal(index.offsetOf(ref.block), offset, `${guestPath} page ${page} at the offset ext4 gave it`);
      const rebuilt = reader.readSync(ref.block, ref.hash);
      assert.ok(rebuilt.ok && rebuilt.page.equals(bytes), `${guestPath} page ${page} rebuilt`);
      found++;
      if (offset % PAGE_SIZE_BYTES === 0) aligned4k++;
    }
    await rm(expected);
  }
  const pages = (DATA_DISK_LAYOUT.fileCount * DATA_DISK_LAYOUT.fileSizeMiB * 1024 * 1024) / PAGE_SIZE_BYTES;
  assert.equal(found + split, pages);
  assert.ok(split < pages / 100, `only pages across extent boundaries are missed (${split} of ${pages})`);
  t.diagnostic(
    `${index.path}: ${index.entries} windows indexed at ${index.alignmentBytes}-byte alignment in ` +
      `${index.buildStats.buildMs.toFixed(0)} ms; ${found} of ${pages} data-file pages found (${aligned4k} of them 4 KiB-aligned), ${split} span extents`,
  );

  const misses = index.lookupStats.missesWithoutCandidate;
  for (let i = 0; i < 2000; i++) assert.equal(index.lookup(randomBytes(PAGE_SIZE_BYTES)), null);
  assert.ok(index.lookupStats.missesWithoutCandidate - misses >= 1990, "random pages rarely even collide");
});
