/**
 * Content index of a raw shared disk image: "is this 4 KiB page, byte for byte, somewhere on the disk?" The
 * sender asks it for every page the guest holds as clean page cache; on a hit it sends REF(block, SHA-256) instead
 * of the page, and the receiver rebuilds the page from the same image (block-reader.ts).
 *
 * D3's technique: every window of the image (4096 bytes at each multiple of the alignment, image-format.ts says
 * why that is not always 4096) gets a cheap sampled fingerprint (fingerprint.ts); the strong hash is computed only
 * when it can decide something. Two strategies, measured by bench/storage-index.ts:
 *  - "on-lookup" (default): the build computes fingerprints only (it runs at disk read speed and no SHA-256 of the
 *    whole image); a lookup whose fingerprint has candidates reads each candidate block (4 KiB pread) and compares
 *    it with the page, then hashes the page once for the reference. Confirming by the bytes is stronger than by a
 *    hash, and it compares against the image as it is now, so a block the guest rewrote after the build is not
 *    sent as a reference that the receiver would NACK. Costs a read per candidate at lookup (~4 us from the host
 *    page cache; the build just read the image, so it is usually there).
 *  - "at-build": SHA-256 of every non-zero window at build, kept (32 bytes per entry); a lookup with candidates
 *    hashes the page and compares hashes: no I/O at lookup, a slower build and more memory.
 * And, for the benchmark's "without sampling" figures, fingerprint "strong": the key is the SHA-256 itself, so
 * every window is hashed at build and every looked-up page is hashed.
 *
 * All-zero windows are not indexed: QEMU sends zero pages as ZERO records, never as pages. Identical content at
 * several offsets: any one will do, so at most `maxCandidatesPerFingerprint` entries share a fingerprint and
 * further ones are dropped (counted); a page whose block was dropped is merely sent in full.
 *
 * Memory, per indexed (non-zero) window: 12 bytes of entry (fingerprint 8, block number 4) plus a 4-byte slot in
 * an open-addressing table kept between 1/4 and 1/2 full (2 to 4 slots per entry): 20 to 28 bytes, plus 32 with
 * "at-build" hashes. A 4 GiB image of non-zero data is 1 Mi windows at 4 KiB alignment (<= 28 MiB) or 4 Mi at
 * 1 KiB (<= 112 MiB). `maxEntries` bounds it (default 2^23 entries, <= 224 MiB): beyond, the build fails with a
 * clear error instead of growing without limit. The image is read in `chunkBytes` chunks (default 8 MiB).
 */
import { readSync } from "node:fs";
import { type FileHandle, open } from "node:fs/promises";
import { IndexLimitError, StorageError } from "./errors.ts";
import { type Key64, REF_HASH_BYTES, sampledFingerprint, strongHash, strongHashKey } from "./fingerprint.ts";
import { type AlignmentOption, PAGE_SIZE_BYTES, probeImage } from "./image-format.ts";

export type FingerprintMode = "sampled" | "strong";
export type StrongHashMode = "on-lookup" | "at-build";

export interface DiskIndexOptions {
  /** Alignment of the windows indexed, in bytes; "auto" (default) reads the ext2/3/4 superblock. */
  alignmentBytes?: AlignmentOption;
  /** "sampled" (default, D3) or "strong" (SHA-256 as the key: the no-sampling baseline of the benchmark). */
  fingerprint?: FingerprintMode;
  /** When strong hashes of disk blocks are computed (default "on-lookup"); "strong" implies "at-build". */
  strongHashes?: StrongHashMode;
  /** Bound on indexed windows (default 2^23, see the memory note above). */
  maxEntries?: number;
  /** Entries kept per fingerprint (default 8): bounds the candidates one lookup checks. */
  maxCandidatesPerFingerprint?: number;
  /** Bytes read per chunk while building (default 8 MiB). */
  chunkBytes?: number;
  /**
   * "on-lookup" only: when the page's fingerprint has exactly one candidate, return it without reading the block
   * (default false). For a caller whose receiver verifies every reference anyway (vmprune receive reads the block
   * and checks its SHA-256, and NACKs a mismatch): reading it here too would only save a NACK on a fingerprint
   * collision, at one 4 KiB read per cache page on the sender's busiest path. Several candidates are still told
   * apart by reading them.
   */
  trustLoneCandidate?: boolean;
  onProgress?: (bytesRead: number, sizeBytes: number) => void;
}

