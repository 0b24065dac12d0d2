/**
 * The disk index and block reader on synthetic raw images: every non-zero block is found (in each strategy),
 * zero blocks are not indexed, duplicates resolve to one of their copies, a page not on disk or one byte away from
 * a disk block is not found even when the sampled words agree, fingerprint collisions resolve to the right block,
 * 1 KiB-aligned pages are found at 1 KiB alignment, qcow2 is refused, truncated images and untrusted references
 * give typed errors.
 */
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { mkdtemp, rm, truncate, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { BlockReader } from "../../src/storage/block-reader.ts";
import { DiskIndex, type DiskIndexOptions } from "../../src/storage/disk-index.ts";
import { BlockReadError, IndexLimitError, UnsupportedImageFormatError } from "../../src/storage/errors.ts";
import { SAMPLE_OFFSETS_BYTES, sampledFingerprint, strongHash } from "../../src/storage/fingerprint.ts";
import { PAGE_SIZE_BYTES } from "../../src/storage/image-format.ts";

const PAGE = PAGE_SIZE_BYTES;

async function tempDir(t: { after: (fn: () => Promise<void>) => void }): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), "vmprune-storage-"));
  t.after(() => rm(dir, { recursive: true, force: true }));
  return dir;
}

function pageOf(image: Buffer, index: number): Buffer {
  return Buffer.from(image.subarray(index * PAGE, (index + 1) * PAGE));
}

/** A byte offset that no sampled word covers. */
function unsampledOffset(): number {
  for (let offset = 0; ; offset++)
    if (SAMPLE_OFFSETS_BYTES.every((s) => offset < s || offset >= s + 8)) return offset;
}

const MODES: [string, DiskIndexOptions][] = [
  ["sampled, strong hashes on lookup", { fingerprint: "sampled", strongHashes: "on-lookup" }],
  ["sampled, strong hashes at build", { fingerprint: "sampled", strongHashes: "at-build" }],
  ["strong hash as key (no sampling)", { fingerprint: "strong" }],
];

for (const [name, options] of MODES) {
  test(`${name}: random, duplicate and zero blocks; pages not on disk`, async (t) => {
    const dir = await tempDir(t);
    const blocks = 64;
    const image = randomBytes(blocks * PAGE);
    image.fill(0, 5 * PAGE, 8 * PAGE); // zero blocks 5, 6, 7
    pageOf(image, 3).copy(image, 40 * PAGE); // block 40 duplicates block 3
    pageOf(image, 3).copy(image, 41 * PAGE); // and so does 41
    const path = join(dir, "disk.raw");
    await writeFile(path, image);
    const index = await DiskIndex.build(path, { ...options, alignmentBytes: 4096, chunkBytes: 3 * PAGE });
    t.after(() => index.close());
    const reader = await BlockReader.open(path, { alignmentBytes: 4096 });
    t.after(() => reader.close());

    assert.equal(index.buildStats.zeroWindowsSkipped, 3);
    assert.equal(index.buildStats.windowsScanned, blocks);
    for (let b = 0; b < blocks; b++) {
      const page = pageOf(image, b);
      const ref = index.lookup(page);
      if (b >= 5 && b < 8) {
        assert.equal(ref, null, `zero block ${b} is not indexed`);
        continue;
      }
      assert.ok(ref, `block ${b} found`);
      if (b === 3 || b === 40 || b === 41) assert.ok([3, 40, 41].includes(ref.block), "a copy of block 3");
      else assert.equal(ref.block, b);
      assert.deepEqual(ref.hash, strongHash(page));
      const read = await reader.read(ref.block, ref.hash);
      assert.ok(read.ok, "the receiver rebuilds it");
      assert.deepEqual(read.page, page);
    }
    const stranger = randomBytes(PAGE);
    const before = { ...index.lookupStats };
    assert.equal(index.lookup(stranger), null, "a page not on disk");
    if (options.fingerprint === "sampled") {
      assert.equal(index.lookupStats.strongHashes, before.strongHashes, "a miss without candidates: no hash");
      assert.equal(index.lookupStats.missesWithoutCandidate, before.missesWithoutCandidate + 1);
    }

    // One byte away from block 9, outside every sampled word: same fingerprint, different content.
    const near = pageOf(image, 9);
    const offset = unsampledOffset();
    near[offset] = (near[offset] ?? 0) ^ 1;
    assert.deepEqual(
      sampledFingerprint(near, 0, { lo: 0, hi: 0 }),
      sampledFingerprint(image, 9 * PAGE, { lo: 0, hi: 0 }),
    );
    assert.equal(index.lookup(near), null, "one differing byte is not a match");
    assert.throws(() => index.lookup(Buffer.alloc(100)), /4096 bytes/);
  });
}

