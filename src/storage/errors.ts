/**
 * Typed failures of the shared-disk side. Opening an image that cannot be used (qcow2, too large, unreadable)
 * is an error the caller reports before migrating (then migrates without cache pruning). A reference that cannot
 * be honoured (block beyond the image, wrong hash, hash of the wrong length) is an expected outcome on the
 * receiver, returned as a value, never thrown: the receiver NACKs it and the sender sends the full page.
 */

export class StorageError extends Error {
  override readonly name: string = "StorageError";
}

/** The image is not a raw disk image (qcow2, VMDK, VHDX): its blocks are not at fixed file offsets. */
export class UnsupportedImageFormatError extends StorageError {
  override readonly name = "UnsupportedImageFormatError";
  constructor(
    readonly path: string,
    readonly format: string,
    message: string,
  ) {
    super(message);
  }
}

/** The index would outgrow its memory bound, or block numbers would not fit the reference. */
export class IndexLimitError extends StorageError {
  override readonly name = "IndexLimitError";
}

export type BlockReadErrorCode =
  /** The block number is not a non-negative integer. */
  | "invalid-block"
  /** The block (all of its 4096 bytes) lies beyond the end of the image. */
  | "out-of-range"
  /** The hash does not have the length of a SHA-256 digest. */
  | "invalid-hash-length"
  /** The image held fewer bytes than it should at that offset (it shrank, or a read failed). */
  | "short-read"
  /** The block's bytes do not hash to the expected value (the guest rewrote it, or a stale index). */
  | "hash-mismatch";

/** Why a referenced block could not be returned. The receiver NACKs; the sender sends the full page. */
export class BlockReadError extends StorageError {
  override readonly name = "BlockReadError";
  constructor(
    readonly code: BlockReadErrorCode,
    readonly block: number,
    message: string,
  ) {
    super(message);
  }
}