/** A page found on disk: window `block` starts at byte `block * alignmentBytes` of the image. */
export interface DiskRef {
  block: number;
  /** SHA-256 of the page (= of the block). */
  hash: Buffer;
}

export interface DiskIndexBuildStats {
  bytesRead: number;
  windowsScanned: number;
  zeroWindowsSkipped: number;
  entries: number;
  /** Windows not indexed because their fingerprint already had maxCandidatesPerFingerprint entries. */
  droppedOverCap: number;
  /** Windows not indexed because an entry with the same strong hash exists ("at-build" only). */
  duplicatesSkipped: number;
  strongHashes: number;
  buildMs: number;
}

export interface DiskIndexLookupStats {
  lookups: number;
  hits: number;
  /** Lookups whose fingerprint matched no entry: decided without a strong hash. */
  missesWithoutCandidate: number;
  /** Candidates examined (one per entry sharing the page's fingerprint). */
  candidatesChecked: number;
  /** Candidates that turned out to hold other bytes (fingerprint collisions). */
  falseCandidates: number;
  strongHashes: number;
  blockReads: number;
  /** Candidate reads that failed or came back short (image shrank): treated as no match. */
  readFailures: number;
  /** Hits returned without reading the block (trustLoneCandidate): the receiver confirms them. */
  unreadHits: number;
}

const DEFAULT_MAX_ENTRIES = 2 ** 23;
const DEFAULT_MAX_CANDIDATES = 8;
/** 8 MiB: large sequential reads (the kernel's readahead does the rest) with bounded memory. */
const DEFAULT_CHUNK_BYTES = 8 * 1024 * 1024;
/** Block numbers are 32-bit in the index (and in the REF record). */
const MAX_BLOCKS = 2 ** 32;
const INITIAL_ENTRIES = 1024;
const ZERO_PAGE = Buffer.alloc(PAGE_SIZE_BYTES);

function isZeroWindow(buf: Buffer, offset: number): boolean {
  return buf.compare(ZERO_PAGE, 0, PAGE_SIZE_BYTES, offset, offset + PAGE_SIZE_BYTES) === 0;
}

export class DiskIndex {
  readonly buildStats: DiskIndexBuildStats = {
    bytesRead: 0,
    windowsScanned: 0,
    zeroWindowsSkipped: 0,
    entries: 0,
    droppedOverCap: 0,
    duplicatesSkipped: 0,
    strongHashes: 0,
    buildMs: 0,
  };
  readonly lookupStats: DiskIndexLookupStats = {
    lookups: 0,
    hits: 0,
    missesWithoutCandidate: 0,
    candidatesChecked: 0,
    falseCandidates: 0,
    strongHashes: 0,
    blockReads: 0,
    readFailures: 0,
    unreadHits: 0,
  };
  readonly fingerprint: FingerprintMode;
  readonly strongHashes: StrongHashMode;
  /** Bytes of the image indexed (what was read; a partial last window is not indexed). */
  sizeBytes = 0;

  // Entries, dense: fingerprint halves, block number, and (at-build) the SHA-256.
  private keyLo = new Uint32Array(INITIAL_ENTRIES);
  private keyHi = new Uint32Array(INITIAL_ENTRIES);
  private blocks = new Uint32Array(INITIAL_ENTRIES);
  private hashes: Uint8Array;
  private count = 0;
  // Open addressing, linear probing: entry number + 1, 0 = empty.
  private slots = new Uint32Array(INITIAL_ENTRIES * 2);
  private readonly key: Key64 = { lo: 0, hi: 0 };
  private readonly zeroKey: Key64;
  private readonly scratch = Buffer.alloc(PAGE_SIZE_BYTES);
  private readonly maxEntries: number;
  private readonly maxCandidates: number;
  private readonly trustLoneCandidate: boolean;
  /** lookup's scratch: the entries sharing the page's fingerprint. */
  private candidates = new Uint32Array(DEFAULT_MAX_CANDIDATES);
  private handle: FileHandle | null;

