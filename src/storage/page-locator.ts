/**
 * Where a guest page-cache page's bytes sit on a shared disk, from the guest kernel's own metadata, at a cost
 * proportional to what is cached (never a read of the whole disk):
 *
 *   pfn → struct page (mapping, index; a folio's tail through its head)          introspect/page-owner.ts
 *       → inode (i_size, i_mode) → super_block (type, s_uuid, block size)
 *       → the probed filesystem with that UUID on one of the named disks       filesystem-probe.ts
 *       → ext4_inode_info.i_data (extent root, in guest memory) and i_flags
 *       → logical block(s) of the page → physical block(s)                    ext4.ts
 *       → disk byte offset = partition offset + physical block × block size
 *
 * Pages of a block device's own cache (`bdev` super_block, mapping host = the bdev inode) are located when that
 * block device is one an ext4 super_block on a probed disk was seen on (s_bdev), and only without buffer heads
 * (metadata buffers under jbd2 may differ from the disk while their page looks clean).
 *
 * `locate` is synchronous: it runs per page on the migration's hot path. Extent-tree levels below the root are
 * filesystem blocks on disk: with a device that reads synchronously (a raw file) they are read at once; otherwise
 * an asynchronous read starts, the page misses with "extent-index-pending", and later pages of the file find the
 * block cached. Bounds: at most MAX_PENDING_READS reads in flight and MAX_CACHED_BLOCKS blocks cached (oldest
 * dropped first); `forget()` drops them (e.g. between migration passes, as on-disk tree blocks change when the
 * guest writes).
 *
 * What it never does: locate a dirty, writeback, locked or not-uptodate page; a page of tmpfs/shmem; a page past
 * i_size (its tail is zeros in memory, anything on disk); an encrypted, inline-data, data-journalled or DAX file;
 * an unwritten extent or hole; a 4 KiB page whose filesystem blocks are not contiguous on disk; a filesystem whose
 * UUID is on two probed places. Each is a counted reason.
 *
 * Known limit: the in-memory extent root is current, but deeper tree blocks are read from the disk, which lags the
 * guest's buffer cache until jbd2 checkpoints them. A reference built from such a lagging block names bytes that
 * are not the page's; the receiver's hash check refuses it and the page is sent in full.
 */
import type { GuestKernel } from "../introspect/kernel.ts";
import type { KernelLayout, KernelTypes } from "../introspect/kernel-layout.ts";
import {
  ExtentStatusReader,
  type PageOwner,
  type PageOwnerMiss,
  PageOwnerReader,
} from "../introspect/page-owner.ts";
import type { BlockDevice } from "./block-device.ts";
import {
  type BlockMapping,
  EXT4_EXT_MAGIC,
  EXT4_ROOT_BYTES,
  type ExtentNode,
  INODE_FLAG,
  mapBlockMapped,
  mapLogicalBlock,
  parseExtentNode,
} from "./ext4.ts";
import { type ProbedFilesystem, probeFilesystems } from "./filesystem-probe.ts";

const PAGE_SIZE = 4096;
const MAX_CACHED_BLOCKS = 4096;
const MAX_PENDING_READS = 32;
/** ext4_sb_info.s_mount_opt data mode (fs/ext4/ext4.h EXT4_MOUNT_DATA_FLAGS, EXT4_MOUNT_JOURNAL_DATA). */
const EXT4_MOUNT_DATA_FLAGS = 0xc00;
const EXT4_MOUNT_JOURNAL_DATA = 0x400;
/** Filesystem types whose inodes are ext4_inode_info: ext4 itself and ext3, which ext4 serves (fs/ext4/super.c). */
const EXT4_TYPES = new Set(["ext4", "ext3"]);
const MASK64 = (1n << 64n) - 1n;
/** The cache entry of a block whose read failed (not retried until forget()). */
const READ_FAILED = "read failed";

export interface LocatorDisk {
  /** How references name this disk (e.g. a QEMU drive id). */
  id: string;
  device: BlockDevice;
}

