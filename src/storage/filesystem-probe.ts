/**
 * Which filesystems a disk holds and where: one at the disk's start, or one per partition of an MBR (with its
 * extended-partition chain) or GPT partition table. A few small reads per disk, never a scan.
 *
 * Partition tables: MBR, the 512-byte sector 0 with four 16-byte entries at 446 and the signature 0x55AA at 510
 * (type at +4, first LBA u32 at +8, sector count u32 at +12; type 0xEE is GPT's protective entry, 0x05/0x0F/0x85
 * an extended partition whose EBRs chain through their second entry). GPT (UEFI spec 2.10 §5.3): the header at
 * LBA 1 with "EFI PART", the entry array's LBA (u64 at 72), entry count (u32 at 80) and entry size (u32 at 84);
 * an entry has its type GUID at 0 (all zero: unused) and first/last LBA (u64) at 32/40. Sectors of 512 bytes,
 * and GPT also with 4096 (a disk of 4 KiB logical sectors puts the header at byte 4096).
 */
import type { BlockDevice } from "./block-device.ts";
import {
  EXT4_SUPERBLOCK_OFFSET,
  EXT4_SUPERBLOCK_SIZE,
  type Ext4Superblock,
  parseExt4Superblock,
} from "./ext4.ts";

export interface ProbedFilesystem {
  type: "ext4";
  /** The filesystem UUID, 32 lowercase hex digits (as the guest kernel's super_block.s_uuid holds it). */
  uuid: string;
  /** Where the filesystem starts on the disk (its partition's first byte, 0 for a whole-disk filesystem). */
  byteOffset: number;
  blockSize: number;
  /** Where the filesystem was found: "whole disk", "MBR partition 1", "GPT partition 2". */
  where: string;
  superblock: Ext4Superblock;
}

const MBR_SIGNATURE = 0xaa55;
const MBR_GPT_PROTECTIVE = 0xee;
const MBR_EXTENDED_TYPES = new Set([0x05, 0x0f, 0x85]);
const GPT_SIGNATURE = "EFI PART";
/** Bounds against hostile tables: entries read per GPT, EBRs followed. */
const MAX_GPT_ENTRY_BYTES = 128 * 1024;
const MAX_LOGICAL_PARTITIONS = 64;

interface Partition {
  byteOffset: number;
  where: string;
}

/** The ext4 filesystems on `device`. Read failures of single candidates are skipped; the disk itself must read. */
export async function probeFilesystems(device: BlockDevice): Promise<ProbedFilesystem[]> {
  const candidates: Partition[] = [{ byteOffset: 0, where: "whole disk" }];
  candidates.push(...(await partitions(device)));
  const found: ProbedFilesystem[] = [];
  const seen = new Set<number>();
  for (const c of candidates) {
    if (seen.has(c.byteOffset)) continue;
    seen.add(c.byteOffset);
    const sb = await tryRead(device, c.byteOffset + EXT4_SUPERBLOCK_OFFSET, EXT4_SUPERBLOCK_SIZE);
    const parsed = sb ? parseExt4Superblock(sb) : null;
    if (!parsed) continue;
    // A filesystem larger than what holds it is a stale superblock (or a partition that was shrunk).
    if (c.byteOffset + parsed.blocksCount * parsed.blockSize > device.sizeBytes) continue;
    found.push({
      type: "ext4",
      uuid: parsed.uuid,
      byteOffset: c.byteOffset,
      blockSize: parsed.blockSize,
      where: c.where,
      superblock: parsed,
    });
  }
  // A whole-disk hit inside a partitioned disk cannot be: a partition table would overwrite its first bytes.
  return found;
}

async function tryRead(device: BlockDevice, offset: number, length: number): Promise<Buffer | null> {
  if (offset < 0 || offset + length > device.sizeBytes) return null;
  try {
    return await device.read(offset, length);
  } catch {
    return null;
  }
}

async function partitions(device: BlockDevice): Promise<Partition[]> {
  const mbr = await tryRead(device, 0, 512);
  if (!mbr || mbr.readUInt16LE(510) !== MBR_SIGNATURE) return [];
  const out: Partition[] = [];
  for (let i = 0; i < 4; i++) {
    const at = 446 + i * 16;
    const type = mbr[at + 4] ?? 0;
    const first = mbr.readUInt32LE(at + 8);
    const count = mbr.readUInt32LE(at + 12);
    if (type === 0 || count === 0) continue;
    if (type === MBR_GPT_PROTECTIVE) {
      out.push(...(await gptPartitions(device, 512)), ...(await gptPartitions(device, 4096)));
      continue;
    }
    if (MBR_EXTENDED_TYPES.has(type)) {
      out.push(...(await logicalPartitions(device, first)));
      continue;
    }
    out.push({ byteOffset: first * 512, where: `MBR partition ${i + 1}` });
  }
  return out;
}

/** Logical partitions: each EBR's first entry is relative to that EBR, its second to the extended partition. */
async function logicalPartitions(device: BlockDevice, extendedLba: number): Promise<Partition[]> {
  const out: Partition[] = [];
  let ebrLba = extendedLba;
  const visited = new Set<number>();
  for (let n = 0; n < MAX_LOGICAL_PARTITIONS && !visited.has(ebrLba); n++) {
    visited.add(ebrLba);
    const ebr = await tryRead(device, ebrLba * 512, 512);
    if (!ebr || ebr.readUInt16LE(510) !== MBR_SIGNATURE) break;
    const first = ebr.readUInt32LE(446 + 8);
    if ((ebr[446 + 4] ?? 0) !== 0 && ebr.readUInt32LE(446 + 12) !== 0)
      out.push({ byteOffset: (ebrLba + first) * 512, where: `MBR logical partition ${5 + n}` });
    const next = ebr.readUInt32LE(462 + 8);
    if ((ebr[462 + 4] ?? 0) === 0 || next === 0) break;
    ebrLba = extendedLba + next;
  }
  return out;
}

async function gptPartitions(device: BlockDevice, sectorBytes: number): Promise<Partition[]> {
  const header = await tryRead(device, sectorBytes, 92);
  if (!header || header.toString("latin1", 0, 8) !== GPT_SIGNATURE) return [];
  const entriesLba = Number(header.readBigUInt64LE(72));
  const count = header.readUInt32LE(80);
  const size = header.readUInt32LE(84);
  if (size < 128 || size % 8 !== 0 || count === 0) return [];
  const bytes = Math.min(count * size, MAX_GPT_ENTRY_BYTES);
  const table = await tryRead(device, entriesLba * sectorBytes, bytes - (bytes % size));
  if (!table) return [];
  const out: Partition[] = [];
  for (let i = 0; (i + 1) * size <= table.length; i++) {
    const at = i * size;
    if (table.subarray(at, at + 16).every((b) => b === 0)) continue;
    const first = Number(table.readBigUInt64LE(at + 32));
    const last = Number(table.readBigUInt64LE(at + 40));
    if (first === 0 || last < first || !Number.isSafeInteger(first * sectorBytes)) continue;
    out.push({ byteOffset: first * sectorBytes, where: `GPT partition ${i + 1}` });
  }
  return out;
}