  private constructor(
    readonly path: string,
    readonly alignmentBytes: number,
    /** Why this alignment (for reports). */
    readonly alignmentSource: string,
    handle: FileHandle,
    options: DiskIndexOptions,
  ) {
    this.handle = handle;
    this.fingerprint = options.fingerprint ?? "sampled";
    this.strongHashes = this.fingerprint === "strong" ? "at-build" : (options.strongHashes ?? "on-lookup");
    this.hashes = new Uint8Array(this.strongHashes === "at-build" ? INITIAL_ENTRIES * REF_HASH_BYTES : 0);
    this.maxEntries = options.maxEntries ?? DEFAULT_MAX_ENTRIES;
    this.maxCandidates = options.maxCandidatesPerFingerprint ?? DEFAULT_MAX_CANDIDATES;
    this.trustLoneCandidate = options.trustLoneCandidate ?? false;
    if (!Number.isInteger(this.maxCandidates) || this.maxCandidates < 1)
      throw new RangeError(
        `maxCandidatesPerFingerprint must be a positive integer, not ${this.maxCandidates}`,
      );
    this.zeroKey = sampledFingerprint(ZERO_PAGE, 0, { lo: 0, hi: 0 });
  }

  /** Reads the whole image once and indexes it. Refuses non-raw images (UnsupportedImageFormatError). */
  static async build(path: string, options: DiskIndexOptions = {}): Promise<DiskIndex> {
    const started = performance.now();
    let handle: FileHandle;
    try {
      handle = await open(path, "r");
    } catch (cause) {
      throw new StorageError(
        `cannot open the disk image ${path} to index it (${(cause as Error).message}): give the path of the ` +
          `raw image the VM's disk uses, readable by this user`,
        { cause },
      );
    }
    try {
      const probe = await probeImage(handle, path, options.alignmentBytes ?? "auto");
      const windows =
        probe.sizeBytes < PAGE_SIZE_BYTES
          ? 0
          : Math.floor((probe.sizeBytes - PAGE_SIZE_BYTES) / probe.alignmentBytes) + 1;
      if (windows > MAX_BLOCKS)
        throw new IndexLimitError(
          `${path}: ${probe.sizeBytes} bytes at ${probe.alignmentBytes}-byte alignment are ${windows} windows, ` +
            `more than the 2^32 a 32-bit block number addresses: use a larger alignment or a smaller image`,
        );
      const index = new DiskIndex(path, probe.alignmentBytes, probe.alignmentSource, handle, options);
      await index.scan(handle, probe.sizeBytes, options);
      index.buildStats.buildMs = performance.now() - started;
      if (index.strongHashes === "at-build") {
        // Lookups never read the image in this mode.
        index.handle = null;
        await handle.close();
      }
      return index;
    } catch (error) {
      await handle.close();
      throw error;
    }
  }

  /** Indexed windows. */
  get entries(): number {
    return this.count;
  }

  /** Bytes held by the index's tables. */
  get memoryBytes(): number {
    return (
      this.keyLo.byteLength +
      this.keyHi.byteLength +
      this.blocks.byteLength +
      this.hashes.byteLength +
      this.slots.byteLength
    );
  }

  /** Byte offset of a block in the image. */
  offsetOf(block: number): number {
    return block * this.alignmentBytes;
  }