export type LocateMissReason =
  | PageOwnerMiss
  | "not-a-regular-file"
  /** The page's filesystem is not on any probed disk (tmpfs, proc, the initramfs, another disk). */
  | "not-on-a-shared-disk"
  /** Its UUID was found in more than one place. */
  | "ambiguous-filesystem"
  /** On a probed disk, but a filesystem this locator cannot map (or the guest's block size disagrees). */
  | "unsupported-filesystem"
  | "encrypted-file"
  | "inline-data"
  | "data-journalled"
  | "dax-file"
  | "page-past-eof"
  | "hole"
  | "unwritten-extent"
  | "blocks-not-contiguous"
  | "extent-index-pending"
  | "extent-tree-corrupt"
  | "extent-read-failed"
  /** A block device page whose block device is not one a probed filesystem was seen on. */
  | "bdev-unidentified"
  /** A block device page with buffer heads (filesystem metadata; may differ from the disk while clean). */
  | "bdev-buffers";

/**
 * A located page: its disk and byte offset there, and the same place named by its filesystem (UUID, 32 hex digits)
 * and the byte offset from the filesystem's start, which another host finds on its own disks (a reference on the
 * link names it so).
 */
export type LocateResult =
  | { ok: true; disk: string; byteOffset: number; filesystem: string; filesystemOffset: number }
  | { ok: false; reason: LocateMissReason };

export interface LocatorStats {
  located: number;
  misses: Partial<Record<LocateMissReason, number>>;
  pendingReads: number;
  cachedBlocks: number;
  blockReads: number;
  /** Blocks below a tree's root mapped by the kernel's extent status cache, and by tree blocks from the disk. */
  extentStatusHits: number;
  diskIndexWalks: number;
}

/** Where a probed filesystem is: which disk, and the filesystem found there. */
export interface Placement {
  disk: LocatorDisk;
  fs: ProbedFilesystem;
}

interface Ext4Offsets {
  vfsInode: number;
  data: number;
  flags: number;
  /** The window read per page: from min(i_data, i_flags) for `length` bytes, relative to ext4_inode_info. */
  windowStart: number;
  windowLength: number;
  mountOpt: number | undefined;
}

export interface PageLocatorOptions {
  kernel: GuestKernel;
  types: KernelTypes;
  layout: KernelLayout;
  disks: readonly LocatorDisk[];
  /**
   * Map blocks below an extent tree's root through ext4's in-memory extent status cache first (default true);
   * false reads the tree's index and leaf blocks from the disk only.
   */
  useExtentStatus?: boolean;
}

export class PageLocator {
  /** Filesystems found on the disks, by UUID; null for a UUID found more than once. */
  readonly filesystems: ReadonlyMap<string, Placement | null>;
  readonly owners: PageOwnerReader;
  /** Why ext4 files cannot be mapped on this kernel (a BTF member missing), or "". */
  readonly ext4Unavailable: string;
  private readonly ext4: Ext4Offsets | null;
  private readonly bdevInode: { vfsInode: number; bdev: number } | null;
  /** Block device (struct block_device address) → where its filesystem lies, learned from ext4 super_blocks. */
  private readonly bdevs = new Map<bigint, Placement>();
  private readonly mountOpts = new Map<bigint, number>();
  private readonly blocks = new Map<string, Buffer | ExtentNode | string>();
  private readonly pending = new Set<string>();
  private readonly counts = new Map<LocateMissReason, number>();
  private located = 0;
  private readonly extentStatus: ExtentStatusReader | null;
  private extentStatusHits = 0;
  private diskIndexWalks = 0;
  private blockReads = 0;

