/**
 * Constants of QEMU's multifd channels (the extra connections of a migration with the `multifd` capability), as
 * QEMU 7.2 and 10.0 write them. References are to QEMU's sources as `path@vX.Y.Z:LINE` (Debian's source packages
 * 1:7.2+dfsg-7 and 1:10.0.2+ds-2); ../shared/docs/qemu-migration-stream.md §5 collects them with context.
 *
 * One channel, big-endian throughout:
 *
 *   MultiFDInit_t (64 bytes, once)    magic 0x11223344 | version 1 | uuid[16] | channel id u8 | unused
 *   then packets, each:
 *     RAM packet header               magic | version | flags | pages_alloc | normal_pages | next_packet_size |
 *       (320 + 8 x PAGE_COUNT bytes)  packet_num u64 | zero_pages (9.0+) | unused | ramblock[256] |
 *                                     offsets[PAGE_COUNT] u64: normal pages first, then zero pages (9.0+)
 *     RAM payload                     uncompressed: normal_pages x page size, in offset order;
 *                                     compressed: next_packet_size bytes (none when normal_pages is 0)
 *   or (10.0+, VFIO)
 *     device-state header (276 bytes) magic | version | flags with DEVICE_STATE | idstr[256] | instance_id |
 *                                     next_packet_size
 *     device-state payload            next_packet_size bytes
 *
 * The receiver reads a RAM header of a fixed size computed from its own page size, whatever pages_alloc says
 * (multifd.c@v7.2.0:1191-1192, @v10.0.2:1480-1481): so does the parser.
 */

/** `MULTIFD_MAGIC`: multifd.c@v7.2.0:34, @v10.0.2:41. Also the first 4 bytes of every packet. */
export const MULTIFD_MAGIC = 0x11223344;
/** `MULTIFD_VERSION`: multifd.c@v7.2.0:35, @v10.0.2:42 (still 1). */
export const MULTIFD_VERSION = 1;

/** `sizeof(MultiFDInit_t)`, packed: 4 + 4 + 16 + 1 + 7 + 32 (multifd.c@v7.2.0:37-44, @v10.0.2:44-51). */
export const INIT_BYTES = 64;
/** Field offsets in MultiFDInit_t. */
export const INIT = { magic: 0, version: 4, uuid: 8, uuidBytes: 16, channelId: 24 } as const;

/** Packet flags: multifd.h@v7.2.0:27-34, @v10.0.2:53-69. */
export const MULTIFD_FLAG = {
  SYNC: 0x01,
  /** Compression method bits: 3 bits in 7.2 (`7 << 1`), 5 in 10.0 (`0x1f << 1`). */
  COMPRESSION_MASK: 0x3e,
  ZLIB: 0x02,
  ZSTD: 0x04,
  /** 9.1+ (multifd.h@v10.0.2:61-63). */
  QPL: 0x08,
  UADK: 0x10,
  QATZIP: 0x20,
  /** 10.0+: the packet is a MultiFDPacketDeviceState_t (multifd.h@v10.0.2:65-69). */
  DEVICE_STATE: 0x40,
} as const;

/** The compression method a packet's flags name (for reports). */
export const COMPRESSION_NAMES: Readonly<Record<number, string>> = {
  [MULTIFD_FLAG.ZLIB]: "zlib",
  [MULTIFD_FLAG.ZSTD]: "zstd",
  [MULTIFD_FLAG.QPL]: "qpl",
  [MULTIFD_FLAG.UADK]: "uadk",
  [MULTIFD_FLAG.QATZIP]: "qatzip",
};

/** `MULTIFD_PACKET_SIZE`: the payload one RAM packet can carry, uncompressed (multifd.h@v7.2.0:37, @v10.0.2:72). */
export const PACKET_DATA_BYTES = 512 * 1024;

/**
 * `sizeof(MultiFDPacket_t)` without the offsets: 320 bytes in both layouts (multifd.h@v7.2.0:39-53: 12 + 12 + 8 +
 * unused[4] + 256; @v10.0.2:74-101: hdr 12 + 12 + 8 + zero_pages 4 + unused32 4 + unused64 24 + 256).
 */
export const RAM_HEADER_FIXED_BYTES = 320;
/** Field offsets in a RAM packet header; `zeroPages` sits where 7.2 has unused[0]'s first half (always 0 there). */
export const RAM = {
  magic: 0,
  version: 4,
  flags: 8,
  pagesAlloc: 12,
  normalPages: 16,
  nextPacketSize: 20,
  packetNum: 24,
  zeroPages: 32,
  ramBlock: 64,
  ramBlockBytes: 256,
  offsets: 320,
} as const;

/** `sizeof(MultiFDPacketDeviceState_t)`: hdr 12 + idstr 256 + instance_id 4 + next_packet_size 4 (multifd.h@v10.0.2:103-111). */
export const DEVICE_STATE_HEADER_BYTES = 276;
export const DEVICE_STATE = { idstr: 12, idstrBytes: 256, instanceId: 268, nextPacketSize: 272 } as const;

/** The common packet prefix (`MultiFDPacketHdr_t`, multifd.h@v10.0.2:74-78): magic, version, flags. */
export const PACKET_PREFIX_BYTES = 12;

/** Pages per RAM packet for a target page size: `multifd_ram_page_count()` (multifd.h@v10.0.2:391-394). */
export function pageCount(pageSizeBytes: number): number {
  return PACKET_DATA_BYTES / pageSizeBytes;
}

/** Bytes of a RAM packet header on the wire for a target page size: 1344 for 4 KiB pages. */
export function ramHeaderBytes(pageSizeBytes: number): number {
  return RAM_HEADER_FIXED_BYTES + 8 * pageCount(pageSizeBytes);
}
