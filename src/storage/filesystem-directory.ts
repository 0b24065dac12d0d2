/**
 * receive's side of a filesystem reference (link REF_FS): the filesystems on the disks receive was given, found
 * by their UUIDs (filesystem-probe.ts reads the partition tables and superblocks: a few small reads per disk), and
 * the page a reference names read from the right one and checked against the sender's SHA-256. Everything in a
 * reference is untrusted: an unknown or ambiguous UUID, an offset outside the filesystem, or bytes that do not hash
 * right come back as a typed BlockReadError (the receiver NACKs), never as an exception.
 */
import type { BlockDevice } from "./block-device.ts";
import type { BlockReadResult } from "./block-reader.ts";
import { BlockReadError } from "./errors.ts";
import { type ProbedFilesystem, probeFilesystems } from "./filesystem-probe.ts";
import { REF_HASH_BYTES, strongHash } from "./fingerprint.ts";
import { PAGE_SIZE_BYTES } from "./image-format.ts";
import { SequentialReadAhead, type SyncReadable } from "./read-ahead.ts";

function hasReadSync(device: BlockDevice): device is BlockDevice & SyncReadable {
  return device.readSync !== undefined;
}

/** REF_FS blockNumber unit (link/protocol.ts): 512-byte sectors from the filesystem's first byte. */
export const FILESYSTEM_SECTOR_BYTES = 512;

interface Place {
  device: BlockDevice;
  /** Sequential read-ahead over the device, when it reads synchronously (a raw file). */
  readAhead: SequentialReadAhead | undefined;
  fs: ProbedFilesystem;
  /** Bytes of the filesystem (its block count × block size, within the disk). */
  sizeBytes: number;
}

export class FilesystemDirectory {
  /** UUID (hex) → where it is, or null when two disks hold a filesystem with that UUID (clones). */
  readonly #places = new Map<string, Place | null>();

  private constructor(readonly devices: readonly BlockDevice[]) {}

  /** Probes every device (partition tables and superblocks only). */
  static async open(devices: readonly BlockDevice[]): Promise<FilesystemDirectory> {
    const directory = new FilesystemDirectory(devices);
    for (const device of devices) {
      // One read-ahead per disk, shared by its filesystems.
      const readAhead = hasReadSync(device) ? new SequentialReadAhead(device) : undefined;
      for (const fs of await probeFilesystems(device)) {
        const end = Math.min(device.sizeBytes, fs.byteOffset + fs.superblock.blocksCount * fs.blockSize);
        const place: Place = { device, readAhead, fs, sizeBytes: end - fs.byteOffset };
        directory.#places.set(fs.uuid, directory.#places.has(fs.uuid) ? null : place);
      }
    }
    return directory;
  }

  /** "ext4 UUID on DISK (where)" for each filesystem found, for logs. */
  describe(): string[] {
    return [...this.#places].map(([uuid, p]) =>
      p ? `${p.fs.type} ${uuid} on ${p.device.name} (${p.fs.where})` : `${uuid} on several disks (ignored)`,
    );
  }

  /** The page at `blockNumber` sectors into filesystem `uuid`, if its SHA-256 is `hash`. */
  async read(uuid: Buffer, blockNumber: number, hash: Uint8Array): Promise<BlockReadResult> {
    return this.readNow(uuid, blockNumber, hash);
  }

  /**
   * As read(), but synchronous when the disk can be read synchronously (a raw file): no Promise per page. `uuid`
   * and `hash` are only read during the call (copied for an asynchronous read).
   */
  readNow(uuid: Buffer, blockNumber: number, hash: Uint8Array): BlockReadResult | Promise<BlockReadResult> {
    const found = this.#locate(uuid, blockNumber, hash);
    if (!found.ok) return found;
    const { place, offset } = found;
    const failed = (cause: unknown) =>
      this.#fail(
        "short-read",
        blockNumber,
        `filesystem ${uuid.toString("hex")} sector ${blockNumber} on ${place.device.name} could not be read (${(cause as Error).message}): NACK the reference`,
      );
    const check = (page: Buffer) => this.#check(uuid, blockNumber, hash, place, page);
    if (place.readAhead) {
      try {
        return check(place.readAhead.readSync(offset, PAGE_SIZE_BYTES));
      } catch (cause) {
        return failed(cause);
      }
    }
    // The caller's uuid and hash may be views of a socket's chunk: the check after the read needs its own copies.
    const [ownUuid, ownHash] = [Buffer.from(uuid), Buffer.from(hash)];
    return place.device
      .read(offset, PAGE_SIZE_BYTES)
      .then((page) => this.#check(ownUuid, blockNumber, ownHash, place, page), failed);
  }

  #check(uuid: Buffer, blockNumber: number, hash: Uint8Array, place: Place, page: Buffer): BlockReadResult {
    if (!strongHash(page).equals(hash))
      return this.#fail(
        "hash-mismatch",
        blockNumber,
        `filesystem ${uuid.toString("hex")} sector ${blockNumber} on ${place.device.name} does not hold the bytes the sender referenced (the guest rewrote it since): NACK, the sender sends the full page`,
      );
    return { ok: true, page };
  }

  #locate(
    uuid: Buffer,
    blockNumber: number,
    hash: Uint8Array,
  ): { ok: true; place: Place; offset: number } | { ok: false; error: BlockReadError } {
    const name = uuid.toString("hex");
    if (hash.length !== REF_HASH_BYTES)
      return this.#fail("invalid-hash-length", blockNumber, `a ${hash.length}-byte hash is not a SHA-256`);
    if (!Number.isSafeInteger(blockNumber) || blockNumber < 0)
      return this.#fail("invalid-block", blockNumber, `sector ${blockNumber} is not a sector number`);
    const place = this.#places.get(name);
    if (place === undefined)
      return this.#fail(
        "out-of-range",
        blockNumber,
        `no disk given to receive holds filesystem ${name} (found: ${this.describe().join("; ") || "none"}): NACK; give receive the same disks as the source VM (--disk)`,
      );
    if (place === null)
      return this.#fail(
        "out-of-range",
        blockNumber,
        `filesystem ${name} is on several disks given to receive, so which one is meant is not known: NACK`,
      );
    const within = blockNumber * FILESYSTEM_SECTOR_BYTES;
    if (within + PAGE_SIZE_BYTES > place.sizeBytes)
      return this.#fail(
        "out-of-range",
        blockNumber,
        `sector ${blockNumber} lies beyond filesystem ${name} (${place.sizeBytes} bytes): NACK`,
      );
    return { ok: true, place, offset: place.fs.byteOffset + within };
  }

  #fail(
    code: BlockReadError["code"],
    blockNumber: number,
    message: string,
  ): { ok: false; error: BlockReadError } {
    return { ok: false, error: new BlockReadError(code, blockNumber, message) };
  }
}
