/**
 * The guest kernel's virtual address space: an x86-64 page-table walk over guest-physical memory
 * (../shared/docs/linux-page-introspection.md §2; makedumpfile arch/x86_64.c `__vtop4_x86_64`).
 *
 * - 4-level (PML4 → PUD → PMD → PTE) or 5-level (PML5 first) paging, 1 GiB pages at the PUD and 2 MiB pages at
 *   the PMD (PSE, bit 7), the large-page base masked to its alignment because bit 12 is PAT there.
 * - Entry address bits 12..51 (arch/x86/include/asm/pgtable_types.h, __PHYSICAL_MASK_SHIFT 52), minus the AMD
 *   SME C-bit (`NUMBER(sme_mask)`).
 * - Untrusted tables: one walk reads at most one entry per level, so a cyclic or self-referencing table cannot
 *   loop; a table outside guest RAM or PSE where the architecture reserves it is a TranslationError.
 * - A bounded translation cache (4 KiB and 2 MiB granules), cleared when full. It assumes the kernel mappings
 *   it caches do not change while it is used: true of a paused guest, and of the direct map and vmemmap of a
 *   running one outside memory hotplug; call clearCache() whenever that is in doubt.
 *
 * Addresses: virtual addresses are bigint (64-bit), guest-physical addresses are numbers (≤ 52 bits).
 */
import { hex, IntrospectError, TranslationError } from "./errors.ts";
import type { GuestMemory } from "./guest-memory.ts";

/** `__START_KERNEL_map`: base of the kernel image mapping (arch/x86/include/asm/page_64_types.h). */
export const START_KERNEL_MAP = 0xffffffff80000000n;
const MASK64 = (1n << 64n) - 1n;
const TWO32 = 2 ** 32;
/** Present (bit 0) and PSE/large page (bit 7): arch/x86/include/asm/pgtable_types.h. */
const PTE_PRESENT = 0x1;
const PTE_PSE = 0x80;
const SIZE_4K = 4096;
const SIZE_2M = 2 * 1024 * 1024;
const SIZE_1G = 1024 * 1024 * 1024;

export type PagingLevels = 4 | 5;

export interface AddressSpaceConfig {
  /** Guest-physical address of the top-level table (PML4, or PML5 with 5-level paging). */
  rootPa: number;
  levels: PagingLevels;
  /** `NUMBER(sme_mask)`: the memory-encryption bit to clear from entries (0 on ordinary guests). */
  smeMask?: bigint;
  /** Entries per translation cache (4 KiB and 2 MiB granules each); default 65536. */
  cacheEntries?: number;
}

/** `(a + b) mod 2^64` for kernel address arithmetic (phys_base may be negative). */
export function add64(a: bigint, b: bigint): bigint {
  return (a + b) & MASK64;
}

/** `__pa_symbol(x) = x - __START_KERNEL_map + phys_base` (arch/x86/include/asm/page_64.h), mod 2^64. */
export function kernelImagePa(symbol: bigint, physBase: bigint): bigint {
  return (symbol - START_KERNEL_MAP + physBase) & MASK64;
}

export class AddressSpace {
  readonly rootPa: number;
  readonly levels: PagingLevels;
  /** Walks done (cache misses) and cache hits, for benchmarks. */
  readonly stats = { walks: 0, hits: 0 };
  private readonly smeLo: number;
  private readonly smeHi: number;
  private readonly cacheEntries: number;
  private readonly small = new Map<number, number>();
  private readonly large = new Map<number, number>();
  private readonly entry = Buffer.alloc(8);
  /** Size of the mapping found by the last successful translation (4 KiB, 2 MiB or 1 GiB). */
  private lastSize = SIZE_4K;

