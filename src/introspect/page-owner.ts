/**
 * Whose page a page frame is, from the guest kernel's own objects: struct page → `mapping` (an address_space) and
 * `index` (the page's offset in the file, in pages) → `address_space.host` (the inode) → `inode.i_sb` (the
 * super_block: filesystem type name, UUID, block size, block device). The storage locator turns that into a disk
 * location (src/storage/page-locator.ts).
 *
 * Every field offset comes from the guest's BTF (KernelTypes.memberOffset); a member the kernel's types do not
 * have makes the owner unknown with the member named, never a guessed offset. Everything read is untrusted guest
 * memory: pointers are translated with checks, strings and orders bounded, and an inode is believed only if its
 * `i_mapping` points back at the page's mapping.
 *
 * A compound page (large folio) is owned through its head: head->index is the folio's first page, and page
 * `pfn` is `pfn - headPfn` pages further (include/linux/pagemap.h folio_page_idx / page_to_pgoff).
 *
 * Caches: each mapping's host and each super_block's facts (re-read every SUPER_BLOCK_RECHECK_MS). The inode is
 * read on every call (one read, with the fields of the filesystem's inode container the caller asks for), since
 * a freed inode reused at the same address would name another file. ExtentStatusReader (below) reads ext4's
 * in-memory extent status cache of an inode.
 */
import type { GuestKernel } from "./kernel.ts";
import type { KernelLayout, KernelTypes } from "./kernel-layout.ts";

/**
 * Low bits of page->mapping (include/linux/page-flags.h, 4.18-7.x): PAGE_MAPPING_ANON 1, PAGE_MAPPING_MOVABLE 2,
 * both (KSM) 3. A file page has neither.
 */
export const PAGE_MAPPING_FLAGS = 3;
/** S_IFMT and S_IFREG (include/uapi/linux/stat.h). */
const S_IFMT = 0o170000;
export const S_IFREG = 0o100000;
const MASK64 = (1n << 64n) - 1n;
/** The largest folio order a page cache holds (MAX_PAGECACHE_ORDER is at most PMD order 9 on x86-64, 6.x). */
const MAX_PAGECACHE_ORDER = 9;
/** file_system_type.name is a short literal ("ext4", "bdev", "tmpfs"); longer reads are bounded here. */
const FS_TYPE_NAME_MAX = 32;
/** How long (ms) cached super_block facts are trusted before s_uuid/s_type are read again. */
const SUPER_BLOCK_RECHECK_MS = 100;
/**
 * How long (ms) an inode's bytes (i_mapping, i_size, ext4's i_data...) read for one page serve the next pages of
 * the same file: pages of a file come in runs, and one read per page was most of the locator's cost. An inode
 * freed and reused within this time could name another file's blocks: the receiver's hash check NACKs such a
 * reference (a full page instead), it never rebuilds a wrong page.
 */
const INODE_RECHECK_MS = 50;
/**
 * Struct pages read in one guest read, from the first one asked for: a file's cache pages arrive in runs of
 * neighbouring frames (QEMU walks RAM in order), and one read per page was the locator's largest cost.
 */
const STRUCT_PAGE_RUN = 64;
/**
 * How long (ms) such a run serves: about one judged batch, whose struct pages the judge itself read at its start,
 * so no staler than the judge's view. A page that changed within it costs a NACK at most (receive's hash check).
 */
const STRUCT_PAGE_FRESH_MS = 5;
/** Inodes whose bytes are kept at once (a cache, cleared when full). */
const MAX_CACHED_INODES = 4096;

export type PageOwnerMiss =
  /** The PFN has no struct page (a hole in the memmap) or it cannot be read. */
  | "no-struct-page"
  /** A tail page whose head cannot be found, or an order that does not hold the tail. */
  | "bad-compound"
  /** No mapping, anonymous, KSM or a non-LRU movable page. */
  | "not-file-backed"
  /** Swap-backed file page: tmpfs/shmem, memfd, SysV shm. */
  | "shmem"
  /** Not uptodate, dirty, under writeback or locked: its bytes are not (yet, or no longer) those on disk. */
  | "not-clean"
  /** A kernel object (address_space, inode, super_block) could not be read or is not consistent. */
  | "bad-kernel-object"
  /** The kernel's BTF lacks a member this needs (see PageOwnerReader.missingMembers). */
  | "kernel-type-missing";