  private constructor(options: PageLocatorOptions, filesystems: Map<string, Placement | null>) {
    this.filesystems = filesystems;
    const t = options.types;
    const vfsInode = t.memberOffset("ext4_inode_info", "vfs_inode");
    const data = t.memberOffset("ext4_inode_info", "i_data");
    const flags = t.memberOffset("ext4_inode_info", "i_flags");
    if (vfsInode === undefined || data === undefined || flags === undefined) {
      this.ext4 = null;
      this.ext4Unavailable =
        "the guest's BTF has no ext4_inode_info.vfs_inode/i_data/i_flags (ext4 not loaded?)";
    } else {
      const windowStart = Math.min(data, flags);
      this.ext4 = {
        vfsInode,
        data,
        flags,
        windowStart,
        windowLength: Math.max(data + EXT4_ROOT_BYTES, flags + 4) - windowStart,
        mountOpt: t.memberOffset("ext4_sb_info", "s_mount_opt"),
      };
      this.ext4Unavailable = "";
    }
    // The ext4 fields are read with the vfs inode, in one read per page.
    const e = this.ext4;
    const around = e
      ? { start: e.windowStart - e.vfsInode, end: e.windowStart + e.windowLength - e.vfsInode }
      : undefined;
    this.owners = new PageOwnerReader(options.kernel, options.types, options.layout, around);
    const es = new ExtentStatusReader(this.owners, t);
    this.extentStatus = options.useExtentStatus !== false && es.available ? es : null;
    const bdevVfs = t.memberOffset("bdev_inode", "vfs_inode");
    const bdev = t.memberOffset("bdev_inode", "bdev");
    this.bdevInode = bdevVfs === undefined || bdev === undefined ? null : { vfsInode: bdevVfs, bdev };
  }

  /** Probes the disks' filesystems (a few small reads each) and prepares the guest-side readers. */
  static async open(options: PageLocatorOptions): Promise<PageLocator> {
    const filesystems = new Map<string, Placement | null>();
    for (const disk of options.disks) {
      for (const fs of await probeFilesystems(disk.device)) {
        filesystems.set(fs.uuid, filesystems.has(fs.uuid) ? null : { disk, fs });
      }
    }
    return new PageLocator(options, filesystems);
  }

  /** Where page frame `pfn`'s bytes are on a shared disk, or why that is not known. Never throws for guest data. */
  locate(pfn: number): LocateResult {
    const result = this.locateOnce(pfn);
    if (result.ok) this.located++;
    else this.counts.set(result.reason, (this.counts.get(result.reason) ?? 0) + 1);
    return result;
  }

  stats(): LocatorStats {
    return {
      located: this.located,
      misses: Object.fromEntries(this.counts) as LocatorStats["misses"],
      pendingReads: this.pending.size,
      cachedBlocks: this.blocks.size,
      blockReads: this.blockReads,
      extentStatusHits: this.extentStatusHits,
      diskIndexWalks: this.diskIndexWalks,
    };
  }

  /** Resolves when the extent-block reads started so far have finished. */
  async settle(): Promise<void> {
    while (this.pending.size > 0) await new Promise((r) => setTimeout(r, 1));
  }

  /** Drops cached extent blocks and cached kernel objects. */
  forget(): void {
    this.blocks.clear();
    this.bdevs.clear();
    this.mountOpts.clear();
    this.owners.forget();
  }

  private miss(reason: LocateMissReason): LocateResult {
    return { ok: false, reason };
  }

