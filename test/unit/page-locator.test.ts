/**
 * The page locator over a synthetic guest (src/introspect/synthetic-guest.ts: real page tables, VMCOREINFO and
 * memmap in a buffer) whose page cache holds files of real ext4 images made by mkfs.ext4/debugfs. The guest's
 * objects (address_space, inode, ext4_inode_info, super_block, file_system_type, bdev_inode) are written at
 * offsets a TableTypes says, as a kernel's BTF would; each file page's RAM holds the file's bytes and its extent
 * root is the on-disk inode's i_block (debugfs inode_dump). Checked:
 *
 * - every located page equals the disk at the offset (4 KiB blocks: all full pages of a depth >= 1 file; 1 KiB
 *   blocks: the pages whose four blocks are contiguous, the others "blocks-not-contiguous");
 * - a large folio's tail is located at head index + its place; the bdev page of a known block device too;
 * - each refusal has its reason: past EOF, hole, unwritten, dirty/writeback/locked, shmem, anonymous, encrypted,
 *   inline data, data=journal (inode flag and mount option), not regular, not on a probed disk, ambiguous UUID,
 *   bdev with buffers or unknown, corrupt extent root, pointers to nowhere, inodes that do not own the mapping;
 * - a device without readSync: "extent-index-pending" first, located after the reads;
 * - random struct pages and random inodes never throw.
 */
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { bufferMemory } from "../../src/introspect/guest-memory.ts";
import { openGuestKernel } from "../../src/introspect/kernel.ts";
import { resolveKernelLayout } from "../../src/introspect/kernel-layout.ts";
import { buildSyntheticKernel, STRUCT_PAGE } from "../../src/introspect/synthetic-guest.ts";
import { type BlockDevice, RawFileDevice } from "../../src/storage/block-device.ts";
import { INODE_FLAG } from "../../src/storage/ext4.ts";
import { type LocateResult, PageLocator } from "../../src/storage/page-locator.ts";
import { bmap, iBlock, makeFragmentedExt4 } from "../support/ext4-images.ts";
import { PAGEFLAGS_61, TableTypes } from "../support/kernel-facts.ts";

const PAGE = 4096;
const MiB = 1024 * 1024;
/** Where this test's kernel objects live (physical), and the first PFN used as page cache. */
const OBJECTS_PA = 16 * MiB;
const FIRST_CACHE_PFN = (20 * MiB) / PAGE;

/** The offsets this guest's "BTF" gives (chosen freely; the locator must only use these). */
const AT = {
  page: { index: 32 },
  inode: { i_mode: 0, i_sb: 40, i_mapping: 48, i_ino: 64, i_size: 80, i_data: 200 },
  super_block: { s_blocksize_bits: 20, s_type: 40, s_bdev: 56, s_fs_info: 64, s_uuid: 100 },
  ext4_inode_info: { i_data: 8, i_flags: 72, i_es_tree: 96, vfs_inode: 128 },
  extent_status: { rb_node: 0, es_lblk: 24, es_len: 28, es_pblk: 32 },
  bdev_inode: { bdev: 0, vfs_inode: 256 },
} as const;
const TYPES = new TableTypes({
  structs: {
    page: {
      size: 64,
      members: {
        flags: 0,
        compound_head: 8,
        mapping: 24,
        index: AT.page.index,
        private: 40,
        _mapcount: 48,
        _refcount: 52,
        compound_dtor: 16,
        compound_order: 17,
        compound_mapcount: 20,
      },
    },
    zone: { members: {}, arrays: { free_area: 11 } },
    address_space: { members: { host: 0 } },
    inode: { members: AT.inode },
    super_block: { members: AT.super_block },
    file_system_type: { members: { name: 0 } },
    ext4_inode_info: { members: AT.ext4_inode_info },
    ext4_sb_info: { members: { s_mount_opt: 0 } },
    bdev_inode: { members: AT.bdev_inode },
    ext4_es_tree: { members: { root: 0 } },
    rb_root: { members: { rb_node: 0 } },
    rb_node: { members: { __rb_parent_color: 0, rb_right: 8, rb_left: 16 } },
    extent_status: { members: AT.extent_status },
  },
  enums: {
    pageflags: PAGEFLAGS_61,
    compound_dtor_id: { HUGETLB_PAGE_DTOR: 2 },
    // fs/ext4/extents_status.h's anonymous enum (BTF names it ""; any name is searched by enumValue("", ...)).
    es_bits: {
      ES_WRITTEN_B: 0,
      ES_UNWRITTEN_B: 1,
      ES_DELAYED_B: 2,
      ES_HOLE_B: 3,
      ES_REFERENCED_B: 4,
      ES_FLAGS: 5,
    },
  },
});
const FLAG = (name: keyof typeof PAGEFLAGS_61) => 2n ** BigInt(PAGEFLAGS_61[name]);
const CLEAN = FLAG("PG_uptodate") | FLAG("PG_lru");