export interface SuperBlockFacts {
  address: bigint;
  /** file_system_type.name: "ext4", "bdev", "tmpfs", ... */
  type: string;
  /** s_uuid as 32 hex digits (zeros for filesystems without one). */
  uuid: string;
  blockSizeBits: number;
  /** s_bdev: the block_device the filesystem is on (0n for none). */
  bdev: bigint;
  /** s_fs_info: the filesystem's private superblock (struct ext4_sb_info for ext4). */
  fsInfo: bigint;
}

export interface PageOwner {
  pfn: number;
  headPfn: number;
  /** Page index of `pfn` in its file (byte offset / 4096). */
  index: number;
  mapping: bigint;
  inode: bigint;
  ino: number;
  /** i_mode (S_IFREG for regular files). */
  mode: number;
  sizeBytes: number;
  superBlock: SuperBlockFacts;
  /** Whether the page (its folio) has private data, e.g. buffer heads. */
  hasPrivate: boolean;
  /**
   * The inode's bytes as read for this call, with the `around` range the reader was made with; the inode starts at
   * `inodeAt`. The buffer is reused by the next call.
   */
  inodeBytes: Buffer;
  inodeAt: number;
}

export type PageOwnerResult = { ok: true; owner: PageOwner } | { ok: false; reason: PageOwnerMiss };

/** The page cache's fields the reader needs, as `struct.member`. */
const MEMBERS = [
  ["page", "index"],
  ["address_space", "host"],
  ["inode", "i_mode"],
  ["inode", "i_sb"],
  ["inode", "i_mapping"],
  ["inode", "i_ino"],
  ["inode", "i_size"],
  ["super_block", "s_type"],
  ["super_block", "s_uuid"],
  ["super_block", "s_blocksize_bits"],
  ["super_block", "s_bdev"],
  ["super_block", "s_fs_info"],
  ["file_system_type", "name"],
] as const;
type Member = `${(typeof MEMBERS)[number][0]}.${(typeof MEMBERS)[number][1]}`;

/** Reads page owners from a live (or paused) guest; caches super_blocks and what each mapping's host is. */
export class PageOwnerReader {
  /** Members the kernel's types lack ("inode.i_ino"); empty when every owner can be read. */
  readonly missingMembers: string[] = [];
  private readonly off = new Map<Member, number>();
  private readonly inodeWindow: { start: number; length: number };
  private readonly pageBytes: Buffer;
  private readonly runBytes: Buffer;
  private run: { first: number; count: number; readAt: number } | undefined;
  private readonly inodes = new Map<bigint, { bytes: Buffer; readAt: number }>();
  private readonly word = Buffer.alloc(8);
  private readonly hosts = new Map<bigint, bigint>();
  private readonly superBlocks = new Map<bigint, { facts: SuperBlockFacts | null; checkedAt: number }>();
  private readonly bit: Record<
    "uptodate" | "dirty" | "writeback" | "locked" | "head" | "swapbacked" | "slab",
    number
  >;
  private readonly privateMask: number;

  /**
   * `around`: bytes of the object that embeds the inode to read with it, in one read (a filesystem's inode
   * container, e.g. ext4_inode_info's i_data before its vfs_inode): offsets relative to the inode, may be negative.
   */
  constructor(
    readonly kernel: GuestKernel,
    readonly types: KernelTypes,
    readonly layout: KernelLayout,
    around: { start: number; end: number } = { start: 0, end: 0 },
  ) {
    for (const [struct, member] of MEMBERS) {
      const at = types.memberOffset(struct, member);
      if (at === undefined) this.missingMembers.push(`${struct}.${member}`);
      else this.off.set(`${struct}.${member}` as Member, at);
    }
    const inodeFields = [
      "inode.i_mode",
      "inode.i_sb",
      "inode.i_mapping",
      "inode.i_ino",
      "inode.i_size",
    ] as const;
    const starts = inodeFields.map((m) => this.off.get(m) ?? 0);
    const start = Math.min(around.start, ...starts);
    this.inodeWindow = { start, length: Math.max(around.end, Math.max(...starts) + 8) - start };
    this.pageBytes = Buffer.alloc(2 * layout.structPageSize);
    this.runBytes = Buffer.alloc(STRUCT_PAGE_RUN * layout.structPageSize);
    const flagBit = (name: keyof PageOwnerReader["bit"]) => {
      const n = layout.flags[name];
      return n === undefined ? 0 : 2 ** n;
    };
    this.bit = {
      uptodate: flagBit("uptodate"),
      dirty: flagBit("dirty"),
      writeback: flagBit("writeback"),
      locked: flagBit("locked"),
      head: flagBit("head"),
      swapbacked: flagBit("swapbacked"),
      slab: flagBit("slab"),
    };
    const p = layout.flags.private;
    const p2 = layout.flags.private2;
    this.privateMask = (p === undefined ? 0 : 2 ** p) + (p2 === undefined ? 0 : 2 ** p2);
    if (this.bit.uptodate === 0 || this.bit.dirty === 0 || this.bit.writeback === 0 || this.bit.locked === 0)
      this.missingMembers.push("enum pageflags PG_uptodate/PG_dirty/PG_writeback/PG_locked");
    if (layout.compoundOrderOffset === null) this.missingMembers.push("the compound order's place");
  }

