/**
 * ext4 on disk, as far as finding a file's data blocks needs it: the superblock and the extent tree. Pure
 * functions of bytes; where the bytes come from (a guest's in-memory inode for the tree's root, a BlockDevice
 * for deeper levels) is the caller's business. Every on-disk value is untrusted: a tree that is not what ext4
 * writes gives a reason, never an exception or a wrong block.
 *
 * Sources: Documentation/filesystems/ext4/super.rst, ifork.rst (extent tree), blockmap.rst; fs/ext4/ext4.h
 * (struct ext4_super_block, EXT4_FEATURE_*, EXT4_*_FL) and fs/ext4/ext4_extents.h (struct ext4_extent_header,
 * ext4_extent, ext4_extent_idx, EXT_INIT_MAX_LEN).
 */

/** The primary superblock's byte offset from the filesystem's start (super.rst: "located at byte 1024"). */
export const EXT4_SUPERBLOCK_OFFSET = 1024;
/** sizeof(struct ext4_super_block). */
export const EXT4_SUPERBLOCK_SIZE = 1024;
/** s_magic (fs/ext4/ext4.h EXT4_SUPER_MAGIC). */
export const EXT4_SUPER_MAGIC = 0xef53;

/** Byte offsets in struct ext4_super_block (fs/ext4/ext4.h; super.rst's table). */
const SB = {
  blocksCountLo: 0x4,
  firstDataBlock: 0x14,
  logBlockSize: 0x18,
  logClusterSize: 0x1c,
  magic: 0x38,
  revLevel: 0x4c,
  featureCompat: 0x5c,
  featureIncompat: 0x60,
  featureRoCompat: 0x64,
  uuid: 0x68,
  volumeName: 0x78,
  blocksCountHi: 0x150,
} as const;

/** s_feature_incompat bits (fs/ext4/ext4.h EXT4_FEATURE_INCOMPAT_*). */
export const INCOMPAT = {
  compression: 0x1,
  filetype: 0x2,
  recover: 0x4,
  journalDev: 0x8,
  metaBg: 0x10,
  extents: 0x40,
  bit64: 0x80,
  mmp: 0x100,
  flexBg: 0x200,
  eaInode: 0x400,
  dirdata: 0x1000,
  csumSeed: 0x2000,
  largedir: 0x4000,
  inlineData: 0x8000,
  encrypt: 0x10000,
  casefold: 0x20000,
} as const;

/** s_feature_ro_compat bits (fs/ext4/ext4.h EXT4_FEATURE_RO_COMPAT_*). */
export const RO_COMPAT = { bigalloc: 0x200, metadataCsum: 0x400, verity: 0x8000 } as const;

/** Inode flags (i_flags; fs/ext4/ext4.h EXT4_*_FL). */
export const INODE_FLAG = {
  encrypt: 0x800,
  journalData: 0x4000,
  extents: 0x80000,
  verity: 0x100000,
  eaInode: 0x200000,
  dax: 0x2000000,
  inlineData: 0x10000000,
} as const;

export interface Ext4Superblock {
  /** s_uuid as 32 lowercase hex digits. */
  uuid: string;
  label: string;
  blockSize: number;
  blocksCount: number;
  firstDataBlock: number;
  clusterSize: number;
  featureCompat: number;
  featureIncompat: number;
  featureRoCompat: number;
}

/**
 * The superblock in `bytes` (the 1024 bytes at EXT4_SUPERBLOCK_OFFSET of the filesystem), or null when these are
 * not an ext2/3/4 superblock with sane geometry.
 */