test("fingerprint collision: blocks agreeing on every sampled word resolve to the right one", async (t) => {
  const dir = await tempDir(t);
  const image = randomBytes(8 * PAGE);
  // Blocks 2, 5 and 6 share block 1's sampled words and differ elsewhere.
  for (const b of [2, 5, 6]) {
    const page = pageOf(image, 1);
    randomBytes(16).copy(page, unsampledOffset());
    page.copy(image, b * PAGE);
  }
  const path = join(dir, "disk.raw");
  await writeFile(path, image);
  for (const [name, options] of MODES) {
    const index = await DiskIndex.build(path, { ...options, alignmentBytes: 4096 });
    for (const b of [1, 2, 5, 6])
      assert.equal(index.lookup(pageOf(image, b))?.block, b, `${name}: block ${b}`);
    if (options.fingerprint === "sampled") assert.ok(index.lookupStats.falseCandidates > 0, name);
    await index.close();
  }
});

test("pages at 1 KiB offsets (ext4 with 1 KiB blocks): found at 1 KiB alignment, auto-detected", async (t) => {
  const dir = await tempDir(t);
  const image = Buffer.alloc(64 * PAGE);
  // A fake ext4 superblock: s_magic 0xEF53 at 1024 + 56, s_log_block_size 0 (1 KiB blocks) at 1024 + 24.
  image.writeUInt16LE(0xef53, 1024 + 56);
  const pages = [randomBytes(PAGE), randomBytes(PAGE), randomBytes(PAGE)];
  const offsets = [5 * 1024, 21 * 1024 + 4096, 63 * 1024];
  pages.forEach((p, i) => {
    p.copy(image, offsets[i]);
  });
  const path = join(dir, "ext4-1k.raw");
  await writeFile(path, image);

  const auto = await DiskIndex.build(path, { chunkBytes: PAGE + 1024 });
  t.after(() => auto.close());
  assert.equal(auto.alignmentBytes, 1024);
  assert.match(auto.alignmentSource, /block size 1024/);
  const reader = await BlockReader.open(path);
  t.after(() => reader.close());
  assert.equal(reader.alignmentBytes, 1024);
  pages.forEach((p, i) => {
    const ref = auto.lookup(p);
    assert.equal(ref?.block, (offsets[i] ?? 0) / 1024, `page ${i} at its 1 KiB block`);
    assert.ok(ref && reader.readSync(ref.block, ref.hash).ok);
  });
  // Every window was scanned, across chunk boundaries, and the same result as with one big chunk.
  assert.equal(auto.buildStats.windowsScanned, (image.length - PAGE) / 1024 + 1);
  const oneChunk = await DiskIndex.build(path, {});
  assert.equal(oneChunk.entries, auto.entries);
  await oneChunk.close();

  const aligned4k = await DiskIndex.build(path, { alignmentBytes: 4096 });
  assert.equal(aligned4k.lookup(pages[0] ?? Buffer.alloc(0)), null, "invisible at 4 KiB alignment");
  await aligned4k.close();
  await assert.rejects(DiskIndex.build(path, { alignmentBytes: 3000 }), /power of two/);
});