  /** The owner of page frame `pfn`, or why it has none that the locator could use. */
  owner(pfn: number): PageOwnerResult {
    if (this.missingMembers.length > 0) return { ok: false, reason: "kernel-type-missing" };
    const buf = this.pageBytes;
    if (!this.readStructPages(pfn, 1, buf)) return { ok: false, reason: "no-struct-page" };
    const offsets = this.layout.offsets;
    let headPfn = pfn;
    let flags = buf.readUInt32LE(offsets.flags);
    const tailWord = buf.readBigUInt64LE(offsets.tail);
    const isHead = (flags & this.bit.head) !== 0;
    if ((tailWord & 1n) === 1n && !isHead) {
      const head = this.headOf(pfn, tailWord);
      if (head === null || head >= pfn || pfn - head >= 2 ** MAX_PAGECACHE_ORDER)
        return { ok: false, reason: "bad-compound" };
      headPfn = head;
    }
    if (headPfn !== pfn || isHead) {
      if (!this.readStructPages(headPfn, 2, buf)) return { ok: false, reason: "no-struct-page" };
      flags = buf.readUInt32LE(offsets.flags);
      if ((flags & this.bit.head) === 0) {
        if (headPfn !== pfn) return { ok: false, reason: "bad-compound" };
      } else {
        const orderAt = this.layout.compoundOrderOffset ?? 0;
        const order = buf[orderAt] ?? 0;
        if (order > MAX_PAGECACHE_ORDER || headPfn % 2 ** order !== 0 || pfn - headPfn >= 2 ** order)
          return { ok: false, reason: "bad-compound" };
      }
    }
    const mapping = buf.readBigUInt64LE(offsets.mapping);
    if (mapping === 0n || (mapping & BigInt(PAGE_MAPPING_FLAGS)) !== 0n)
      return { ok: false, reason: "not-file-backed" };
    // Slab pages and typed pages (page tables, zsmalloc...) keep other things in the mapping slot.
    if ((flags & this.bit.slab) !== 0 || this.layout.pageType(buf.readUInt32LE(offsets.mapcount)) !== null)
      return { ok: false, reason: "not-file-backed" };
    if ((flags & this.bit.swapbacked) !== 0) return { ok: false, reason: "shmem" };
    const b = this.bit;
    if ((flags & b.uptodate) === 0 || (flags & (b.dirty | b.writeback | b.locked)) !== 0)
      return { ok: false, reason: "not-clean" };
    const headIndex = buf.readBigUInt64LE(this.need("page.index"));
    const index = headIndex + BigInt(pfn - headPfn);
    if (index > BigInt(Number.MAX_SAFE_INTEGER) / 4096n) return { ok: false, reason: "bad-kernel-object" };

    const inode = this.hostOf(mapping);
    if (inode === null) return { ok: false, reason: "bad-kernel-object" };
    const w = this.inodeWindow;
    const bytes = this.inodeBytesOf(inode);
    if (!bytes) return { ok: false, reason: "bad-kernel-object" };
    // The inode must still own this mapping: a freed and reused inode would name another file.
    if (bytes.readBigUInt64LE(this.inodeField("inode.i_mapping")) !== mapping) {
      this.hosts.delete(mapping);
      this.inodes.delete(inode);
      return { ok: false, reason: "bad-kernel-object" };
    }
    const sizeBytes = bytes.readBigInt64LE(this.inodeField("inode.i_size"));
    const ino = bytes.readBigUInt64LE(this.inodeField("inode.i_ino"));
    if (
      sizeBytes < 0n ||
      sizeBytes > BigInt(Number.MAX_SAFE_INTEGER) ||
      ino > BigInt(Number.MAX_SAFE_INTEGER)
    )
      return { ok: false, reason: "bad-kernel-object" };
    const superBlock = this.superBlock(bytes.readBigUInt64LE(this.inodeField("inode.i_sb")));
    if (!superBlock) return { ok: false, reason: "bad-kernel-object" };
    return {
      ok: true,
      owner: {
        pfn,
        headPfn,
        index: Number(index),
        mapping,
        inode,
        ino: Number(ino),
        mode: bytes.readUInt16LE(this.inodeField("inode.i_mode")),
        sizeBytes: Number(sizeBytes),
        superBlock,
        hasPrivate: (flags & this.privateMask) !== 0,
        inodeBytes: bytes,
        inodeAt: -w.start,
      },
    };
  }