export function parseExt4Superblock(bytes: Buffer): Ext4Superblock | null {
  if (bytes.length < EXT4_SUPERBLOCK_SIZE) return null;
  if (bytes.readUInt16LE(SB.magic) !== EXT4_SUPER_MAGIC) return null;
  const logBlock = bytes.readUInt32LE(SB.logBlockSize);
  const logCluster = bytes.readUInt32LE(SB.logClusterSize);
  // Block size is 2^(10 + s_log_block_size), 1 KiB to 64 KiB (super.rst).
  if (logBlock > 6 || logCluster > 29) return null;
  const blockSize = 1024 * 2 ** logBlock;
  const featureIncompat = bytes.readUInt32LE(SB.featureIncompat);
  const hi = featureIncompat & INCOMPAT.bit64 ? bytes.readUInt32LE(SB.blocksCountHi) : 0;
  const blocksCount = hi * 2 ** 32 + bytes.readUInt32LE(SB.blocksCountLo);
  if (blocksCount === 0 || !Number.isSafeInteger(blocksCount * blockSize)) return null;
  const labelBytes = bytes.subarray(SB.volumeName, SB.volumeName + 16);
  const end = labelBytes.indexOf(0);
  return {
    uuid: bytes.toString("hex", SB.uuid, SB.uuid + 16),
    label: labelBytes.toString("latin1", 0, end < 0 ? 16 : end),
    blockSize,
    blocksCount,
    firstDataBlock: bytes.readUInt32LE(SB.firstDataBlock),
    clusterSize: 1024 * 2 ** logCluster,
    featureCompat: bytes.readUInt32LE(SB.featureCompat),
    featureIncompat,
    featureRoCompat: bytes.readUInt32LE(SB.featureRoCompat),
  };
}

// ---------------------------------------------------------------------------------------------------------------
// Extent tree (fs/ext4/ext4_extents.h; Documentation/filesystems/ext4/ifork.rst)
//
//   node   = ext4_extent_header (12 bytes) + eh_entries × 12-byte entries
//   header = eh_magic u16 (0xF30A) | eh_entries u16 | eh_max u16 | eh_depth u16 | eh_generation u32
//   index  = ei_block u32 | ei_leaf_lo u32 | ei_leaf_hi u16 | ei_unused u16      (depth > 0)
//   leaf   = ee_block u32 | ee_len u16 | ee_start_hi u16 | ee_start_lo u32        (depth = 0)
//
// The root lives in the inode's i_block (i_data, 60 bytes: 4 entries); deeper nodes fill a filesystem block.
// ---------------------------------------------------------------------------------------------------------------

/** eh_magic (ext4_extents.h EXT4_EXT_MAGIC). */
export const EXT4_EXT_MAGIC = 0xf30a;
/** Size of the header and of each entry (ext4_extents.h). */
const NODE_HEADER_BYTES = 12;
const ENTRY_BYTES = 12;
/** i_block: EXT4_N_BLOCKS (15) × 4 bytes (fs/ext4/ext4.h). */
export const EXT4_ROOT_BYTES = 60;
/** EXT_INIT_MAX_LEN (ext4_extents.h): ee_len above it marks an unwritten extent of ee_len - 2^15 blocks. */
const EXT_INIT_MAX_LEN = 32768;
/** EXT4_MAX_EXTENT_DEPTH (fs/ext4/ext4_extents.h). */
export const EXT4_MAX_EXTENT_DEPTH = 5;

/** One leaf extent: `length` blocks from logical `logicalBlock` at physical `physicalBlock`. */
export interface Extent {
  logicalBlock: number;
  length: number;
  physicalBlock: number;
  unwritten: boolean;
}

/** A validated node: its depth and, sorted by first logical block, its leaf extents or its children. */
export type ExtentNode =
  | { depth: 0; extents: Extent[] }
  | { depth: number; children: { logicalBlock: number; physicalBlock: number }[] };

/**
 * Parses and checks one node. `expectedDepth` is the parent's depth - 1 (undefined for the root); `blocksCount`
 * bounds every physical block. Returns a reason string when the node is not a valid extent node.
 */