test("qcow2 (and other non-raw formats) are refused with a way out", async (t) => {
  const dir = await tempDir(t);
  const qcow2 = Buffer.alloc(8 * PAGE);
  Buffer.from([0x51, 0x46, 0x49, 0xfb, 0, 0, 0, 3]).copy(qcow2); // "QFI\xfb", version 3
  const path = join(dir, "disk.qcow2");
  await writeFile(path, qcow2);
  for (const open of [() => DiskIndex.build(path), () => BlockReader.open(path)])
    await assert.rejects(open(), (error: unknown) => {
      assert.ok(error instanceof UnsupportedImageFormatError);
      assert.equal(error.format, "qcow2");
      assert.match(
        error.message,
        /qcow2 image.*raw disk images only.*not at fixed offsets.*qemu-img convert/s,
      );
      return true;
    });
  await assert.rejects(DiskIndex.build(join(dir, "missing.raw")), /cannot open the disk image/);
});

test("truncated images: a partial last block is not indexed, reads beyond the end are typed errors", async (t) => {
  const dir = await tempDir(t);
  const image = randomBytes(5 * PAGE + 1000);
  const path = join(dir, "short.raw");
  await writeFile(path, image);
  const index = await DiskIndex.build(path, { alignmentBytes: 4096 });
  t.after(() => index.close());
  assert.equal(index.entries, 5);
  assert.equal(index.sizeBytes, image.length);
  const tail = Buffer.alloc(PAGE);
  image.copy(tail, 0, 5 * PAGE);
  assert.equal(index.lookup(tail), null);
  const reader = await BlockReader.open(path, { alignmentBytes: 4096 });
  t.after(() => reader.close());
  const beyond = reader.readSync(5, strongHash(tail));
  assert.equal(beyond.ok, false);
  assert.equal(!beyond.ok && beyond.error.code, "out-of-range");

  // The image shrinks after the index and the reader were opened: misses and short reads, no crash.
  const block3 = pageOf(image, 3);
  await truncate(path, 2 * PAGE);
  assert.equal(index.lookup(block3), null);
  assert.equal(index.lookupStats.readFailures, 1);
  const short = await reader.read(3, strongHash(block3));
  assert.equal(!short.ok && short.error.code, "short-read");

  // An image smaller than one page indexes nothing.
  const tiny = join(dir, "tiny.raw");
  await writeFile(tiny, randomBytes(100));
  const empty = await DiskIndex.build(tiny);
  assert.equal(empty.entries, 0);
  assert.equal(empty.lookup(randomBytes(PAGE)), null);
  await empty.close();
});

test("block reader: untrusted references come back as typed errors", async (t) => {
  const dir = await tempDir(t);
  const image = randomBytes(4 * PAGE);
  const path = join(dir, "disk.raw");
  await writeFile(path, image);
  const reader = await BlockReader.open(path, { alignmentBytes: 4096 });
  t.after(() => reader.close());
  const good = strongHash(pageOf(image, 2));
  const cases: [number, Uint8Array, string][] = [
    [-1, good, "invalid-block"],
    [1.5, good, "invalid-block"],
    [Number.NaN, good, "invalid-block"],
    [2 ** 60, good, "invalid-block"],
    [4, good, "out-of-range"],
    [2 ** 40, good, "out-of-range"],
    [2, good.subarray(0, 31), "invalid-hash-length"],
    [2, Buffer.alloc(0), "invalid-hash-length"],
    [2, Buffer.concat([good, Buffer.alloc(1)]), "invalid-hash-length"],
    [1, good, "hash-mismatch"],
  ];
  for (const [block, hash, code] of cases) {
    for (const result of [reader.readSync(block, hash), await reader.read(block, hash)]) {
      assert.equal(result.ok, false, `block ${block}`);
      if (!result.ok) {
        assert.ok(result.error instanceof BlockReadError);
        assert.equal(result.error.code, code, `block ${block}: ${result.error.message}`);
        assert.match(result.error.message, /NACK/);
      }
    }
  }
  const into = Buffer.alloc(PAGE);
  const ok = await reader.read(2, good, into);
  assert.ok(ok.ok && ok.page === into);
  assert.deepEqual(into, pageOf(image, 2));
});