  /** Reads `length` bytes of guest kernel memory at `va`, or null. */
  readKernel(va: bigint, length: number, into?: Buffer): Buffer | null {
    const out = into ?? Buffer.alloc(length);
    return this.kernel.addressSpace.tryReadVirt(va & MASK64, out, 0, length) ? out : null;
  }

  /** Forgets cached super_blocks, inodes and mapping hosts (after a guest change the caller knows of). */
  forget(): void {
    this.run = undefined;
    this.hosts.clear();
    this.superBlocks.clear();
    this.inodes.clear();
  }

  /** `count` struct pages from `pfn` into `into`, from the current run if it holds them (STRUCT_PAGE_RUN). */
  private readStructPages(pfn: number, count: number, into: Buffer): boolean {
    const size = this.layout.structPageSize;
    const now = performance.now();
    const r = this.run;
    const fresh = r !== undefined && now - r.readAt < STRUCT_PAGE_FRESH_MS;
    if (!fresh || pfn < r.first || pfn + count > r.first + r.count) {
      this.run = undefined;
      // A run that crosses a hole in the memmap cannot be read whole: then just the pages asked for.
      if (!this.kernel.memmap.read(pfn, STRUCT_PAGE_RUN, this.runBytes))
        return this.kernel.memmap.read(pfn, count, into);
      this.run = { first: pfn, count: STRUCT_PAGE_RUN, readAt: now };
    }
    const first = this.run?.first ?? pfn;
    this.runBytes.copy(into, 0, (pfn - first) * size, (pfn - first + count) * size);
    return true;
  }

  /** The inode's window of bytes (see INODE_RECHECK_MS), or null if it cannot be read. */
  private inodeBytesOf(inode: bigint): Buffer | null {
    const now = performance.now();
    const cached = this.inodes.get(inode);
    if (cached && now - cached.readAt < INODE_RECHECK_MS) return cached.bytes;
    const w = this.inodeWindow;
    const bytes = cached?.bytes ?? Buffer.alloc(w.length);
    if (!this.kernel.addressSpace.tryReadVirt((inode + BigInt(w.start)) & MASK64, bytes)) {
      this.inodes.delete(inode);
      return null;
    }
    if (!cached && this.inodes.size >= MAX_CACHED_INODES) this.inodes.clear();
    this.inodes.set(inode, { bytes, readAt: now });
    return bytes;
  }

  /** Where `member` (an inode's) is in the inode's window of bytes (inodeBytesOf). */
  private inodeField(member: Member): number {
    return this.need(member) - this.inodeWindow.start;
  }

  private need(member: Member): number {
    const at = this.off.get(member);
    // The constructor recorded every absent member and owner() returns before any is needed.
    if (at === undefined) throw new RangeError(`BTF has no ${member}`);
    return at;
  }

  /** The head PFN a tail names: head | 1, or (7.1+ compound_info) a mask for the tail's own address. */
  private headOf(pfn: number, word: bigint): number | null {
    const memmap = this.kernel.memmap;
    const value = word & ~1n & MASK64;
    const size = this.layout.structPageSize;
    if (this.layout.tailEncoding === "pointer-or-mask" && (size & (size - 1)) === 0) {
      const low = (~value & MASK64) + 1n;
      if ((low & (low - 1n)) === 0n && low > BigInt(size)) {
        const self = memmap.structPageAddress(pfn);
        return self === null ? null : memmap.pfnOfStructPage(self & value);
      }
    }
    return memmap.pfnOfStructPage(value);
  }