  constructor(
    readonly memory: GuestMemory,
    config: AddressSpaceConfig,
  ) {
    if (
      !Number.isSafeInteger(config.rootPa) ||
      config.rootPa % SIZE_4K !== 0 ||
      !memory.contains(config.rootPa, SIZE_4K)
    )
      throw new TranslationError(
        "bad-page-table",
        0n,
        config.levels,
        `page-table root ${hex(config.rootPa)} is not a page of guest RAM`,
      );
    this.rootPa = config.rootPa;
    this.levels = config.levels;
    const sme = config.smeMask ?? 0n;
    this.smeLo = Number(sme & 0xffffffffn);
    this.smeHi = Number((sme >> 32n) & 0xffffffffn);
    this.cacheEntries = Math.max(16, config.cacheEntries ?? 65536);
  }

  clearCache(): void {
    this.small.clear();
    this.large.clear();
  }

  /** The guest-physical address of `va`; throws TranslationError if the tables do not map it. */
  translate(va: bigint): number {
    return this.walk(va, true);
  }

  /** Like translate, but -1 instead of an error (for hot loops over untrusted pointers). */
  tryTranslate(va: bigint): number {
    return this.walk(va, false);
  }

  /** Size of the page (4 KiB, 2 MiB, 1 GiB) mapping `va`, or 0 if unmapped. */
  pageSize(va: bigint): number {
    this.clearCacheFor(va);
    return this.walk(va, false) < 0 ? 0 : this.lastSize;
  }

  private clearCacheFor(va: bigint): void {
    const hi = Number((va >> 32n) & 0xffffffffn);
    const lo = Number(va & 0xffffffffn);
    this.small.delete(hi * 2 ** 20 + (lo >>> 12));
    this.large.delete(hi * 2 ** 11 + (lo >>> 21));
  }

  private walk(va: bigint, throwing: boolean): number {
    const hi = Number((va >> 32n) & 0xffffffffn);
    const lo = Number(va & 0xffffffffn);
    const key2m = hi * 2 ** 11 + (lo >>> 21);
    const big = this.large.get(key2m);
    if (big !== undefined) {
      this.stats.hits++;
      this.lastSize = SIZE_2M;
      return big + (lo & (SIZE_2M - 1));
    }
    const key4k = hi * 2 ** 20 + (lo >>> 12);
    const frame = this.small.get(key4k);
    if (frame !== undefined) {
      this.stats.hits++;
      this.lastSize = SIZE_4K;
      return frame + (lo & (SIZE_4K - 1));
    }
    this.stats.walks++;
    // Canonical: bits 63..47 (4-level) or 63..56 (5-level) are copies of bit 47/56.
    const top = this.levels === 5 ? hi >>> 24 : hi >>> 15;
    const ones = this.levels === 5 ? 0xff : 0x1ffff;
    if (top !== 0 && top !== ones) return this.fail(throwing, "non-canonical", va, 0, "not canonical");
    let table = this.rootPa;
    for (let level: number = this.levels; level >= 1; level--) {
      const index =
        level === 5
          ? (hi >>> 16) & 511
          : level === 4
            ? (hi >>> 7) & 511
            : level === 3
              ? ((hi & 0x7f) << 2) | (lo >>> 30)
              : level === 2
                ? (lo >>> 21) & 511
                : (lo >>> 12) & 511;
      const at = table + index * 8;
      if (!this.memory.contains(at, 8))
        return this.fail(
          throwing,
          "bad-page-table",
          va,
          level,
          `level-${level} table ${hex(table)} is not RAM`,
        );
      try {
        this.memory.readInto(at, this.entry, 0, 8);
      } catch (error) {
        if (!throwing) return -1;
        throw new TranslationError(
          "bad-page-table",
          va,
          level,
          `level-${level} entry at ${hex(at)}: ${(error as Error).message}`,
        );
      }
      const eLo = this.entry.readUInt32LE(0);
      const eHi = this.entry.readUInt32LE(4);
      if ((eLo & PTE_PRESENT) === 0)
        return this.fail(throwing, "not-mapped", va, level, `not present at level ${level}`);
      const addr = (eHi & 0xfffff & ~this.smeHi) * TWO32 + ((eLo & 0xfffff000 & ~this.smeLo) >>> 0);
      if (level === 1) {
        this.cacheSet(this.small, key4k, addr);
        this.lastSize = SIZE_4K;
        return addr + (lo & (SIZE_4K - 1));
      }
      if ((eLo & PTE_PSE) !== 0) {
        if (level === 3) {
          const base = addr - (addr % SIZE_1G);
          // Cache the 2 MiB granule of the 1 GiB page that holds va.
          const chunk = base + (lo & (SIZE_1G - 1) & ~(SIZE_2M - 1));
          this.cacheSet(this.large, key2m, chunk);
          this.lastSize = SIZE_1G;
          return base + (lo & (SIZE_1G - 1));
        }
        if (level === 2) {
          const base = addr - (addr % SIZE_2M);
          this.cacheSet(this.large, key2m, base);
          this.lastSize = SIZE_2M;
          return base + (lo & (SIZE_2M - 1));
        }
        return this.fail(throwing, "bad-page-table", va, level, `PSE set at level ${level} (reserved)`);
      }
      table = addr;
    }
    return this.fail(throwing, "bad-page-table", va, 0, "walk did not end");
  }