  /**
   * The disk block holding exactly these 4096 bytes, or null. Fingerprint first; the strong hash of the page is
   * computed only if a candidate is confirmed ("on-lookup") or exists ("at-build").
   */
  lookup(page: Buffer): DiskRef | null {
    if (page.length !== PAGE_SIZE_BYTES)
      throw new RangeError(`a page to look up is ${PAGE_SIZE_BYTES} bytes, this one is ${page.length}`);
    const stats = this.lookupStats;
    stats.lookups++;
    let pageHash: Buffer | null = null;
    let key: Key64;
    if (this.fingerprint === "strong") {
      pageHash = strongHash(page);
      stats.strongHashes++;
      key = strongHashKey(pageHash, this.key);
    } else {
      key = sampledFingerprint(page, 0, this.key);
    }
    const count = this.matchingEntries(key);
    if (count === 0) {
      stats.missesWithoutCandidate++;
      return null;
    }
    if (count === 1 && this.trustLoneCandidate && this.strongHashes === "on-lookup") {
      stats.candidatesChecked++;
      stats.hits++;
      stats.unreadHits++;
      stats.strongHashes++;
      return { block: this.blocks[this.candidates[0] ?? 0] ?? 0, hash: strongHash(page) };
    }
    for (let i = 0; i < count; i++) {
      const entry = this.candidates[i] ?? 0;
      stats.candidatesChecked++;
      const block = this.blocks[entry] ?? 0;
      if (this.strongHashes === "at-build") {
        if (pageHash === null) {
          pageHash = strongHash(page);
          stats.strongHashes++;
        }
        const at = entry * REF_HASH_BYTES;
        if (pageHash.compare(this.hashes, at, at + REF_HASH_BYTES) === 0) {
          stats.hits++;
          return { block, hash: pageHash };
        }
      } else if (this.readBlock(block) && this.scratch.equals(page)) {
        stats.hits++;
        stats.strongHashes++;
        return { block, hash: strongHash(page) };
      }
      stats.falseCandidates++;
    }
    return null;
  }

  /** Puts the entries whose fingerprint is `key` into `candidates` (in probe order); returns how many. */
  private matchingEntries(key: Key64): number {
    const mask = this.slots.length - 1;
    let count = 0;
    for (let slot = key.lo & mask; ; slot = (slot + 1) & mask) {
      const stored = this.slots[slot] ?? 0;
      if (stored === 0) return count;
      const entry = stored - 1;
      if (this.keyLo[entry] !== key.lo || this.keyHi[entry] !== key.hi) continue;
      if (count === this.candidates.length) {
        const grown = new Uint32Array(count * 2);
        grown.set(this.candidates);
        this.candidates = grown;
      }
      this.candidates[count++] = entry;
    }
  }

  /** Closes the image (lookups in "on-lookup" mode need it open). Idempotent. */
  async close(): Promise<void> {
    const handle = this.handle;
    this.handle = null;
    await handle?.close();
  }

  private readBlock(block: number): boolean {
    if (this.handle === null)
      throw new StorageError(`the disk index of ${this.path} is closed: build a new one to look pages up`);
    this.lookupStats.blockReads++;
    try {
      const n = readSync(this.handle.fd, this.scratch, 0, PAGE_SIZE_BYTES, block * this.alignmentBytes);
      if (n === PAGE_SIZE_BYTES) return true;
    } catch {
      // An unreadable block is a miss: the page travels in full.
    }
    this.lookupStats.readFailures++;
    return false;
  }

  private async scan(handle: FileHandle, sizeBytes: number, options: DiskIndexOptions): Promise<void> {
    const chunkBytes = options.chunkBytes ?? DEFAULT_CHUNK_BYTES;
    if (!Number.isInteger(chunkBytes) || chunkBytes < PAGE_SIZE_BYTES)
      throw new RangeError(`chunkBytes must be an integer >= ${PAGE_SIZE_BYTES}, not ${chunkBytes}`);
    const align = this.alignmentBytes;
    const stats = this.buildStats;
    // Windows that straddle two reads are completed by carrying the unfinished tail (< 4096 bytes) forward.
    const buf = Buffer.allocUnsafe(chunkBytes + PAGE_SIZE_BYTES);
    let bufStart = 0;
    let filled = 0;
    let window = 0;
    for (;;) {
      const { bytesRead } = await handle.read(buf, filled, buf.length - filled, bufStart + filled);
      if (bytesRead === 0) break;
      filled += bytesRead;
      stats.bytesRead += bytesRead;
      const end = bufStart + filled;
      for (; window + PAGE_SIZE_BYTES <= end; window += align)
        this.indexWindow(buf, window - bufStart, window);
      buf.copy(buf, 0, window - bufStart, filled);
      filled = end - window;
      bufStart = window;
      options.onProgress?.(stats.bytesRead, sizeBytes);
    }
    this.sizeBytes = stats.bytesRead;
  }

