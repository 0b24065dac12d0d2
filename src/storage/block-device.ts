/**
 * A guest disk as the storage code reads it: guest-visible bytes at byte offsets, whatever holds them (a raw image
 * file read directly, or any format QEMU opens, read through an NBD export of QEMU's block layer). The locator
 * reads filesystem metadata through it (superblocks, extent index blocks) and the receiver reads referenced
 * blocks through it. Reads are bounds-checked here, so a reference from the link can never read past the disk.
 */
import { readSync } from "node:fs";
import { type FileHandle, open } from "node:fs/promises";
import { StorageError } from "./errors.ts";

export interface BlockDevice {
  /** What it reads, for logs and errors: a path, or an NBD address and export. */
  readonly name: string;
  /** Guest-visible size of the disk. */
  readonly sizeBytes: number;
  /**
   * `length` bytes at `offset`. Rejects with a StorageError when the range is not inside the disk or the read
   * fails; never returns fewer bytes than asked.
   */
  read(offset: number, length: number): Promise<Buffer>;
  /** The same, synchronously: only devices whose reads are local and short (a raw file) have it. */
  readSync?(offset: number, length: number): Buffer;
  /** Idempotent. */
  close(): Promise<void>;
}

/** Throws the StorageError for a range that is not a whole part of a `sizeBytes` disk. */
export function checkRange(
  device: Pick<BlockDevice, "name" | "sizeBytes">,
  offset: number,
  length: number,
): void {
  if (!Number.isSafeInteger(offset) || offset < 0 || !Number.isSafeInteger(length) || length <= 0)
    throw new StorageError(`cannot read ${length} bytes at ${offset} of ${device.name}: not a byte range`);
  if (offset + length > device.sizeBytes)
    throw new StorageError(
      `cannot read bytes ${offset}..${offset + length} of ${device.name}: the disk has ${device.sizeBytes} bytes`,
    );
}

/** A raw image file (or block device node) read directly with pread. */
export class RawFileDevice implements BlockDevice {
  #handle: FileHandle | null;

  private constructor(
    readonly name: string,
    readonly sizeBytes: number,
    handle: FileHandle,
  ) {
    this.#handle = handle;
  }

  /** Opens `path` read-only. The caller is responsible for it being raw (image-format.ts refuseNonRaw). */
  static async open(path: string): Promise<RawFileDevice> {
    let handle: FileHandle;
    try {
      handle = await open(path, "r");
    } catch (cause) {
      throw new StorageError(
        `cannot open the disk ${path} (${(cause as Error).message}): give a path readable by this user`,
        { cause },
      );
    }
    const stat = await handle.stat();
    return new RawFileDevice(path, stat.size, handle);
  }

  async read(offset: number, length: number): Promise<Buffer> {
    checkRange(this, offset, length);
    const out = Buffer.allocUnsafe(length);
    const { bytesRead } = await this.#open().read(out, 0, length, offset);
    if (bytesRead !== length) throw this.#short(offset, length, bytesRead);
    return out;
  }

  readSync(offset: number, length: number): Buffer {
    checkRange(this, offset, length);
    const out = Buffer.allocUnsafe(length);
    const bytesRead = readSync(this.#open().fd, out, 0, length, offset);
    if (bytesRead !== length) throw this.#short(offset, length, bytesRead);
    return out;
  }

  async close(): Promise<void> {
    const handle = this.#handle;
    this.#handle = null;
    await handle?.close();
  }

  #open(): FileHandle {
    if (this.#handle === null) throw new StorageError(`${this.name} is closed: open it again to read it`);
    return this.#handle;
  }

  #short(offset: number, length: number, bytesRead: number): StorageError {
    return new StorageError(
      `read ${bytesRead} of ${length} bytes at ${offset} of ${this.name}: the file shrank below its size when opened`,
    );
  }
}