  private locateOnce(pfn: number): LocateResult {
    const found = this.owners.owner(pfn);
    if (!found.ok) return this.miss(found.reason);
    const owner = found.owner;
    const sb = owner.superBlock;
    if (sb.type === "bdev") return this.locateBdevPage(owner);
    if (!PageOwnerReader.isRegular(owner.mode)) return this.miss("not-a-regular-file");
    const placement = this.filesystems.get(sb.uuid);
    if (placement === undefined) return this.miss("not-on-a-shared-disk");
    if (placement === null) return this.miss("ambiguous-filesystem");
    if (!EXT4_TYPES.has(sb.type) || this.ext4 === null) return this.miss("unsupported-filesystem");
    const blockSize = 2 ** sb.blockSizeBits;
    if (blockSize !== placement.fs.blockSize) return this.miss("unsupported-filesystem");
    if (sb.bdev !== 0n && !this.bdevs.has(sb.bdev)) this.bdevs.set(sb.bdev, placement);
    if (this.dataJournalled(sb.fsInfo)) return this.miss("data-journalled");
    if ((owner.index + 1) * PAGE_SIZE > owner.sizeBytes) return this.miss("page-past-eof");

    const e = this.ext4;
    // ext4_inode_info starts vfsInode bytes before the inode (container_of).
    const info = owner.inodeAt - e.vfsInode;
    const window = owner.inodeBytes;
    const iFlags = window.readUInt32LE(info + e.flags);
    if (iFlags & INODE_FLAG.encrypt) return this.miss("encrypted-file");
    if (iFlags & INODE_FLAG.inlineData) return this.miss("inline-data");
    if (iFlags & INODE_FLAG.journalData) return this.miss("data-journalled");
    if (iFlags & INODE_FLAG.dax) return this.miss("dax-file");
    const root = window.subarray(info + e.data, info + e.data + EXT4_ROOT_BYTES);
    const extents = (iFlags & INODE_FLAG.extents) !== 0;
    if (extents && root.readUInt16LE(0) !== EXT4_EXT_MAGIC) return this.miss("extent-tree-corrupt");
    const rootNode = extents ? parseExtentNode(root, placement.fs.superblock.blocksCount) : null;

    // The page's bytes [index × 4096, +4096) in filesystem blocks; all must be mapped and physically contiguous.
    const fileOffset = owner.index * PAGE_SIZE;
    let lblk = Math.floor(fileOffset / blockSize);
    const within = fileOffset % blockSize;
    const needed = Math.max(1, PAGE_SIZE / blockSize);
    let first = -1;
    let have = 0;
    // Below the root, the kernel's extent status cache is current; tree blocks on disk may lag the journal.
    const deep = rootNode !== null && typeof rootNode !== "string" && rootNode.depth > 0;
    const infoVa = (owner.inode - BigInt(e.vfsInode)) & MASK64;
    while (have < needed) {
      let m: BlockMapping | null = deep ? this.fromExtentStatus(infoVa, lblk, placement) : null;
      if (m) this.extentStatusHits++;
      else if (rootNode) {
        if (deep) this.diskIndexWalks++;
        m = mapLogicalBlock(rootNode, lblk, (pblk, depth) => this.extentNode(placement, pblk, depth));
      } else
        m = mapBlockMapped(root, lblk, blockSize, placement.fs.superblock.blocksCount, (pblk) =>
          this.rawBlock(placement, pblk),
        );
      const fail = this.mappingMiss(m, placement);
      if (fail) return fail;
      const mapped = m as Extract<BlockMapping, { kind: "mapped" }>;
      if (first < 0) first = mapped.physicalBlock;
      else if (mapped.physicalBlock !== first + have) return this.miss("blocks-not-contiguous");
      const take = Math.min(mapped.run, needed - have);
      have += take;
      lblk += take;
    }
    const byteOffset = placement.fs.byteOffset + first * blockSize + within;
    if (byteOffset + PAGE_SIZE > placement.disk.device.sizeBytes) return this.miss("extent-tree-corrupt");
    return located(placement, byteOffset);
  }

  private fromExtentStatus(infoVa: bigint, lblk: number, placement: Placement): BlockMapping | null {
    const s = this.extentStatus?.lookup(infoVa, lblk);
    if (!s) return null;
    if (s.kind === "written") {
      const blocks = placement.fs.superblock.blocksCount;
      if (s.physicalBlock === 0 || s.physicalBlock + s.run > blocks)
        return { kind: "corrupt", reason: `extent status names blocks outside the filesystem` };
      return { kind: "mapped", physicalBlock: s.physicalBlock, run: s.run };
    }
    if (s.kind === "hole") return { kind: "hole" };
    // Unwritten reads as zeros; delayed is not on disk yet (a clean page cannot be delayed, so distrust it).
    return s.kind === "unwritten" ? { kind: "unwritten" } : { kind: "corrupt", reason: "delayed allocation" };
  }

  private mappingMiss(m: BlockMapping, placement: Placement): LocateResult | null {
    switch (m.kind) {
      case "mapped":
        return null;
      case "hole":
        return this.miss("hole");
      case "unwritten":
        return this.miss("unwritten-extent");
      case "corrupt":
        return this.miss("extent-tree-corrupt");
      case "need-block": {
        const key = this.key(placement, m.physicalBlock);
        if (this.blocks.get(key) === READ_FAILED) return this.miss("extent-read-failed");
        return this.miss("extent-index-pending");
      }
    }
  }

  private key(placement: Placement, pblk: number): string {
    return `${placement.fs.uuid}:${pblk}`;
  }