  private indexWindow(buf: Buffer, offset: number, position: number): void {
    const stats = this.buildStats;
    stats.windowsScanned++;
    let key: Key64;
    let hash: Buffer | null = null;
    if (this.fingerprint === "strong") {
      if (isZeroWindow(buf, offset)) {
        stats.zeroWindowsSkipped++;
        return;
      }
      hash = strongHash(buf, offset);
      stats.strongHashes++;
      key = strongHashKey(hash, this.key);
    } else {
      key = sampledFingerprint(buf, offset, this.key);
      // A zero window has the zero page's fingerprint; only then are its 4096 bytes compared.
      if (key.lo === this.zeroKey.lo && key.hi === this.zeroKey.hi && isZeroWindow(buf, offset)) {
        stats.zeroWindowsSkipped++;
        return;
      }
      if (this.strongHashes === "at-build") {
        hash = strongHash(buf, offset);
        stats.strongHashes++;
      }
    }
    this.insert(key, position / this.alignmentBytes, hash);
  }

  private insert(key: Key64, block: number, hash: Buffer | null): void {
    const stats = this.buildStats;
    let mask = this.slots.length - 1;
    let sameKey = 0;
    let slot = key.lo & mask;
    for (; ; slot = (slot + 1) & mask) {
      const stored = this.slots[slot] ?? 0;
      if (stored === 0) break;
      const entry = stored - 1;
      if (this.keyLo[entry] !== key.lo || this.keyHi[entry] !== key.hi) continue;
      if (hash !== null) {
        const at = entry * REF_HASH_BYTES;
        if (hash.compare(this.hashes, at, at + REF_HASH_BYTES) === 0) {
          stats.duplicatesSkipped++;
          return;
        }
      }
      sameKey++;
    }
    if (sameKey >= this.maxCandidates) {
      stats.droppedOverCap++;
      return;
    }
    if (this.count >= this.maxEntries)
      throw new IndexLimitError(
        `the disk index of ${this.path} reached its bound of ${this.maxEntries} entries at byte ` +
          `${block * this.alignmentBytes} of ${this.path}: raise maxEntries (about 28 bytes each), or index ` +
          `with a larger alignment`,
      );
    const entry = this.count++;
    if (entry === this.blocks.length) this.growEntries();
    this.keyLo[entry] = key.lo;
    this.keyHi[entry] = key.hi;
    this.blocks[entry] = block;
    if (hash !== null) this.hashes.set(hash, entry * REF_HASH_BYTES);
    if (this.count * 2 > this.slots.length) {
      this.growSlots();
      mask = this.slots.length - 1;
      for (slot = key.lo & mask; this.slots[slot] !== 0; slot = (slot + 1) & mask);
    }
    this.slots[slot] = entry + 1;
    stats.entries = this.count;
  }

  private growEntries(): void {
    const size = this.blocks.length * 2;
    const grow = <T extends Uint32Array | Uint8Array>(old: T, make: (n: number) => T, n: number): T => {
      const next = make(n);
      next.set(old);
      return next;
    };
    this.keyLo = grow(this.keyLo, (n) => new Uint32Array(n), size);
    this.keyHi = grow(this.keyHi, (n) => new Uint32Array(n), size);
    this.blocks = grow(this.blocks, (n) => new Uint32Array(n), size);
    if (this.hashes.length > 0)
      this.hashes = grow(this.hashes, (n) => new Uint8Array(n), size * REF_HASH_BYTES);
  }

  private growSlots(): void {
    const slots = new Uint32Array(this.slots.length * 2);
    const mask = slots.length - 1;
    // Re-insert in entry order, so candidates keep their insertion order (the lowest block is tried first).
    for (let entry = 0; entry < this.count - 1; entry++) {
      let slot = (this.keyLo[entry] ?? 0) & mask;
      while (slots[slot] !== 0) slot = (slot + 1) & mask;
      slots[slot] = entry + 1;
    }
    this.slots = slots;
  }
}
