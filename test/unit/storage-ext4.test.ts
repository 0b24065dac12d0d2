/**
 * ext4 on disk against e2fsprogs: on real images made by mkfs.ext4 (4 KiB and 1 KiB blocks, a fragmented file
 * whose extent tree has depth >= 1, an unwritten fallocated extent, a block-mapped ext2 file), the extent walk
 * gives debugfs's `bmap` answer for every block of every file; the filesystem probe finds filesystems on whole
 * disks and in MBR (primary and logical) and GPT partitions with the UUID mkfs was given; garbage trees give
 * reasons, never exceptions or endless walks.
 */
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { mkdtemp, open, rm, truncate } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { run } from "../../src/lab/exec.ts";
import { type BlockDevice, RawFileDevice } from "../../src/storage/block-device.ts";
import {
  type BlockMapping,
  EXT4_EXT_MAGIC,
  type ExtentNode,
  mapBlockMapped,
  mapLogicalBlock,
  parseExt4Superblock,
  parseExtentNode,
} from "../../src/storage/ext4.ts";
import { probeFilesystems } from "../../src/storage/filesystem-probe.ts";
import { bmap, extentTreeDepth, iBlock, makeFragmentedExt4 } from "../support/ext4-images.ts";

async function tempDir(t: { after: (fn: () => Promise<void>) => void }): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), "vmprune-ext4-"));
  t.after(() => rm(dir, { recursive: true, force: true }));
  return dir;
}

/** Maps a logical block the way the locator does, reading deeper nodes from the device synchronously. */
function walk(device: BlockDevice, root: Buffer, blockSize: number, blocksCount: number, lblk: number) {
  const readSync = device.readSync?.bind(device);
  assert.ok(readSync);
  return mapLogicalBlock(parseExtentNode(root, blocksCount), lblk, (pblk, depth) =>
    parseExtentNode(readSync(pblk * blockSize, blockSize), blocksCount, depth),
  );
}

for (const blockSize of [4096, 1024]) {
  test(`extent walk = debugfs bmap for every block (${blockSize}-byte blocks, depth >= 1, unwritten)`, async (t) => {
    const dir = await tempDir(t);
    const { image, files } = await makeFragmentedExt4(dir, "frag.img", { blockSize, sizeMiB: 16 });
    const device = await RawFileDevice.open(image);
    t.after(() => device.close());
    const sb = parseExt4Superblock(await device.read(1024, 1024));
    assert.ok(sb);
    assert.equal(sb.blockSize, blockSize);
    assert.ok((await extentTreeDepth(image, "big")) >= 1, "the fragmented file has an index level");
    let mapped = 0;
    let unwritten = 0;
    let holes = 0;
    for (const [name, bytes] of files) {
      const blocks = Math.ceil(bytes.length / blockSize) + (name === "falloc" ? 45 : 2);
      const oracle = await bmap(image, name, blocks);
      const root = await iBlock(image, name);
      for (let lblk = 0; lblk < blocks; lblk++) {
        const want = oracle[lblk];
        assert.ok(want);
        const got = walk(device, root, blockSize, sb.blocksCount, lblk);
        const where = `${name} block ${lblk}`;
        if (want.physical === 0) {
          assert.deepEqual(got, { kind: "hole" }, where);
          holes++;
        } else if (want.unwritten) {
          assert.deepEqual(got, { kind: "unwritten" }, where);
          unwritten++;
        } else {
          assert.equal(got.kind, "mapped", where);
          assert.equal((got as { physicalBlock: number }).physicalBlock, want.physical, where);
          mapped++;
          // The bytes at the mapped block are the file's.
          const onDisk = await device.read(want.physical * blockSize, blockSize);
          const expected = Buffer.alloc(blockSize);
          bytes.copy(expected, 0, lblk * blockSize, Math.min(bytes.length, (lblk + 1) * blockSize));
          assert.ok(onDisk.equals(expected), `${where}: disk bytes are the file's`);
        }
      }
    }
    assert.ok(
      mapped > 150 && unwritten >= 35 && holes > 0,
      `${mapped} mapped, ${unwritten} unwritten, ${holes} holes`,
    );
  });
}

test("block-mapped (ext2) inode: direct, indirect and double-indirect blocks = debugfs bmap", async (t) => {
  const dir = await tempDir(t);
  const { image, files } = await makeFragmentedExt4(dir, "ext2.img", {
    blockSize: 1024,
    sizeMiB: 8,
    mkfs: "mkfs.ext2",
    bigBlocks: 400,
  });
  const device = await RawFileDevice.open(image);
  t.after(() => device.close());
  const sb = parseExt4Superblock(await device.read(1024, 1024));
  assert.ok(sb);
  const bytes = files.get("big");
  assert.ok(bytes);
  const blocks = Math.ceil(bytes.length / 1024);
  assert.ok(blocks > 12 + 256, "reaches the double-indirect block");
  const oracle = await bmap(image, "big", blocks);
  const root = await iBlock(image, "big");
  assert.notEqual(root.readUInt16LE(0), EXT4_EXT_MAGIC, "not an extent inode");
  for (let lblk = 0; lblk < blocks; lblk++) {
    const got = mapBlockMapped(root, lblk, 1024, sb.blocksCount, (p) => device.readSync?.(p * 1024, 1024));
    assert.deepEqual(got, { kind: "mapped", physicalBlock: oracle[lblk]?.physical, run: 1 }, `block ${lblk}`);
  }
});