  private hostOf(mapping: bigint): bigint | null {
    const cached = this.hosts.get(mapping);
    if (cached !== undefined) return cached;
    const word = this.readKernel(mapping + BigInt(this.need("address_space.host")), 8, this.word);
    if (!word) return null;
    const host = word.readBigUInt64LE(0);
    if (host === 0n) return null;
    if (this.hosts.size > 65_536) this.hosts.clear();
    this.hosts.set(mapping, host);
    return host;
  }

  private superBlock(address: bigint): SuperBlockFacts | null {
    const now = performance.now();
    const cached = this.superBlocks.get(address);
    if (cached && now - cached.checkedAt < SUPER_BLOCK_RECHECK_MS) return cached.facts;
    const facts = this.readSuperBlock(address);
    if (cached?.facts && facts && (facts.uuid !== cached.facts.uuid || facts.type !== cached.facts.type))
      this.hosts.clear(); // a super_block reused for another mount: every host learned under it is suspect
    if (this.superBlocks.size > 1024) this.superBlocks.clear();
    this.superBlocks.set(address, { facts, checkedAt: now });
    return facts;
  }

  private readSuperBlock(address: bigint): SuperBlockFacts | null {
    const at = (m: Member) => (address + BigInt(this.need(m))) & MASK64;
    const ptr = (m: Member) => this.readKernel(at(m), 8)?.readBigUInt64LE(0) ?? null;
    const typeAddress = ptr("super_block.s_type");
    const bdev = ptr("super_block.s_bdev");
    const fsInfo = ptr("super_block.s_fs_info");
    const uuid = this.readKernel(at("super_block.s_uuid"), 16);
    const bits = this.readKernel(at("super_block.s_blocksize_bits"), 1)?.[0];
    if (typeAddress === null || typeAddress === 0n || bdev === null || fsInfo === null || !uuid) return null;
    if (bits === undefined || bits < 9 || bits > 16) return null;
    const namePtr = this.readPointer(typeAddress);
    if (namePtr === null || namePtr === 0n) return null;
    const type = this.readName(namePtr);
    if (type === null) return null;
    return { address, type, uuid: uuid.toString("hex"), blockSizeBits: bits, bdev, fsInfo };
  }

  private readPointer(typeAddress: bigint): bigint | null {
    return (
      this.readKernel(typeAddress + BigInt(this.need("file_system_type.name")), 8)?.readBigUInt64LE(0) ?? null
    );
  }

  /** A short NUL-terminated name; read byte runs up to the page end so an unmapped next page is no failure. */
  private readName(va: bigint): string | null {
    const inPage = Number(4096n - (va & 4095n));
    const length = Math.min(FS_TYPE_NAME_MAX, inPage);
    const bytes = this.readKernel(va, length);
    if (!bytes) return null;
    const end = bytes.indexOf(0);
    if (end <= 0) return null;
    const name = bytes.toString("latin1", 0, end);
    return /^[a-z0-9_.-]+$/i.test(name) ? name : null;
  }

  /** Whether a mode is a regular file's. */
  static isRegular(mode: number): boolean {
    return (mode & S_IFMT) === S_IFREG;
  }
}

/** What ext4's extent status cache says of one logical block. */
export type ExtentStatus =
  | { kind: "written"; physicalBlock: number; run: number }
  | { kind: "unwritten" | "delayed" | "hole" };

/** The most nodes a lookup visits: a red-black tree of 2^32 extents is at most 64 deep. */
const MAX_RB_DEPTH = 64;

/**
 * ext4's extent status tree (fs/ext4/extents_status.[ch]): the kernel's own in-memory cache of an inode's block
 * mappings, a red-black tree of `struct extent_status` {rb_node, es_lblk, es_len, es_pblk} under
 * `ext4_inode_info.i_es_tree.root`, non-overlapping ranges keyed by es_lblk. The status lives in es_pblk's top
 * ES_FLAGS bits (ES_SHIFT = 64 - ES_FLAGS; bit ES_SHIFT + ES_WRITTEN_B etc., extents_status.h). It holds what
 * ext4_map_blocks found when the page was read, current even where on-disk tree blocks lag the journal.
 * Offsets and the enum come from BTF; without them `available` is false and lookups say nothing.
 */
