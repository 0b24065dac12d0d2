/**
 * The mixed workload scaled to larger guests (bench:scale): the same shares of anonymous, tmpfs, churned and
 * cached memory, a data disk that holds the larger files, and a clear refusal for sizes it cannot scale to.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { dataFilePaths } from "../../src/lab/data-disk.ts";
import { ANON_512M, MIXED_512M, scaleWorkload } from "../../src/lab/workloads.ts";

test("an 8 GiB guest gets every amount of the 512 MiB mixed workload times 16, its files as many and 16 times larger", () => {
  const scaled = scaleWorkload(MIXED_512M, 8192);
  assert.equal(scaled.factor, 16);
  assert.deepEqual(scaled.sizes, {
    ...MIXED_512M,
    anon: "1024M",
    tmpfs: "512M",
    churn: "2560M",
    dirtyFiles: { size: "64M", count: 4 },
  });
  assert.equal(scaled.layout.fileCount, MIXED_512M.cacheFiles + MIXED_512M.mappedFiles);
  assert.equal(scaled.layout.fileSizeMiB, 256);
  // Room for the files (2 GiB) and the dirty files (256 MiB), and some.
  assert.ok(scaled.layout.imageSizeMiB >= 2048 + 256, `${scaled.layout.imageSizeMiB} MiB`);
  assert.equal(dataFilePaths(scaled.layout).length, 8);
});

test("512 MiB scales to itself, and a workload without files still gets a data disk", () => {
  const same = scaleWorkload(MIXED_512M, 512);
  assert.equal(same.factor, 1);
  assert.equal(same.sizes.anon, MIXED_512M.anon);
  assert.equal(same.sizes.churn, MIXED_512M.churn);
  const anon = scaleWorkload(ANON_512M, 2048);
  assert.equal(anon.sizes.anon, "1280M");
  assert.equal(anon.layout.fileCount, 1);
});

test("a guest that is not a whole multiple of 512 MiB is refused with the reason", () => {
  assert.throws(() => scaleWorkload(MIXED_512M, 768), /multiple of 512 MiB, not 768 MiB/);
  assert.throws(() => scaleWorkload(MIXED_512M, 256), /multiple of 512 MiB/);
});