test("filesystem probe: whole disk, MBR primary and logical, GPT; UUIDs as mkfs set them", async (t) => {
  const dir = await tempDir(t);
  const MiB = 1024 * 1024;
  const uuids = ["0f0e0d0c-0b0a-4908-8706-050403020100", "11111111-2222-4333-8444-555555555555"];
  const hex = (u: string) => u.replaceAll("-", "");

  // Whole disk.
  const whole = join(dir, "whole.img");
  await run("mkfs.ext4", ["-q", "-F", "-U", uuids[0] ?? "", whole, "8M"]);
  const wholeDev = await RawFileDevice.open(whole);
  t.after(() => wholeDev.close());
  assert.deepEqual(
    (await probeFilesystems(wholeDev)).map((f) => [f.uuid, f.byteOffset, f.blockSize, f.where]),
    [[hex(uuids[0] ?? ""), 0, 1024, "whole disk"]],
  );

  // MBR: a primary partition at 1 MiB, an extended one at 20 MiB with one logical partition 1 MiB into it.
  const mbrImage = join(dir, "mbr.img");
  await truncate(mbrImage, 40 * MiB).catch(async () => {
    await (await open(mbrImage, "w")).close();
    await truncate(mbrImage, 40 * MiB);
  });
  await mkfsAt(mbrImage, 1 * MiB, 8 * MiB, uuids[0] ?? "", 4096);
  await mkfsAt(mbrImage, 21 * MiB, 8 * MiB, uuids[1] ?? "", 1024);
  const mbr = Buffer.alloc(512);
  mbrEntry(mbr, 0, 0x83, 1 * MiB, 8 * MiB);
  mbrEntry(mbr, 1, 0x05, 20 * MiB, 19 * MiB);
  mbr.writeUInt16LE(0xaa55, 510);
  const ebr = Buffer.alloc(512);
  mbrEntry(ebr, 0, 0x83, 1 * MiB, 8 * MiB); // relative to this EBR
  ebr.writeUInt16LE(0xaa55, 510);
  await writeAt(mbrImage, 0, mbr);
  await writeAt(mbrImage, 20 * MiB, ebr);
  const mbrDev = await RawFileDevice.open(mbrImage);
  t.after(() => mbrDev.close());
  assert.deepEqual(
    (await probeFilesystems(mbrDev)).map((f) => [f.uuid, f.byteOffset, f.blockSize, f.where]),
    [
      [hex(uuids[0] ?? ""), 1 * MiB, 4096, "MBR partition 1"],
      [hex(uuids[1] ?? ""), 21 * MiB, 1024, "MBR logical partition 5"],
    ],
  );

  // GPT: protective MBR, header at LBA 1, entries at LBA 2, one partition at 2 MiB.
  const gptImage = join(dir, "gpt.img");
  await (await open(gptImage, "w")).close();
  await truncate(gptImage, 16 * MiB);
  await mkfsAt(gptImage, 2 * MiB, 8 * MiB, uuids[1] ?? "", 4096);
  const protective = Buffer.alloc(512);
  mbrEntry(protective, 0, 0xee, 512, 16 * MiB - 512);
  protective.writeUInt16LE(0xaa55, 510);
  const header = Buffer.alloc(512);
  header.write("EFI PART", 0, "latin1");
  header.writeBigUInt64LE(2n, 72);
  header.writeUInt32LE(128, 80);
  header.writeUInt32LE(128, 84);
  const entries = Buffer.alloc(128 * 128);
  randomBytes(16).copy(entries, 128 * 3); // type GUID of entry 4
  entries.writeBigUInt64LE(BigInt((2 * MiB) / 512), 128 * 3 + 32);
  entries.writeBigUInt64LE(BigInt((10 * MiB) / 512 - 1), 128 * 3 + 40);
  await writeAt(gptImage, 0, protective);
  await writeAt(gptImage, 512, header);
  await writeAt(gptImage, 1024, entries);
  const gptDev = await RawFileDevice.open(gptImage);
  t.after(() => gptDev.close());
  assert.deepEqual(
    (await probeFilesystems(gptDev)).map((f) => [f.uuid, f.byteOffset, f.where]),
    [[hex(uuids[1] ?? ""), 2 * MiB, "GPT partition 4"]],
  );

  // Garbage: random bytes with an MBR signature and a self-referencing extended partition.
  const junk = join(dir, "junk.img");
  const bytes = randomBytes(4 * MiB);
  bytes.fill(0, 446, 510);
  mbrEntry(bytes, 0, 0x05, 0, 4 * MiB);
  bytes.writeUInt16LE(0xaa55, 510);
  await writeAt(junk, 0, bytes);
  const junkDev = await RawFileDevice.open(junk);
  t.after(() => junkDev.close());
  assert.deepEqual(await probeFilesystems(junkDev), []);
});