export function parseExtentNode(
  bytes: Buffer,
  blocksCount: number,
  expectedDepth?: number,
): ExtentNode | string {
  if (bytes.length < NODE_HEADER_BYTES) return "extent node shorter than its header";
  if (bytes.readUInt16LE(0) !== EXT4_EXT_MAGIC) return "extent node without the magic 0xF30A";
  const entries = bytes.readUInt16LE(2);
  const max = bytes.readUInt16LE(4);
  const depth = bytes.readUInt16LE(6);
  const capacity = Math.floor((bytes.length - NODE_HEADER_BYTES) / ENTRY_BYTES);
  if (max > capacity || entries > max)
    return `extent node with ${entries} of ${max} entries (room for ${capacity})`;
  if (depth > EXT4_MAX_EXTENT_DEPTH) return `extent node of depth ${depth}`;
  if (expectedDepth !== undefined && depth !== expectedDepth)
    return `extent node of depth ${depth} below a node of depth ${expectedDepth + 1}`;
  let previousEnd = -1;
  if (depth === 0) {
    const extents: Extent[] = [];
    for (let i = 0; i < entries; i++) {
      const at = NODE_HEADER_BYTES + i * ENTRY_BYTES;
      const logicalBlock = bytes.readUInt32LE(at);
      const rawLength = bytes.readUInt16LE(at + 4);
      const physicalBlock = bytes.readUInt16LE(at + 6) * 2 ** 32 + bytes.readUInt32LE(at + 8);
      const unwritten = rawLength > EXT_INIT_MAX_LEN;
      const length = unwritten ? rawLength - EXT_INIT_MAX_LEN : rawLength;
      if (length === 0) return `extent ${i} of length 0`;
      if (logicalBlock < previousEnd) return `extent ${i} overlaps or is out of order`;
      if (physicalBlock === 0 || physicalBlock + length > blocksCount)
        return `extent ${i} (blocks ${physicalBlock}+${length}) outside the filesystem's ${blocksCount} blocks`;
      previousEnd = logicalBlock + length;
      extents.push({ logicalBlock, length, physicalBlock, unwritten });
    }
    return { depth: 0, extents };
  }
  const children: { logicalBlock: number; physicalBlock: number }[] = [];
  for (let i = 0; i < entries; i++) {
    const at = NODE_HEADER_BYTES + i * ENTRY_BYTES;
    const logicalBlock = bytes.readUInt32LE(at);
    const physicalBlock = bytes.readUInt16LE(at + 8) * 2 ** 32 + bytes.readUInt32LE(at + 4);
    if (logicalBlock <= previousEnd && i > 0) return `index entry ${i} out of order`;
    if (physicalBlock === 0 || physicalBlock >= blocksCount)
      return `index entry ${i} names block ${physicalBlock} outside the filesystem's ${blocksCount} blocks`;
    previousEnd = logicalBlock;
    children.push({ logicalBlock, physicalBlock });
  }
  return { depth, children };
}

/** Where a logical block is, as far as the nodes at hand tell. */
export type BlockMapping =
  /** Mapped: `physicalBlock`, and `run` blocks from it (this one included) continue contiguously in its extent. */
  | { kind: "mapped"; physicalBlock: number; run: number }
  /** Allocated but unwritten (fallocate): reads as zeros, the disk holds anything. */
  | { kind: "unwritten" }
  /** Not allocated (a hole). */
  | { kind: "hole" }
  /** This node (a filesystem block) must be read first. */
  | { kind: "need-block"; physicalBlock: number; depth: number }
  | { kind: "corrupt"; reason: string };

/**
 * A node by physical block, as the caller holds it: the parsed node, a reason it is not a valid node, or
 * undefined when the caller does not have the block (yet).
 */
export type NodeSource = (physicalBlock: number, expectedDepth: number) => ExtentNode | string | undefined;

/**
 * Maps logical block `logicalBlock` through the tree whose root is `root` (i_block's 60 bytes, or any node).
 * Depth decreases at each level, so the walk ends after at most EXT4_MAX_EXTENT_DEPTH reads whatever the bytes.
 */
/**
 * The index of the last entry whose logicalBlock is <= `block` in entries sorted by logicalBlock (as ext4 keeps
 * them), or -1: a binary search, as the kernel's, since a leaf holds up to 340 extents.
 */
function lastAtOrBefore(entries: readonly { logicalBlock: number }[], block: number): number {
  let lo = 0;
  let hi = entries.length - 1;
  let found = -1;
  while (lo <= hi) {
    const mid = (lo + hi) >> 1;
    if ((entries[mid]?.logicalBlock ?? 0) <= block) {
      found = mid;
      lo = mid + 1;
    } else hi = mid - 1;
  }
  return found;
}

