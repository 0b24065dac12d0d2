/**
 * What a shared disk image is, before anything indexes or reads it: raw or not, how long, and at which byte
 * alignment a file's 4 KiB page can sit in it.
 *
 * Why alignment matters: a clean page-cache page holds 4096 consecutive bytes of a file, which the filesystem
 * stored in its own blocks. When the filesystem's block size is 4 KiB and it starts at offset 0 of the image, every
 * page of a file is one 4 KiB-aligned block of the image. With 1 KiB blocks (mke2fs picks them for "small"
 * filesystems below 512 MiB, /etc/mke2fs.conf; the lab's 384 MiB data disk is one: `dumpe2fs -h` says "Block
 * size: 1024") a file's page is four 1 KiB blocks that may start at any 1 KiB boundary (ext4 does not keep
 * physical = logical mod 4; on the lab disk, written once by mke2fs -d, every extent happens to, so 4096 would
 * find its files too: bench/storage-index.ts prints both), and may even be split over two extents (then it is in
 * no contiguous window of the image and is simply not found: sent in full). So the index looks at every window
 * of 4096 bytes that starts at a multiple of the filesystem block size, not only at multiples of 4096. Other layouts: a partitioned image (MBR/GPT) whose partitions start at 4 KiB multiples
 * (the 1 MiB default of fdisk/parted) holding 4 KiB-block filesystems works with 4096; anything else can be
 * indexed exactly by passing the alignment (512 covers every sector-aligned layout, at 8 times the entries).
 */
import type { FileHandle } from "node:fs/promises";
import { UnsupportedImageFormatError } from "./errors.ts";

/** x86-64 base page: the unit of QEMU's RAM records (TARGET_PAGE_SIZE) and of the guest's page cache. */
export const PAGE_SIZE_BYTES = 4096;

/** Bytes read from the head of an image to recognise it. */
const PROBE_BYTES = 4096;

/** ext2/3/4 superblock: at byte 1024, s_log_block_size at +24, s_magic at +56 (fs/ext4/ext4.h). */
const EXT_SUPERBLOCK_OFFSET = 1024;
const EXT_LOG_BLOCK_SIZE_OFFSET = 24;
const EXT_MAGIC_OFFSET = 56;
const EXT_MAGIC = 0xef53;
/** ext4 block sizes are 1 KiB << s_log_block_size, at most 64 KiB (EXT4_MAX_BLOCK_LOG_SIZE = 16). */
const EXT_MIN_BLOCK_LOG = 10;
const EXT_MAX_BLOCK_LOG = 16;

/** Smallest alignment accepted: a disk sector, the finest unit any partition or filesystem is placed at. */
export const MIN_ALIGNMENT_BYTES = 512;

interface NonRawFormat {
  name: string;
  offset: number;
  magic: Buffer;
}

/** Image formats that map guest blocks to file offsets through their own tables, so offsets are not fixed. */
const NON_RAW_FORMATS: NonRawFormat[] = [
  // QEMU docs/interop/qcow2.txt: "QFI\xfb" at offset 0 (qcow version 1 uses the same magic).
  { name: "qcow2", offset: 0, magic: Buffer.from([0x51, 0x46, 0x49, 0xfb]) },
  // VMware Virtual Disk Format 1.1, SparseExtentHeader.magicNumber 0x564d444b ("KDMV" in file order).
  { name: "vmdk", offset: 0, magic: Buffer.from("KDMV", "latin1") },
  // [MS-VHDX] 2.2.1 File Type Identifier signature.
  { name: "vhdx", offset: 0, magic: Buffer.from("vhdxfile", "latin1") },
  // QEMU block/vdi.c: VDI_SIGNATURE 0xbeda107f at offset 0x40, little endian.
  { name: "vdi", offset: 0x40, magic: Buffer.from([0x7f, 0x10, 0xda, 0xbe]) },
];