test("garbage extent trees give reasons: wrong magic, too many entries, loops, wrong depth, random bytes", () => {
  const blocksCount = 1000;
  const node = (entries: number, max: number, depth: number, body: (b: Buffer) => void = () => {}) => {
    const b = Buffer.alloc(60);
    b.writeUInt16LE(EXT4_EXT_MAGIC, 0);
    b.writeUInt16LE(entries, 2);
    b.writeUInt16LE(max, 4);
    b.writeUInt16LE(depth, 6);
    body(b);
    return b;
  };
  const corrupt = (m: BlockMapping) => m.kind === "corrupt";
  const none = () => undefined;
  const wrongMagic = node(1, 4, 0);
  wrongMagic.writeUInt16LE(0x1234, 0);
  assert.ok(corrupt(mapLogicalBlock(parseExtentNode(wrongMagic, blocksCount), 0, none)));
  assert.ok(corrupt(mapLogicalBlock(parseExtentNode(node(5, 4, 0), blocksCount), 0, none)), "entries > max");
  assert.ok(corrupt(mapLogicalBlock(parseExtentNode(node(1, 9, 0), blocksCount), 0, none)), "max > room");
  const outside = node(1, 4, 0, (b) => {
    b.writeUInt32LE(0, 12);
    b.writeUInt16LE(8, 16);
    b.writeUInt32LE(999, 20);
  });
  assert.ok(corrupt(mapLogicalBlock(parseExtentNode(outside, blocksCount), 0, none)), "extent past the end");
  const unsorted = node(2, 4, 0, (b) => {
    b.writeUInt32LE(10, 12);
    b.writeUInt16LE(5, 16);
    b.writeUInt32LE(100, 20);
    b.writeUInt32LE(12, 24);
    b.writeUInt16LE(5, 28);
    b.writeUInt32LE(200, 32);
  });
  assert.ok(
    corrupt(mapLogicalBlock(parseExtentNode(unsorted, blocksCount), 11, none)),
    "overlapping extents",
  );
  // An index node whose child is itself: the child is read as depth 0 but says depth 1.
  const loop = node(1, 4, 1, (b) => {
    b.writeUInt32LE(0, 12);
    b.writeUInt32LE(7, 16);
  });
  const selfLoop = mapLogicalBlock(parseExtentNode(loop, blocksCount), 3, (pblk, depth) => {
    assert.equal(pblk, 7);
    return parseExtentNode(loop, blocksCount, depth);
  });
  assert.ok(corrupt(selfLoop), JSON.stringify(selfLoop));
  // Depths that claim to descend forever are bounded by EXT4_MAX_EXTENT_DEPTH.
  assert.ok(corrupt(mapLogicalBlock(parseExtentNode(node(1, 4, 9), blocksCount), 0, none)));
  let calls = 0;
  for (let i = 0; i < 2000; i++) {
    const random = randomBytes(60);
    if (i % 2 === 0) random.writeUInt16LE(EXT4_EXT_MAGIC, 0);
    const result = mapLogicalBlock(parseExtentNode(random, blocksCount), i, (_p, depth) => {
      calls++;
      return parseExtentNode(randomBytes(1024), blocksCount, depth);
    });
    if (result.kind === "mapped") {
      const parsed = parseExtentNode(random, blocksCount) as ExtentNode;
      assert.ok("extents" in parsed, "a random node that maps was a valid leaf");
    }
  }
  assert.ok(calls < 2000 * 6);
  // Block-mapped garbage: pointers outside the filesystem are reasons too.
  const ind = Buffer.alloc(60, 0xff);
  assert.ok(corrupt(mapBlockMapped(ind, 20, 1024, blocksCount, () => randomBytes(1024))));
});

function mbrEntry(sector: Buffer, index: number, type: number, startBytes: number, sizeBytes: number): void {
  const at = 446 + index * 16;
  sector[at + 4] = type;
  sector.writeUInt32LE(startBytes / 512, at + 8);
  sector.writeUInt32LE(sizeBytes / 512, at + 12);
}

async function writeAt(path: string, offset: number, bytes: Buffer): Promise<void> {
  const handle = await open(path, "a+").then(async (h) => {
    await h.close();
    return open(path, "r+");
  });
  await handle.write(bytes, 0, bytes.length, offset);
  await handle.close();
}

async function mkfsAt(image: string, offset: number, size: number, uuid: string, blockSize: number) {
  await run("mkfs.ext4", [
    "-q",
    "-F",
    "-U",
    uuid,
    "-b",
    String(blockSize),
    "-E",
    `offset=${offset}`,
    image,
    `${size / 1024}k`,
  ]);
}