  /** An extent node from the cache or the disk (synchronously if the device can), else undefined. */
  private extentNode(placement: Placement, pblk: number, depth: number): ExtentNode | string | undefined {
    const key = this.key(placement, pblk);
    let entry = this.blocks.get(key);
    if (entry === undefined) entry = this.fetch(placement, pblk, key);
    if (entry === undefined || entry === READ_FAILED) return undefined;
    if (typeof entry === "string") return entry;
    if (Buffer.isBuffer(entry)) {
      const parsed = parseExtentNode(entry, placement.fs.superblock.blocksCount, depth);
      this.blocks.set(key, parsed);
      return parsed;
    }
    return entry.depth === depth ? entry : `extent block ${pblk} of depth ${entry.depth}, expected ${depth}`;
  }

  /** A raw block (block-mapped inodes' indirect blocks) from the cache or the disk, else undefined. */
  private rawBlock(placement: Placement, pblk: number): Buffer | undefined {
    const key = this.key(placement, pblk);
    const entry = this.blocks.get(key) ?? this.fetch(placement, pblk, key);
    return Buffer.isBuffer(entry) ? entry : undefined;
  }

  /** Reads a filesystem block: now if the device reads synchronously, else starts a bounded async read. */
  private fetch(placement: Placement, pblk: number, key: string): Buffer | string | undefined {
    const { device } = placement.disk;
    const blockSize = placement.fs.blockSize;
    const offset = placement.fs.byteOffset + pblk * blockSize;
    if (device.readSync) {
      try {
        this.blockReads++;
        const bytes = device.readSync(offset, blockSize);
        this.remember(key, bytes);
        return bytes;
      } catch {
        this.remember(key, READ_FAILED);
        return READ_FAILED;
      }
    }
    if (this.pending.has(key) || this.pending.size >= MAX_PENDING_READS) return undefined;
    this.pending.add(key);
    this.blockReads++;
    device.read(offset, blockSize).then(
      (bytes) => {
        this.pending.delete(key);
        this.remember(key, bytes);
      },
      () => {
        this.pending.delete(key);
        this.remember(key, READ_FAILED);
      },
    );
    return undefined;
  }

  private remember(key: string, entry: Buffer | string): void {
    if (this.blocks.size >= MAX_CACHED_BLOCKS) {
      const oldest = this.blocks.keys().next();
      if (!oldest.done) this.blocks.delete(oldest.value);
    }
    this.blocks.set(key, entry);
  }

  /** Whether an ext4 super_block is mounted data=journal (ext4_sb_info.s_mount_opt); unknown counts as yes. */
  private dataJournalled(fsInfo: bigint): boolean {
    let opt = this.mountOpts.get(fsInfo);
    if (opt === undefined) {
      const at = this.ext4?.mountOpt;
      const word = at === undefined ? null : this.owners.readKernel(fsInfo + BigInt(at), 4);
      opt = word ? word.readUInt32LE(0) : EXT4_MOUNT_JOURNAL_DATA;
      this.mountOpts.set(fsInfo, opt);
    }
    return (opt & EXT4_MOUNT_DATA_FLAGS) === EXT4_MOUNT_JOURNAL_DATA;
  }

  /** A page of a block device's own cache: byte offset index × 4096 on that device. */
  private locateBdevPage(owner: PageOwner): LocateResult {
    if (owner.hasPrivate) return this.miss("bdev-buffers");
    if (!this.bdevInode) return this.miss("bdev-unidentified");
    const bdev = (owner.inode - BigInt(this.bdevInode.vfsInode) + BigInt(this.bdevInode.bdev)) & MASK64;
    const placement = this.bdevs.get(bdev);
    if (!placement) return this.miss("bdev-unidentified");
    const byteOffset = placement.fs.byteOffset + owner.index * PAGE_SIZE;
    const fsEnd = placement.fs.byteOffset + placement.fs.superblock.blocksCount * placement.fs.blockSize;
    if (byteOffset + PAGE_SIZE > Math.min(fsEnd, placement.disk.device.sizeBytes))
      return this.miss("page-past-eof");
    return located(placement, byteOffset);
  }
}

function located(placement: Placement, byteOffset: number): LocateResult {
  return {
    ok: true,
    disk: placement.disk.id,
    byteOffset,
    filesystem: placement.fs.uuid,
    filesystemOffset: byteOffset - placement.fs.byteOffset,
  };
}
