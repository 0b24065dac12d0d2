/**
 * The receiver's side of a disk reference: read block N (4096 bytes at N * alignmentBytes) of the shared raw image
 * and return it only if it hashes to what the sender saw. Every input is untrusted (it came over the link): a
 * block beyond the image, a hash of the wrong length, bytes that changed since the sender looked (the guest wrote
 * the block, or page-cache traps of linux-page-introspection.md §4.2) all come back as a typed BlockReadError for
 * the receiver to NACK, never as an exception, so that no page that failed verification reaches QEMU.
 *
 * Both sides must use the same alignment: the receiver takes the sender's (carried by the link), or probes the
 * same image with "auto", which gives the same answer as the sender's index. A disagreement cannot corrupt a page
 * (the hash would not match), it only turns every reference into a NACK.
 */
import { readSync } from "node:fs";
import { type FileHandle, open } from "node:fs/promises";
import { BlockReadError, StorageError } from "./errors.ts";
import { REF_HASH_BYTES, strongHash } from "./fingerprint.ts";
import { type AlignmentOption, PAGE_SIZE_BYTES, probeImage } from "./image-format.ts";

export type BlockReadResult = { ok: true; page: Buffer } | { ok: false; error: BlockReadError };

export interface BlockReaderOptions {
  /** The sender's index alignment; "auto" (default) probes the image as DiskIndex does. */
  alignmentBytes?: AlignmentOption;
}

export class BlockReader {
  private handle: FileHandle | null;

  private constructor(
    readonly path: string,
    /** Image size when opened; blocks are checked against the current size at every read. */
    readonly sizeBytes: number,
    readonly alignmentBytes: number,
    handle: FileHandle,
  ) {
    this.handle = handle;
  }

  /** Opens the image read-only. Refuses non-raw images (UnsupportedImageFormatError). */
  static async open(path: string, options: BlockReaderOptions = {}): Promise<BlockReader> {
    let handle: FileHandle;
    try {
      handle = await open(path, "r");
    } catch (cause) {
      throw new StorageError(
        `cannot open the shared disk image ${path} to rebuild pages from it (${(cause as Error).message}): ` +
          `give the path of the same raw image the source VM uses, readable by this user`,
        { cause },
      );
    }
    try {
      const probe = await probeImage(handle, path, options.alignmentBytes ?? "auto");
      return new BlockReader(path, probe.sizeBytes, probe.alignmentBytes, handle);
    } catch (error) {
      await handle.close();
      throw error;
    }
  }

  /** Block `block`, if it exists and hashes to `hash`. Asynchronous read (does not block the event loop). */
  async read(block: number, hash: Uint8Array, into?: Buffer): Promise<BlockReadResult> {
    const invalid = this.check(block, hash, into);
    if (invalid !== null) return { ok: false, error: invalid };
    const page = into ?? Buffer.allocUnsafe(PAGE_SIZE_BYTES);
    let bytesRead: number;
    try {
      ({ bytesRead } = await this.open().read(page, 0, PAGE_SIZE_BYTES, block * this.alignmentBytes));
    } catch (cause) {
      return { ok: false, error: this.shortRead(block, `the read failed: ${(cause as Error).message}`) };
    }
    return this.verify(block, hash, page, bytesRead);
  }

  /** As read(), synchronously (a 4 KiB pread, microseconds from the page cache). */
  readSync(block: number, hash: Uint8Array, into?: Buffer): BlockReadResult {
    const invalid = this.check(block, hash, into);
    if (invalid !== null) return { ok: false, error: invalid };
    const page = into ?? Buffer.allocUnsafe(PAGE_SIZE_BYTES);
    let bytesRead: number;
    try {
      bytesRead = readSync(this.open().fd, page, 0, PAGE_SIZE_BYTES, block * this.alignmentBytes);
    } catch (cause) {
      return { ok: false, error: this.shortRead(block, `the read failed: ${(cause as Error).message}`) };
    }
    return this.verify(block, hash, page, bytesRead);
  }

  /** Idempotent. */
  async close(): Promise<void> {
    const handle = this.handle;
    this.handle = null;
    await handle?.close();
  }

  private open(): FileHandle {
    if (this.handle === null)
      throw new StorageError(`the block reader of ${this.path} is closed: open a new one to read blocks`);
    return this.handle;
  }

  private check(block: number, hash: Uint8Array, into: Buffer | undefined): BlockReadError | null {
    if (into !== undefined && into.length !== PAGE_SIZE_BYTES)
      throw new RangeError(`the buffer for a block must be ${PAGE_SIZE_BYTES} bytes, not ${into.length}`);
    if (!Number.isSafeInteger(block) || block < 0)
      return new BlockReadError(
        "invalid-block",
        block,
        `block ${block} of ${this.path} is not a block number (a non-negative integer): NACK the reference`,
      );
    if (hash.length !== REF_HASH_BYTES)
      return new BlockReadError(
        "invalid-hash-length",
        block,
        `the hash for block ${block} of ${this.path} is ${hash.length} bytes, a SHA-256 is ${REF_HASH_BYTES}: ` +
          `NACK the reference (sender and receiver disagree on the hash)`,
      );
    const offset = block * this.alignmentBytes;
    if (offset + PAGE_SIZE_BYTES > this.sizeBytes)
      return new BlockReadError(
        "out-of-range",
        block,
        `block ${block} (bytes ${offset}..${offset + PAGE_SIZE_BYTES}) lies beyond the end of ${this.path} ` +
          `(${this.sizeBytes} bytes): NACK the reference (is the sender indexing another image?)`,
      );
    return null;
  }

  private shortRead(block: number, why: string): BlockReadError {
    return new BlockReadError(
      "short-read",
      block,
      `block ${block} of ${this.path} could not be read in full (${why}): NACK the reference`,
    );
  }

  private verify(block: number, hash: Uint8Array, page: Buffer, bytesRead: number): BlockReadResult {
    if (bytesRead !== PAGE_SIZE_BYTES)
      return {
        ok: false,
        error: this.shortRead(block, `${bytesRead} of ${PAGE_SIZE_BYTES} bytes: the image shrank`),
      };
    if (!strongHash(page).equals(hash))
      return {
        ok: false,
        error: new BlockReadError(
          "hash-mismatch",
          block,
          `block ${block} of ${this.path} does not hold the bytes the sender referenced (SHA-256 differs: ` +
            `the guest rewrote it, or the sender indexed another image): NACK, the sender sends the full page`,
        ),
      };
    return { ok: true, page };
  }
}
