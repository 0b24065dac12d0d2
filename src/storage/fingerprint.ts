/**
 * The two hashes of a 4 KiB page.
 *
 * Sampled fingerprint (D3's cheap first filter): eight 64-bit words read at fixed offsets, mixed into a 64-bit key
 * held as two 32-bit halves. It reads 64 of the 4096 bytes, so it costs ~50 ns instead of the ~4 us of SHA-256 on
 * a 4 KiB page (measured by bench/storage-index.ts), but it says nothing about the 4032 bytes it skips: equal
 * fingerprints only make a block a candidate, which the strong hash (or the bytes) then confirms or rejects.
 *
 * Strong hash: SHA-256 (Node's OpenSSL, SHA-NI where the CPU has it), kept at its full 32 bytes. It is what the
 * receiver checks before a rebuilt page reaches the destination QEMU, the one barrier between a stale or forged
 * reference and a corrupted guest, so it must be collision resistant against a guest that chooses its page
 * contents; truncating to 16 bytes would save 16 bytes per 4096-byte page (0.4%) and is not worth an argument.
 */
import { hash } from "node:crypto";

export const REF_HASH_ALGORITHM = "sha256";
/** SHA-256 digest length (FIPS 180-4). */
export const REF_HASH_BYTES = 32;

/**
 * Byte offsets of the sampled 64-bit words: a stride of 536 (512 + 24) from 24, so the samples spread over the
 * whole page but do not fall on power-of-two boundaries where structured data (256-byte inodes, 512-byte sectors,
 * headers at offset 0) repeats the same values across blocks. Any offsets are correct; they only change how
 * often different blocks collide (counted as "false candidates" by the benchmark).
 */
export const SAMPLE_OFFSETS_BYTES: readonly number[] = [24, 560, 1096, 1632, 2168, 2704, 3240, 3776];

/** Murmur3's 32-bit constants and finaliser (Appleby, MurmurHash3, public domain). */
const C1 = 0xcc9e2d51;
const C2 = 0x1b873593;

function fmix32(value: number): number {
  let h = value;
  h ^= h >>> 16;
  h = Math.imul(h, 0x85ebca6b);
  h ^= h >>> 13;
  h = Math.imul(h, 0xc2b2ae35);
  h ^= h >>> 16;
  return h >>> 0;
}

/** A 64-bit key as two unsigned 32-bit halves. */
export interface Key64 {
  lo: number;
  hi: number;
}

/**
 * Sampled fingerprint of the 4096 bytes at `offset` of `buf`, written into `out` (no allocation: the index
 * computes it for every window of the image). Low half well mixed: the index uses it as the table slot.
 */
export function sampledFingerprint(buf: Buffer, offset: number, out: Key64): Key64 {
  let a = 0x9e3779b9;
  let b = 0x7f4a7c15;
  for (const sample of SAMPLE_OFFSETS_BYTES) {
    const lo = buf.readUInt32LE(offset + sample);
    const hi = buf.readUInt32LE(offset + sample + 4);
    a = Math.imul(a ^ Math.imul(lo, C1), C2);
    a = (((a << 13) | (a >>> 19)) + b) | 0;
    b = Math.imul(b ^ Math.imul(hi, C2), C1);
    b = (((b << 15) | (b >>> 17)) + a) | 0;
  }
  out.lo = fmix32(a ^ b);
  out.hi = fmix32((b + Math.imul(a, C1)) | 0);
  return out;
}

/** True if every sampled word of the window is zero (then the window may be all zero: check the bytes). */
export function sampledWordsZero(buf: Buffer, offset: number): boolean {
  for (const sample of SAMPLE_OFFSETS_BYTES)
    if (buf.readUInt32LE(offset + sample) !== 0 || buf.readUInt32LE(offset + sample + 4) !== 0) return false;
  return true;
}

/** SHA-256 of the 4096 bytes at `offset` of `buf` (a small Buffer from Node's shared pool). */
export function strongHash(buf: Buffer, offset = 0, length = 4096): Buffer {
  // One-shot crypto.hash (Node >= 20.12): no Hash object per page (3.0 vs 3.6 us per 4 KiB here). The digest as a
  // "binary" (latin1) string copied into the pool, not as a "buffer" digest: that is an ArrayBuffer of its own per
  // page, which the collector then tracks and frees. Measured here: 2.9 against 3.4 us of CPU per page (40,000
  // pages, 5 rounds). send and receive hash every cache page sent as a reference.
  return Buffer.from(hash(REF_HASH_ALGORITHM, buf.subarray(offset, offset + length), "binary"), "latin1");
}

/** The strong hash used as an index key (its first 8 bytes): the "no sampling" variant. */
export function strongHashKey(hash: Buffer, out: Key64): Key64 {
  out.lo = hash.readUInt32LE(0);
  out.hi = hash.readUInt32LE(4);
  return out;
}