export function mapLogicalBlock(
  root: ExtentNode | string,
  logicalBlock: number,
  nodeAt: NodeSource,
): BlockMapping {
  let node = root;
  for (let level = 0; level <= EXT4_MAX_EXTENT_DEPTH; level++) {
    if (typeof node === "string") return { kind: "corrupt", reason: node };
    if ("extents" in node) {
      // The extent that may hold the block is the last starting at or before it (ext4_ext_binsearch).
      const e = node.extents[lastAtOrBefore(node.extents, logicalBlock)];
      if (e && logicalBlock < e.logicalBlock + e.length) {
        if (e.unwritten) return { kind: "unwritten" };
        const into = logicalBlock - e.logicalBlock;
        return { kind: "mapped", physicalBlock: e.physicalBlock + into, run: e.length - into };
      }
      return { kind: "hole" };
    }
    // The child covering the block is the last whose first logical block is <= it (ext4_ext_binsearch_idx).
    const child = node.children[lastAtOrBefore(node.children, logicalBlock)];
    if (!child) return { kind: "hole" };
    const next = nodeAt(child.physicalBlock, node.depth - 1);
    if (next === undefined)
      return { kind: "need-block", physicalBlock: child.physicalBlock, depth: node.depth - 1 };
    node = next;
  }
  return { kind: "corrupt", reason: "extent tree deeper than EXT4_MAX_EXTENT_DEPTH" };
}

// ---------------------------------------------------------------------------------------------------------------
// Block-mapped (ext2/ext3-style) inodes, Documentation/filesystems/ext4/blockmap.rst: i_block[0..11] are direct
// blocks, i_block[12] an indirect block of u32 block numbers, [13] double, [14] triple indirect. 0 is a hole.
// ---------------------------------------------------------------------------------------------------------------

/** EXT4_NDIR_BLOCKS (fs/ext4/ext4.h). */
const DIRECT_BLOCKS = 12;

/**
 * Maps a logical block of a block-mapped inode. `blockAt` returns a whole filesystem block of u32 numbers, or
 * undefined when the caller does not hold it yet.
 */
export function mapBlockMapped(
  iBlock: Buffer,
  logicalBlock: number,
  blockSize: number,
  blocksCount: number,
  blockAt: (physicalBlock: number) => Buffer | undefined,
): BlockMapping {
  if (iBlock.length < EXT4_ROOT_BYTES) return { kind: "corrupt", reason: "i_block shorter than 60 bytes" };
  const perBlock = blockSize / 4;
  const check = (pblk: number): BlockMapping | null =>
    pblk >= blocksCount ? { kind: "corrupt", reason: `block ${pblk} outside the filesystem` } : null;
  let pointer: number;
  let rest = logicalBlock;
  let levels: number;
  if (rest < DIRECT_BLOCKS) {
    pointer = iBlock.readUInt32LE(rest * 4);
    levels = 0;
  } else {
    rest -= DIRECT_BLOCKS;
    levels = 1;
    while (levels <= 3 && rest >= perBlock ** levels) {
      rest -= perBlock ** levels;
      levels++;
    }
    if (levels > 3) return { kind: "hole" };
    pointer = iBlock.readUInt32LE((DIRECT_BLOCKS + levels - 1) * 4);
  }
  for (let level = levels; level > 0; level--) {
    if (pointer === 0) return { kind: "hole" };
    const bad = check(pointer);
    if (bad) return bad;
    const block = blockAt(pointer);
    if (block === undefined) return { kind: "need-block", physicalBlock: pointer, depth: level };
    const span = perBlock ** (level - 1);
    const slot = Math.floor(rest / span);
    rest %= span;
    pointer = block.readUInt32LE(slot * 4);
  }
  if (pointer === 0) return { kind: "hole" };
  return check(pointer) ?? { kind: "mapped", physicalBlock: pointer, run: 1 };
}