test("bounds: candidates per fingerprint are capped, the entry bound fails the build clearly", async (t) => {
  const dir = await tempDir(t);
  const image = Buffer.alloc(32 * PAGE);
  const same = randomBytes(PAGE);
  for (let b = 0; b < 20; b++) same.copy(image, b * PAGE);
  for (let b = 20; b < 32; b++) randomBytes(PAGE).copy(image, b * PAGE);
  const path = join(dir, "dups.raw");
  await writeFile(path, image);
  const index = await DiskIndex.build(path, { alignmentBytes: 4096, maxCandidatesPerFingerprint: 4 });
  t.after(() => index.close());
  assert.equal(index.entries, 4 + 12);
  assert.equal(index.buildStats.droppedOverCap, 16);
  assert.equal(index.lookup(same)?.block, 0, "the first copy");
  const atBuild = await DiskIndex.build(path, { alignmentBytes: 4096, strongHashes: "at-build" });
  assert.equal(atBuild.entries, 1 + 12, "identical content is indexed once when hashes are known");
  assert.equal(atBuild.buildStats.duplicatesSkipped, 19);
  await atBuild.close();
  await assert.rejects(DiskIndex.build(path, { alignmentBytes: 4096, maxEntries: 8 }), (error: unknown) => {
    assert.ok(error instanceof IndexLimitError);
    assert.match(error.message, /bound of 8 entries.*raise maxEntries/);
    return true;
  });
});

test("trustLoneCandidate: a lone candidate comes back unread (the receiver verifies), several are read", async (t) => {
  const dir = await tempDir(t);
  const image = randomBytes(8 * PAGE);
  // Block 5 shares block 4's sampled words and differs elsewhere: two candidates for that fingerprint.
  const twin = pageOf(image, 4);
  randomBytes(16).copy(twin, unsampledOffset());
  twin.copy(image, 5 * PAGE);
  const path = join(dir, "disk.raw");
  await writeFile(path, image);
  const trusting = await DiskIndex.build(path, { alignmentBytes: 4096, trustLoneCandidate: true });
  t.after(() => trusting.close());
  const reading = await DiskIndex.build(path, { alignmentBytes: 4096 });
  t.after(() => reading.close());

  const found = trusting.lookup(pageOf(image, 1));
  assert.equal(found?.block, 1);
  assert.deepEqual(found?.hash, strongHash(pageOf(image, 1)), "the REF hash is the page's");
  assert.equal(trusting.lookupStats.blockReads, 0, "no read for a lone candidate");
  assert.equal(trusting.lookupStats.unreadHits, 1);

  // A page whose sampled words match block 2 but whose other bytes differ (the guest's copy changed, or a
  // collision): trusted unread, with the page's own hash, which the block will not match at the receiver.
  const changed = pageOf(image, 2);
  randomBytes(16).copy(changed, unsampledOffset());
  const trusted = trusting.lookup(changed);
  assert.equal(trusted?.block, 2);
  assert.notDeepEqual(trusted?.hash, strongHash(pageOf(image, 2)), "the receiver's check will fail: NACK");
  assert.equal(reading.lookup(changed), null, "reading the block rejects it");

  // Two candidates: told apart by reading, as without the option.
  assert.equal(trusting.lookup(pageOf(image, 5))?.block, 5);
  assert.equal(trusting.lookup(pageOf(image, 4))?.block, 4);
  assert.ok(trusting.lookupStats.blockReads >= 2, `${trusting.lookupStats.blockReads} reads`);
  assert.equal(trusting.lookupStats.unreadHits, 2);
});
