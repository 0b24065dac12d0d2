/**
 * The one rewrite of a multifd RAM packet vmprune makes: some of its normal pages go as zero pages instead. For
 * each moved page its offset leaves the normal list for the zero list (after the kept normal pages, before the
 * zero pages QEMU listed itself), its bytes leave the payload, normal_pages - 1, zero_pages + 1,
 * next_packet_size - page size; pages_alloc, packet_num, the flags and the block stay. Only for an uncompressed
 * packet, and only for a destination that reads the zero list (QEMU 9.0+: `multifd_recv_zero_page_process`,
 * multifd-zero-page.c@v10.0.2:84-95; a 7.2 receiver ignores the field, and the page would keep stale bytes).
 */
import { compressionOf, type RamPacketHeader } from "./multifd.ts";
import { MULTIFD_FLAG, RAM } from "./multifd-wire.ts";

export interface WholeRamPacket {
  /** The header as it came (not modified). */
  headerBytes: Buffer;
  header: RamPacketHeader;
  /** normal_pages x page size bytes, in the order of the normal offsets. */
  payload: Buffer;
}

/**
 * The packet with the normal pages at `moved` (indices into its normal list) turned into zero pages: a new header,
 * then the kept pages' bytes (views of `payload`, one per run of kept pages).
 */
export function moveToZeroList(
  packet: WholeRamPacket,
  moved: ReadonlySet<number>,
  pageSizeBytes: number,
): Buffer[] {
  const { header, headerBytes, payload } = packet;
  const normal = header.normalPages;
  if (compressionOf(header.flags) !== 0 || header.flags & MULTIFD_FLAG.DEVICE_STATE)
    throw new RangeError(`packet ${header.packetNum}: only an uncompressed RAM packet can be rewritten`);
  if (payload.length !== normal * pageSizeBytes || header.nextPacketSize !== payload.length)
    throw new RangeError(
      `packet ${header.packetNum}: ${payload.length} payload bytes and next_packet_size ${header.nextPacketSize} for ${normal} pages`,
    );
  for (const i of moved)
    if (!Number.isInteger(i) || i < 0 || i >= normal)
      throw new RangeError(`packet ${header.packetNum}: no normal page ${i} among ${normal}`);
  if (moved.size === 0) return [headerBytes, payload];

  const out = Buffer.from(headerBytes);
  const kept: number[] = [];
  const zeroed: number[] = [];
  for (let i = 0; i < normal; i++) (moved.has(i) ? zeroed : kept).push(header.offsets[i] as number);
  const order = [...kept, ...zeroed, ...header.offsets.slice(normal)];
  out.writeUInt32BE(kept.length, RAM.normalPages);
  out.writeUInt32BE(header.nextPacketSize - moved.size * pageSizeBytes, RAM.nextPacketSize);
  out.writeUInt32BE(header.zeroPages + moved.size, RAM.zeroPages);
  order.forEach((offset, i) => {
    out.writeBigUInt64BE(BigInt(offset), RAM.offsets + 8 * i);
  });

  const buffers: Buffer[] = [out];
  let runStart = -1;
  for (let i = 0; i <= normal; i++) {
    const keep = i < normal && !moved.has(i);
    if (keep && runStart < 0) runStart = i;
    if (!keep && runStart >= 0) {
      buffers.push(payload.subarray(runStart * pageSizeBytes, i * pageSizeBytes));
      runStart = -1;
    }
  }
  return buffers;
}