  private fail(
    throwing: boolean,
    code: "not-mapped" | "non-canonical" | "bad-page-table",
    va: bigint,
    level: number,
    detail: string,
  ): number {
    if (throwing) throw new TranslationError(code, va, level, detail);
    return -1;
  }

  private cacheSet(map: Map<number, number>, key: number, value: number): void {
    if (map.size >= this.cacheEntries) map.clear();
    map.set(key, value);
  }

  /**
   * Reads `length` bytes at virtual address `va` into `into` at `offset`, one positional read per physically
   * contiguous run (a 2 MiB-mapped region is one read). Throws TranslationError or GuestMemoryError.
   */
  readVirt(va: bigint, into: Uint8Array, offset = 0, length = into.length - offset): void {
    if (length < 0 || offset < 0 || offset + length > into.length)
      throw new IntrospectError("read-failed", `bad virtual read of ${length} bytes at ${hex(va)}`);
    let done = 0;
    let runPa = -1;
    let runStart = 0;
    let runLength = 0;
    let cur = va;
    while (done < length) {
      const pa = this.walk(cur, true);
      const size = this.lastSize;
      const lo = Number(cur & 0xffffffffn);
      const n = Math.min(length - done, size - (lo & (size - 1)));
      if (runPa >= 0 && runPa + runLength === pa) runLength += n;
      else {
        if (runPa >= 0) this.memory.readInto(runPa, into, offset + runStart, runLength);
        runPa = pa;
        runStart = done;
        runLength = n;
      }
      done += n;
      cur = (cur + BigInt(n)) & MASK64;
    }
    if (runPa >= 0) this.memory.readInto(runPa, into, offset + runStart, runLength);
  }

  /** Like readVirt, but false instead of an error. */
  tryReadVirt(va: bigint, into: Uint8Array, offset = 0, length = into.length - offset): boolean {
    try {
      this.readVirt(va, into, offset, length);
      return true;
    } catch (error) {
      if (error instanceof IntrospectError) return false;
      throw error;
    }
  }

  readU64(va: bigint): bigint {
    this.readVirt(va, this.entry, 0, 8);
    return this.entry.readBigUInt64LE(0);
  }

  /** A NUL-terminated Latin-1 string of at most `maxLength` bytes at `va`. */
  readCString(va: bigint, maxLength: number): string {
    const buf = Buffer.alloc(Math.min(maxLength, 4096));
    this.readVirt(va, buf);
    const end = buf.indexOf(0);
    return buf.toString("latin1", 0, end < 0 ? buf.length : end);
  }
}