export class ExtentStatusReader {
  readonly available: boolean;
  private readonly rootAt: number;
  private readonly nodeAt: number;
  private readonly left: number;
  private readonly right: number;
  private readonly lblkAt: number;
  private readonly lenAt: number;
  private readonly pblkAt: number;
  private readonly span: number;
  private readonly shift: bigint;
  private readonly bits: { written: number; unwritten: number; delayed: number; hole: number };
  private readonly node: Buffer;

  constructor(
    private readonly owners: PageOwnerReader,
    types: KernelTypes,
  ) {
    const m = (s: string, f: string) => types.memberOffset(s, f);
    const tree = m("ext4_inode_info", "i_es_tree");
    const root = m("ext4_es_tree", "root");
    const rbNode = m("rb_root", "rb_node");
    const values = [
      tree,
      root,
      rbNode,
      m("rb_node", "rb_left"),
      m("rb_node", "rb_right"),
      m("extent_status", "rb_node"),
      m("extent_status", "es_lblk"),
      m("extent_status", "es_len"),
      m("extent_status", "es_pblk"),
    ];
    const flags = types.enumValue("", "ES_FLAGS");
    const enums = ["ES_WRITTEN_B", "ES_UNWRITTEN_B", "ES_DELAYED_B", "ES_HOLE_B"].map((e) =>
      types.enumValue("", e),
    );
    const known =
      values.every((v) => v !== undefined) && flags !== undefined && enums.every((e) => e !== undefined);
    const [, , , left = 0, right = 0, nodeAt = 0, lblkAt = 0, lenAt = 0, pblkAt = 0] = values;
    this.available = known && flags > 0 && flags < 16;
    this.rootAt = (tree ?? 0) + (root ?? 0) + (rbNode ?? 0);
    this.left = left;
    this.right = right;
    this.nodeAt = nodeAt;
    this.lblkAt = lblkAt;
    this.lenAt = lenAt;
    this.pblkAt = pblkAt;
    this.span = Math.max(left, right, lblkAt + 4, lenAt + 4, pblkAt + 8, 8) + 8;
    this.shift = BigInt(64 - (flags ?? 5));
    const [w = 0, u = 1, d = 2, h = 3] = enums;
    this.bits = { written: w, unwritten: u, delayed: d, hole: h };
    this.node = Buffer.alloc(this.span);
  }

  /**
   * The cached status of logical block `lblk` of the inode whose ext4_inode_info is at `info`, or null when the
   * cache does not cover it (or cannot be read: a torn or hostile tree ends the walk, it never loops).
   */
  lookup(info: bigint, lblk: number): ExtentStatus | null {
    if (!this.available) return null;
    const rootWord = this.owners.readKernel(info + BigInt(this.rootAt), 8);
    if (!rootWord) return null;
    let node = rootWord.readBigUInt64LE(0);
    const buf = this.node;
    for (let depth = 0; depth < MAX_RB_DEPTH && node !== 0n; depth++) {
      const es = (node - BigInt(this.nodeAt)) & MASK64;
      if (!this.owners.readKernel(es, this.span, buf)) return null;
      const start = buf.readUInt32LE(this.lblkAt);
      const length = buf.readUInt32LE(this.lenAt);
      if (lblk < start) node = buf.readBigUInt64LE(this.nodeAt + this.left);
      else if (length === 0 || lblk - start >= length) node = buf.readBigUInt64LE(this.nodeAt + this.right);
      else {
        const word = buf.readBigUInt64LE(this.pblkAt);
        const status = Number(word >> this.shift);
        const has = (bit: number) => ((status >> bit) & 1) === 1;
        const kinds = [
          has(this.bits.written),
          has(this.bits.unwritten),
          has(this.bits.delayed),
          has(this.bits.hole),
        ];
        // Exactly one type is set (extents_status.h: the type masks are exclusive); anything else is no answer.
        if (kinds.filter(Boolean).length !== 1) return null;
        if (has(this.bits.unwritten)) return { kind: "unwritten" };
        if (has(this.bits.delayed)) return { kind: "delayed" };
        if (has(this.bits.hole)) return { kind: "hole" };
        const base = word & ((1n << this.shift) - 1n);
        if (base > BigInt(Number.MAX_SAFE_INTEGER)) return null;
        return {
          kind: "written",
          physicalBlock: Number(base) + (lblk - start),
          run: length - (lblk - start),
        };
      }
    }
    return null;
  }
}