/** A guest with a bump allocator for kernel objects in its direct map. */
function makeGuest() {
  const buf = Buffer.alloc(32 * MiB);
  const k = buildSyntheticKernel(buf);
  let next = OBJECTS_PA;
  let nextPfn = FIRST_CACHE_PFN;
  const va = (pa: number) => k.directMapBase + BigInt(pa);
  const alloc = (bytes: number) => {
    const pa = next;
    next += Math.ceil(bytes / 64) * 64;
    if (next > FIRST_CACHE_PFN * PAGE) throw new Error("test object area full");
    return { pa, va: va(pa) };
  };
  const string = (text: string) => {
    const o = alloc(text.length + 1);
    buf.write(`${text}\0`, o.pa, "latin1");
    return o.va;
  };
  const fsType = (name: string) => {
    const o = alloc(64);
    buf.writeBigUInt64LE(string(name), o.pa);
    return o.va;
  };
  const superBlock = (f: { type: bigint; uuid: string; blockSizeBits: number; mountOpt?: number }) => {
    const o = alloc(256);
    const info = alloc(64);
    buf.writeUInt32LE(f.mountOpt ?? 0, info.pa);
    const bdev = alloc(64);
    buf[o.pa + AT.super_block.s_blocksize_bits] = f.blockSizeBits;
    buf.writeBigUInt64LE(f.type, o.pa + AT.super_block.s_type);
    buf.writeBigUInt64LE(bdev.va, o.pa + AT.super_block.s_bdev);
    buf.writeBigUInt64LE(info.va, o.pa + AT.super_block.s_fs_info);
    Buffer.from(f.uuid, "hex").copy(buf, o.pa + AT.super_block.s_uuid);
    return { va: o.va, pa: o.pa, bdev: bdev.va };
  };
  /** An inode (inside an ext4_inode_info, or a bdev_inode when `bdev`): returns its mapping's address. */
  const inode = (f: {
    sb: bigint;
    mode: number;
    sizeBytes: number;
    iBlock?: Buffer;
    iFlags?: number;
    /** Make it a bdev_inode (the block device's own inode; its struct block_device is embedded). */
    bdev?: boolean;
  }) => {
    const container = alloc(1024);
    const at = container.pa + (f.bdev ? AT.bdev_inode.vfs_inode : AT.ext4_inode_info.vfs_inode);
    f.iBlock?.copy(buf, container.pa + AT.ext4_inode_info.i_data);
    buf.writeUInt32LE(f.iFlags ?? INODE_FLAG.extents, container.pa + AT.ext4_inode_info.i_flags);
    const inodeVa = va(at);
    const mapping = inodeVa + BigInt(AT.inode.i_data);
    buf.writeUInt16LE(f.mode, at + AT.inode.i_mode);
    buf.writeBigUInt64LE(f.sb, at + AT.inode.i_sb);
    buf.writeBigUInt64LE(mapping, at + AT.inode.i_mapping);
    buf.writeBigUInt64LE(BigInt(12 + (at % 1000)), at + AT.inode.i_ino);
    buf.writeBigInt64LE(BigInt(f.sizeBytes), at + AT.inode.i_size);
    buf.writeBigUInt64LE(inodeVa, at + AT.inode.i_data); // address_space.host at 0
    return { mapping, inodePa: at, blockDevice: container.va + BigInt(AT.bdev_inode.bdev) };
  };
  /** A page-cache page: struct page fields and its RAM contents. */
  const cachePage = (f: { mapping: bigint; index: number; flags?: bigint; bytes?: Buffer; pfn?: number }) => {
    const pfn = f.pfn ?? nextPfn++;
    k.setStructPage(pfn, { flags: f.flags ?? CLEAN, refcount: 1 });
    const sp = 0x800000 + pfn * STRUCT_PAGE.size;
    buf.writeBigUInt64LE(f.mapping, sp + 24);
    buf.writeBigUInt64LE(BigInt(f.index), sp + AT.page.index);
    buf.fill(0, pfn * PAGE, (pfn + 1) * PAGE);
    f.bytes?.copy(buf, pfn * PAGE);
    return pfn;
  };
  const open = () => {
    const kernel = openGuestKernel(bufferMemory(buf));
    const layout = resolveKernelLayout(kernel.info, TYPES);
    return { kernel, types: TYPES, layout };
  };
  const structPage = (pfn: number) => 0x800000 + pfn * STRUCT_PAGE.size;
  const nextFreePfn = () => nextPfn++;
  return { buf, k, alloc, fsType, superBlock, inode, cachePage, open, structPage, nextFreePfn, va };
}