export interface ImageProbe {
  sizeBytes: number;
  /** Windows of 4096 bytes starting at multiples of this are candidates for a file's page. */
  alignmentBytes: number;
  /** Where the alignment comes from, for reports and logs. */
  alignmentSource: string;
}

/** Alignment option: a number of bytes, or "auto" (the ext2/3/4 block size, else 4096). */
export type AlignmentOption = number | "auto";

export function validateAlignment(alignmentBytes: number): void {
  if (
    !Number.isInteger(alignmentBytes) ||
    alignmentBytes < MIN_ALIGNMENT_BYTES ||
    alignmentBytes > PAGE_SIZE_BYTES ||
    PAGE_SIZE_BYTES % alignmentBytes !== 0
  )
    throw new RangeError(
      `alignment ${alignmentBytes} bytes is not usable: give a power of two from ${MIN_ALIGNMENT_BYTES} to ` +
        `${PAGE_SIZE_BYTES} (the filesystem block size, or 512 for any sector-aligned layout)`,
    );
}

/** Throws UnsupportedImageFormatError if `head` (the first bytes of the image) is a known non-raw format. */
export function refuseNonRaw(path: string, head: Buffer): void {
  for (const format of NON_RAW_FORMATS) {
    const end = format.offset + format.magic.length;
    if (head.length < end || !head.subarray(format.offset, end).equals(format.magic)) continue;
    throw new UnsupportedImageFormatError(
      path,
      format.name,
      `${path} is a ${format.name} image, and vmprune indexes raw disk images only: ${format.name} stores ` +
        `the guest's blocks wherever its own tables say (clusters are not at fixed offsets of the file), so a ` +
        `block of the guest disk cannot be referenced by its position. Convert it ` +
        `(qemu-img convert -f ${format.name} -O raw ${path} IMAGE.raw) or export the disk raw, and give ` +
        `vmprune that image; until then migrate with --drop free (without cache).`,
    );
  }
}

/** The block size of an ext2/3/4 filesystem starting at offset 0 of `head`, or null. */
export function extBlockSize(head: Buffer): number | null {
  if (head.length < EXT_SUPERBLOCK_OFFSET + EXT_MAGIC_OFFSET + 2) return null;
  if (head.readUInt16LE(EXT_SUPERBLOCK_OFFSET + EXT_MAGIC_OFFSET) !== EXT_MAGIC) return null;
  const log = EXT_MIN_BLOCK_LOG + head.readUInt32LE(EXT_SUPERBLOCK_OFFSET + EXT_LOG_BLOCK_SIZE_OFFSET);
  return log <= EXT_MAX_BLOCK_LOG ? 2 ** log : null;
}

/** Recognises the image (refusing non-raw formats) and settles the alignment. */
export async function probeImage(
  handle: FileHandle,
  path: string,
  alignment: AlignmentOption,
): Promise<ImageProbe> {
  const sizeBytes = (await handle.stat()).size;
  const head = Buffer.alloc(Math.min(PROBE_BYTES, sizeBytes));
  const { bytesRead } = await handle.read(head, 0, head.length, 0);
  const seen = head.subarray(0, bytesRead);
  refuseNonRaw(path, seen);
  if (alignment !== "auto") {
    validateAlignment(alignment);
    return { sizeBytes, alignmentBytes: alignment, alignmentSource: "given" };
  }
  const blockSize = extBlockSize(seen);
  if (blockSize !== null) {
    // Blocks larger than a page still hold pages at 4 KiB multiples of the block's start.
    const alignmentBytes = Math.min(blockSize, PAGE_SIZE_BYTES);
    return { sizeBytes, alignmentBytes, alignmentSource: `ext2/3/4 superblock: block size ${blockSize}` };
  }
  return {
    sizeBytes,
    alignmentBytes: PAGE_SIZE_BYTES,
    alignmentSource:
      "no ext2/3/4 superblock at offset 1024: assuming 4 KiB-aligned pages (4 KiB-block filesystem in " +
      "4 KiB-aligned partitions); give an alignment of 512 to index every sector-aligned window",
  };
}
