/**
 * The receiver's side of a disk reference: read block N (4096 bytes at N * alignmentBytes) of the shared disk
 * and return it only if it hashes to what the sender saw. The disk is any BlockDevice (block-device.ts): a raw
 * image file read directly (open(); synchronous reads too, microseconds from the page cache), or the guest-visible
 * bytes of any image QEMU opens, read through NBD (fromDevice() with an NbdDevice; asynchronous reads only). Every input is untrusted (it came over the link): a
 * block beyond the image, a hash of the wrong length, bytes that changed since the sender looked (the guest wrote
 * the block, or page-cache traps of linux-page-introspection.md §4.2) all come back as a typed BlockReadError for
 * the receiver to NACK, never as an exception, so that no page that failed verification reaches QEMU.
 *
 * Both sides must use the same alignment: the receiver takes the sender's (carried by the link), or probes the
 * same image with "auto", which gives the same answer as the sender's index. A disagreement cannot corrupt a page
 * (the hash would not match), it only turns every reference into a NACK.
 */
import { type BlockDevice, RawFileDevice } from "./block-device.ts";
import { BlockReadError, StorageError } from "./errors.ts";
import { REF_HASH_BYTES, strongHash } from "./fingerprint.ts";
import {
  type AlignmentOption,
  extBlockSize,
  PAGE_SIZE_BYTES,
  refuseNonRaw,
  validateAlignment,
} from "./image-format.ts";
import { parseNbdUri } from "./nbd-client.ts";
import { NbdDevice } from "./nbd-device.ts";

export type BlockReadResult = { ok: true; page: Buffer } | { ok: false; error: BlockReadError };

export interface BlockReaderOptions {
  /** The sender's index alignment; "auto" (default) probes the disk as DiskIndex does. */
  alignmentBytes?: AlignmentOption;
}

/** Bytes read to settle the alignment: the ext2/3/4 superblock lies in the first 2 KiB (image-format.ts). */
const PROBE_BYTES = 4096;

export class BlockReader {
  readonly #device: BlockDevice;
  #closed = false;

  private constructor(
    device: BlockDevice,
    /** Disk size when opened; blocks beyond it are refused without a read. */
    readonly sizeBytes: number,
    readonly alignmentBytes: number,
  ) {
    this.#device = device;
  }

  /** Opens a raw image file read-only. Refuses non-raw images (UnsupportedImageFormatError). */
  static async open(path: string, options: BlockReaderOptions = {}): Promise<BlockReader> {
    let device: RawFileDevice;
    try {
      device = await RawFileDevice.open(path);
    } catch (cause) {
      throw new StorageError(
        `cannot open the shared disk image ${path} to rebuild pages from it (${(cause as Error).message}): ` +
          `give the path of the same raw image the source VM uses, readable by this user`,
        { cause },
      );
    }
    try {
      return await BlockReader.#probe(device, options, true);
    } catch (error) {
      await device.close();
      throw error;
    }
  }

  /**
   * Reads references from `device` (its guest-visible bytes: nothing to refuse, whatever format holds them). The
   * reader owns the device from now on: close() closes it.
   */
  static async fromDevice(device: BlockDevice, options: BlockReaderOptions = {}): Promise<BlockReader> {
    return BlockReader.#probe(device, options, false);
  }

  static async #probe(device: BlockDevice, options: BlockReaderOptions, raw: boolean): Promise<BlockReader> {
    const sizeBytes = device.sizeBytes;
    const alignment = options.alignmentBytes ?? "auto";
    if (alignment !== "auto") validateAlignment(alignment);
    const head = sizeBytes > 0 ? await device.read(0, Math.min(PROBE_BYTES, sizeBytes)) : Buffer.alloc(0);
    if (raw) refuseNonRaw(device.name, head);
    const blockSize = alignment === "auto" ? extBlockSize(head) : null;
    const alignmentBytes =
      alignment !== "auto" ? alignment : Math.min(blockSize ?? PAGE_SIZE_BYTES, PAGE_SIZE_BYTES);
    return new BlockReader(device, sizeBytes, alignmentBytes);
  }

  /** What the reader reads (a path, or an NBD URI), for logs. */
  get path(): string {
    return this.#device.name;
  }

  /** readSync() is available (a raw file): the receiver may resolve references without waiting. */
  get canReadSync(): boolean {
    return this.#device.readSync !== undefined;
  }

  /** Block `block`, if it exists and hashes to `hash`. Asynchronous read (does not block the event loop). */
  async read(block: number, hash: Uint8Array, into?: Buffer): Promise<BlockReadResult> {
    const invalid = this.check(block, hash, into);
    if (invalid !== null) return { ok: false, error: invalid };
    let bytes: Buffer;
    try {
      bytes = await this.open().read(block * this.alignmentBytes, PAGE_SIZE_BYTES);
    } catch (cause) {
      return { ok: false, error: this.shortRead(block, `the read failed: ${(cause as Error).message}`) };
    }
    return this.verify(block, hash, bytes, into);
  }

  /** As read(), synchronously (a 4 KiB pread); throws a StorageError if the device has no synchronous reads. */
  readSync(block: number, hash: Uint8Array, into?: Buffer): BlockReadResult {
    const invalid = this.check(block, hash, into);
    if (invalid !== null) return { ok: false, error: invalid };
    const device = this.open();
    if (!device.readSync)
      throw new StorageError(`${device.name} is read asynchronously only (see canReadSync): use read()`);
    let bytes: Buffer;
    try {
      bytes = device.readSync(block * this.alignmentBytes, PAGE_SIZE_BYTES);
    } catch (cause) {
      return { ok: false, error: this.shortRead(block, `the read failed: ${(cause as Error).message}`) };
    }
    return this.verify(block, hash, bytes, into);
  }

  /** Closes the device. Idempotent. */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    await this.#device.close();
  }

  private open(): BlockDevice {
    if (this.#closed)
      throw new StorageError(`the block reader of ${this.path} is closed: open a new one to read blocks`);
    return this.#device;
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

  private verify(block: number, hash: Uint8Array, bytes: Buffer, into: Buffer | undefined): BlockReadResult {
    if (bytes.length !== PAGE_SIZE_BYTES)
      return {
        ok: false,
        error: this.shortRead(block, `${bytes.length} of ${PAGE_SIZE_BYTES} bytes: the disk shrank`),
      };
    if (!strongHash(bytes).equals(hash))
      return {
        ok: false,
        error: new BlockReadError(
          "hash-mismatch",
          block,
          `block ${block} of ${this.path} does not hold the bytes the sender referenced (SHA-256 differs: ` +
            `the guest rewrote it, or the sender indexed another image): NACK, the sender sends the full page`,
        ),
      };
    if (into) bytes.copy(into);
    return { ok: true, page: into ?? bytes };
  }
}

/** `disk` is an NBD URI (nbd+unix:///EXPORT?socket=PATH, nbd://HOST:PORT/EXPORT) rather than a file path. */
export function isNbdUri(disk: string): boolean {
  return /^nbd(\+unix)?:\/\//.test(disk);
}

/**
 * The reader of the shared disk named on a command line: an NBD URI (read through the export, with QEMU's block
 * layer: any image format) or the path of a raw image file.
 */
export async function openDiskReader(disk: string, options: BlockReaderOptions = {}): Promise<BlockReader> {
  if (!isNbdUri(disk)) return BlockReader.open(disk, options);
  const device = await NbdDevice.open(parseNbdUri(disk));
  try {
    return await BlockReader.fromDevice(device, options);
  } catch (error) {
    await device.close();
    throw error;
  }
}