function pageOf(bytes: Buffer, index: number): Buffer {
  const out = Buffer.alloc(PAGE);
  bytes.copy(out, 0, index * PAGE, Math.min(bytes.length, (index + 1) * PAGE));
  return out;
}

function asyncOnly(device: BlockDevice): BlockDevice {
  return {
    name: device.name,
    sizeBytes: device.sizeBytes,
    read: (o, l) => device.read(o, l),
    close: async () => {},
  };
}

test("page locator on a synthetic guest over real ext4 images: located bytes match the disk; every refusal has its reason", async (t) => {
  const dir = await mkdtemp(join(tmpdir(), "vmprune-locator-"));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const img4k = await makeFragmentedExt4(dir, "a.img", { blockSize: 4096, sizeMiB: 16 });
  const img1k = await makeFragmentedExt4(dir, "b.img", { blockSize: 1024, sizeMiB: 16 });
  const dev4k = await RawFileDevice.open(img4k.image);
  const dev1k = await RawFileDevice.open(img1k.image);
  t.after(() => dev4k.close());
  t.after(() => dev1k.close());
  const uuidOf = async (d: RawFileDevice) => (await d.read(1024 + 0x68, 16)).toString("hex");
  const uuid4k = await uuidOf(dev4k);
  const uuid1k = await uuidOf(dev1k);

  const g = makeGuest();
  const ext4 = g.fsType("ext4");
  const sb4k = g.superBlock({ type: ext4, uuid: uuid4k, blockSizeBits: 12 });
  const sb1k = g.superBlock({ type: ext4, uuid: uuid1k, blockSizeBits: 10 });
  const expected = new Map<number, LocateResult["ok"] | string>();
  const wantOk: { pfn: number; bytes: Buffer }[] = [];

  // Every page of the depth >= 1 file on the 4 KiB image; the partial last page is past EOF.
  const big4k = img4k.files.get("big") as Buffer;
  const bigInode = g.inode({
    sb: sb4k.va,
    mode: 0o100644,
    sizeBytes: big4k.length,
    iBlock: await iBlock(img4k.image, "big"),
  });
  const bigPages = Math.ceil(big4k.length / PAGE);
  const bigPfns: number[] = [];
  for (let i = 0; i < bigPages; i++) {
    const pfn = g.cachePage({ mapping: bigInode.mapping, index: i, bytes: pageOf(big4k, i) });
    bigPfns.push(pfn);
    if ((i + 1) * PAGE <= big4k.length) wantOk.push({ pfn, bytes: pageOf(big4k, i) });
    else expected.set(pfn, "page-past-eof");
  }
  // The same file on the 1 KiB image: a page is located only where its four blocks are contiguous.
  const big1k = img1k.files.get("big") as Buffer;
  const big1kInode = g.inode({
    sb: sb1k.va,
    mode: 0o100644,
    sizeBytes: big1k.length,
    iBlock: await iBlock(img1k.image, "big"),
  });
  const pages1k: number[] = [];
  for (let i = 0; (i + 1) * PAGE <= big1k.length; i++)
    pages1k.push(g.cachePage({ mapping: big1kInode.mapping, index: i, bytes: pageOf(big1k, i) }));

  // A file written in one piece on the 1 KiB image: its first page's blocks are contiguous.
  const falloc1k = img1k.files.get("falloc") as Buffer;
  const falloc1kInode = g.inode({
    sb: sb1k.va,
    mode: 0o100644,
    sizeBytes: falloc1k.length,
    iBlock: await iBlock(img1k.image, "falloc"),
  });
  const falloc1kPfn = g.cachePage({ mapping: falloc1kInode.mapping, index: 0, bytes: pageOf(falloc1k, 0) });

  // A large folio of order 2: head at an aligned PFN, tails naming it; the tail's index is head index + 2.
  let head = g.nextFreePfn();
  while (head % 4 !== 0) head = g.nextFreePfn();
  for (let i = 1; i < 4; i++) g.nextFreePfn();
  g.cachePage({
    pfn: head,
    mapping: bigInode.mapping,
    index: 4,
    flags: CLEAN | FLAG("PG_head"),
    bytes: pageOf(big4k, 4),
  });
  const headVa = g.k.vmemmapBase + BigInt(head * STRUCT_PAGE.size);
  for (let i = 1; i < 4; i++) {
    g.cachePage({ pfn: head + i, mapping: 0xdead000000000400n, index: 0, bytes: pageOf(big4k, 4 + i) });
    g.buf.writeBigUInt64LE(headVa | 1n, g.structPage(head + i) + 8);
    g.buf.writeUInt32LE(0, g.structPage(head + i)); // tails have no flags of their own
  }
  g.buf[g.structPage(head) + STRUCT_PAGE.size + 17] = 2; // page[1].compound_order
  g.buf.writeBigUInt64LE(headVa | 1n, g.structPage(head + 1) + 8);
  for (let i = 0; i < 4; i++) wantOk.push({ pfn: head + i, bytes: pageOf(big4k, 4 + i) });

  // Holes and unwritten extents (the file's size says the page is inside it).
  const falloc = img4k.files.get("falloc") as Buffer;
  const fallocInode = g.inode({
    sb: sb4k.va,
    mode: 0o100644,
    sizeBytes: 400 * PAGE,
    iBlock: await iBlock(img4k.image, "falloc"),
  });
  wantOk.push({
    pfn: g.cachePage({ mapping: fallocInode.mapping, index: 1, bytes: pageOf(falloc, 1) }),
    bytes: pageOf(falloc, 1),
  });
  expected.set(g.cachePage({ mapping: fallocInode.mapping, index: 7 }), "unwritten-extent");
  expected.set(g.cachePage({ mapping: fallocInode.mapping, index: 300 }), "hole");

  // Page states and file kinds that are never located.
  const root4k = await iBlock(img4k.image, "big");
  const refuse = (
    reason: string,
    f: { flags?: bigint; mode?: number; iFlags?: number; sb?: bigint; iBlock?: Buffer },
  ) => {
    const ino = g.inode({
      sb: f.sb ?? sb4k.va,
      mode: f.mode ?? 0o100644,
      sizeBytes: big4k.length,
      iBlock: f.iBlock ?? root4k,
      ...(f.iFlags !== undefined ? { iFlags: f.iFlags } : {}),
    });
    expected.set(
      g.cachePage({ mapping: ino.mapping, index: 0, ...(f.flags !== undefined ? { flags: f.flags } : {}) }),
      reason,
    );
  };
  refuse("not-clean", { flags: CLEAN | FLAG("PG_dirty") });
  refuse("not-clean", { flags: CLEAN | FLAG("PG_writeback") });
  refuse("not-clean", { flags: CLEAN | FLAG("PG_locked") });
  refuse("not-clean", { flags: FLAG("PG_lru") });
  refuse("shmem", { flags: CLEAN | FLAG("PG_swapbacked") });
  refuse("not-file-backed", { flags: CLEAN | FLAG("PG_slab") });
  refuse("not-a-regular-file", { mode: 0o040755 });
  refuse("encrypted-file", { iFlags: INODE_FLAG.extents | INODE_FLAG.encrypt });
  refuse("inline-data", { iFlags: INODE_FLAG.inlineData });
  refuse("data-journalled", { iFlags: INODE_FLAG.extents | INODE_FLAG.journalData });
  refuse("extent-tree-corrupt", {
    iBlock: Buffer.concat([Buffer.from([0x0a, 0xf3, 9, 0, 4, 0]), randomBytes(54)]),
  });
  refuse("extent-tree-corrupt", { iBlock: randomBytes(60) });
  const journalledSb = g.superBlock({ type: ext4, uuid: uuid4k, blockSizeBits: 12, mountOpt: 0x400 });
  refuse("data-journalled", { sb: journalledSb.va });
  refuse("not-on-a-shared-disk", {
    sb: g.superBlock({ type: ext4, uuid: "ab".repeat(16), blockSizeBits: 12 }).va,
  });
  refuse("not-on-a-shared-disk", {
    sb: g.superBlock({ type: g.fsType("tmpfs"), uuid: "00".repeat(16), blockSizeBits: 12 }).va,
  });
  refuse("unsupported-filesystem", {
    sb: g.superBlock({ type: g.fsType("xfs"), uuid: uuid4k, blockSizeBits: 12 }).va,
  });
  refuse("bad-kernel-object", {
    sb: g.superBlock({ type: g.fsType("\u0001\u0002"), uuid: uuid4k, blockSizeBits: 12 }).va,
  });
  refuse("bad-kernel-object", { sb: 0xffff888800000000n });

  // Pointers that lead nowhere or back to something else.
  expected.set(g.cachePage({ mapping: 0xffff888f00000000n, index: 0 }), "bad-kernel-object");
  expected.set(g.cachePage({ mapping: bigInode.mapping | 1n, index: 0 }), "not-file-backed");
  const liar = g.inode({ sb: sb4k.va, mode: 0o100644, sizeBytes: big4k.length, iBlock: root4k });
  g.buf.writeBigUInt64LE(bigInode.mapping, liar.inodePa + AT.inode.i_mapping); // owns another mapping
  expected.set(g.cachePage({ mapping: liar.mapping, index: 0 }), "bad-kernel-object");
  const badTail = g.cachePage({ mapping: 0n, index: 0 });
  g.buf.writeBigUInt64LE(0xffffea0000000001n + 64n * 100000n, g.structPage(badTail) + 8);
  expected.set(badTail, "bad-compound");

  // ext4's extent status cache (an rb-tree in the ext4_inode_info) is believed before the tree's disk blocks: it
  // says block 1 is a hole and block 20 unwritten (the disk says written), block 10 written where the disk
  // says; blocks 11, 12 and 50 are not cached (the disk walk answers). A second inode's tree points at itself: bounded.
  const esInode = g.inode({ sb: sb4k.va, mode: 0o100644, sizeBytes: big4k.length, iBlock: root4k });
  const esRoot = esInode.inodePa - AT.ext4_inode_info.vfs_inode + AT.ext4_inode_info.i_es_tree;
  const oracle = await bmap(img4k.image, "big", 51);
  const esNode = (lblk: number, len: number, status: number, pblk: number) => {
    const o = g.alloc(64);
    g.buf.writeUInt32LE(lblk, o.pa + AT.extent_status.es_lblk);
    g.buf.writeUInt32LE(len, o.pa + AT.extent_status.es_len);
    g.buf.writeBigUInt64LE((1n << BigInt(59 + status)) | BigInt(pblk), o.pa + AT.extent_status.es_pblk);
    return o;
  };
  const written = esNode(10, 1, 0, oracle[10]?.physical ?? 0);
  const holeNode = esNode(0, 2, 3, 0);
  const unwrittenNode = esNode(20, 1, 1, 0);
  g.buf.writeBigUInt64LE(holeNode.va, written.pa + 16); // rb_left
  g.buf.writeBigUInt64LE(unwrittenNode.va, written.pa + 8); // rb_right
  g.buf.writeBigUInt64LE(written.va, esRoot);
  const esPage = (index: number) =>
    g.cachePage({ mapping: esInode.mapping, index, bytes: pageOf(big4k, index) });
  expected.set(esPage(1), "hole");
  expected.set(esPage(20), "unwritten-extent");
  for (const i of [10, 11, 12, 50]) wantOk.push({ pfn: esPage(i), bytes: pageOf(big4k, i) });
  const loopInode = g.inode({ sb: sb4k.va, mode: 0o100644, sizeBytes: big4k.length, iBlock: root4k });
  const loopNode = esNode(1000, 1, 0, 1);
  g.buf.writeBigUInt64LE(loopNode.va, loopNode.pa + 16);
  g.buf.writeBigUInt64LE(loopNode.va, loopNode.pa + 8);
  g.buf.writeBigUInt64LE(
    loopNode.va,
    loopInode.inodePa - AT.ext4_inode_info.vfs_inode + AT.ext4_inode_info.i_es_tree,
  );
  wantOk.push({
    pfn: g.cachePage({ mapping: loopInode.mapping, index: 3, bytes: pageOf(big4k, 3) }),
    bytes: pageOf(big4k, 3),
  });

  // Block device pages: located when their block device is the one a located ext4 page's super_block is on.
  const bdevFs = g.superBlock({ type: g.fsType("bdev"), uuid: "00".repeat(16), blockSizeBits: 12 });
  const bdevInode = g.inode({ sb: bdevFs.va, mode: 0o060600, sizeBytes: 16 * MiB, bdev: true });
  g.buf.writeBigUInt64LE(bdevInode.blockDevice, sb4k.pa + AT.super_block.s_bdev); // the filesystem is on it
  const sbPage = Buffer.from(await dev4k.read(0, PAGE));
  const bdevPfn = g.cachePage({ mapping: bdevInode.mapping, index: 0, bytes: sbPage });
  const bdevBuffers = g.cachePage({
    mapping: bdevInode.mapping,
    index: 1,
    flags: CLEAN | FLAG("PG_private"),
  });
  const otherBdev = g.inode({ sb: bdevFs.va, mode: 0o060600, sizeBytes: 16 * MiB, bdev: true });
  const unknownBdev = g.cachePage({ mapping: otherBdev.mapping, index: 0 });

  const guest = g.open();
  const locator = await PageLocator.open({
    ...guest,
    disks: [
      { id: "a", device: dev4k },
      { id: "b", device: dev1k },
    ],
  });
  assert.deepEqual(locator.owners.missingMembers, []);
  assert.equal(locator.ext4Unavailable, "");
  assert.equal(locator.locate(bdevPfn).ok, false, "an unknown block device before any ext4 page of it");

  for (const { pfn, bytes } of wantOk) {
    const r = locator.locate(pfn);
    assert.ok(r.ok, `pfn ${pfn}: ${JSON.stringify(r)}`);
    assert.equal(r.disk, "a");
    assert.ok((await dev4k.read(r.byteOffset, PAGE)).equals(bytes), `pfn ${pfn} bytes at ${r.byteOffset}`);
  }
  for (const [pfn, reason] of expected)
    assert.deepEqual(locator.locate(pfn), { ok: false, reason }, `pfn ${pfn}`);
  let located1k = 0;
  let split1k = 0;
  for (const [i, pfn] of pages1k.entries()) {
    const r = locator.locate(pfn);
    if (r.ok) {
      located1k++;
      assert.equal(r.disk, "b");
      assert.ok((await dev1k.read(r.byteOffset, PAGE)).equals(pageOf(big1k, i)), `1k page ${i}`);
    } else {
      assert.equal(r.reason, "blocks-not-contiguous");
      split1k++;
    }
  }
  const contiguous1k = locator.locate(falloc1kPfn);
  assert.ok(contiguous1k.ok && contiguous1k.disk === "b", JSON.stringify(contiguous1k));
  assert.ok((await dev1k.read(contiguous1k.byteOffset, PAGE)).equals(pageOf(falloc1k, 0)));
  located1k++;
  assert.ok(located1k > 0 && split1k > 0, `1 KiB blocks: ${located1k} located, ${split1k} split`);
  const bdevResult = locator.locate(bdevPfn);
  assert.ok(bdevResult.ok, JSON.stringify(bdevResult));
  assert.deepEqual(
    {
      disk: bdevResult.disk,
      byteOffset: bdevResult.byteOffset,
      filesystemOffset: bdevResult.filesystemOffset,
    },
    { disk: "a", byteOffset: 0, filesystemOffset: 0 },
  );
  assert.deepEqual(locator.locate(bdevBuffers), { ok: false, reason: "bdev-buffers" });
  assert.deepEqual(locator.locate(unknownBdev), { ok: false, reason: "bdev-unidentified" });
  const stats = locator.stats();
  assert.equal(stats.extentStatusHits, 3, "block 10 and the two refusals came from the extent status cache");
  assert.ok(
    stats.blockReads > 0 && stats.blockReads < 20,
    `index blocks read once each (${stats.blockReads})`,
  );

  // The same filesystem on two disks: refused, not guessed.
  const twice = await PageLocator.open({
    ...guest,
    disks: [
      { id: "a", device: dev4k },
      { id: "a-copy", device: dev4k },
    ],
  });
  assert.deepEqual(twice.locate(bigPfns[0] ?? 0), { ok: false, reason: "ambiguous-filesystem" });

  // No readSync: pending first, then the same answers once the index blocks are in.
  const slow = await PageLocator.open({ ...guest, disks: [{ id: "a", device: asyncOnly(dev4k) }] });
  const first = bigPfns.map((pfn) => slow.locate(pfn));
  assert.ok(first.some((r) => !r.ok && r.reason === "extent-index-pending"));
  await slow.settle();
  assert.deepEqual(
    bigPfns.map((pfn) => slow.locate(pfn)),
    bigPfns.map((pfn) => locator.locate(pfn)),
  );

  // Garbage: random struct pages (mappings into random kernel memory) and random inode bytes never throw.
  for (let i = 0; i < 300; i++) {
    const pfn = g.nextFreePfn();
    const sp = g.structPage(pfn);
    randomBytes(STRUCT_PAGE.size).copy(g.buf, sp);
    const target = OBJECTS_PA + Math.floor(Math.random() * (4 * MiB));
    g.buf.writeBigUInt64LE(g.va(target) & ~7n, sp + 24);
    if (i % 2 === 0) g.buf.writeBigUInt64LE(CLEAN, sp);
  }
  const fuzzed = await PageLocator.open({ ...g.open(), disks: [{ id: "a", device: dev4k }] });
  for (let pfn = FIRST_CACHE_PFN; pfn < 8192; pfn++) fuzzed.locate(pfn);
  const junkInode = g.alloc(2048);
  for (let i = 0; i < 200; i++) {
    randomBytes(2048).copy(g.buf, junkInode.pa);
    const pfn = g.cachePage({ mapping: junkInode.va + 256n, index: i });
    const r = fuzzed.locate(pfn);
    assert.ok(!r.ok || typeof r.byteOffset === "number");
  }
  t.diagnostic(
    `${wantOk.length} pages located on the 4 KiB image, 1 KiB image ${located1k} located / ${split1k} split; ${JSON.stringify(locator.stats())}`,
  );
});
