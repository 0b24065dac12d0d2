/**
 * send's cache references without a locator (a guest without BTF, or disks it cannot reach): the content index of a
 * real raw image answers, and what nothing can place is counted, never referenced.
 */
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { ALL_REFS } from "../../src/prune/pruning-processor.ts";
import { CacheReferences } from "../../src/storage/cache-references.ts";
import { DiskIndex } from "../../src/storage/disk-index.ts";
import { strongHash } from "../../src/storage/fingerprint.ts";
import { tempDir } from "../support/fake-peers.ts";

const PAGE = 4096;

test("without a locator: the content index places pages of its image; the rest, and a receiver taking no index references, go whole and are counted", async (t) => {
  const image = randomBytes(64 * PAGE);
  const path = join(tempDir(t), "disk.img");
  writeFileSync(path, image);
  const index = await DiskIndex.build(path, { alignmentBytes: PAGE });
  t.after(() => index.close());
  const refs = new CacheReferences({ index });
  const onDisk = image.subarray(5 * PAGE, 6 * PAGE);
  const found = refs.lookup(onDisk, 1234, ALL_REFS);
  assert.ok(found && found.target.kind === "index", JSON.stringify(found));
  assert.equal(index.offsetOf(found.target.kind === "index" ? found.target.block : -1), 5 * PAGE);
  assert.ok(found.hash.equals(strongHash(onDisk)));
  assert.equal(refs.lookup(randomBytes(PAGE), 1234, ALL_REFS), null, "a page not on the disk");
  assert.equal(refs.lookup(onDisk, 1234, { index: false, filesystem: true }), null, "receive takes no REF");
  const stats = refs.stats();
  assert.deepEqual(
    {
      located: stats.located,
      indexHits: stats.indexHits,
      notFound: stats.notFound,
      notAccepted: stats.notAccepted,
    },
    { located: 0, indexHits: 1, notFound: 1, notAccepted: 1 },
  );

  const nothing = new CacheReferences({});
  assert.equal(nothing.lookup(onDisk, 1234, ALL_REFS), null, "no source: the page goes whole");
  assert.equal(nothing.stats().notFound, 1);
});
