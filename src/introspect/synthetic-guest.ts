/**
 * Synthetic guest memory for tests and benchmarks: an x86-64 Linux-like kernel laid out in a Buffer, with the
 * structures introspection reads (page tables, VMCOREINFO note and page, init_uts_ns, mem_section, struct
 * pages), built the way the real kernel builds them (../shared/docs/linux-page-introspection.md §1-2). Tests
 * then corrupt them on purpose. Not used by production code.
 */
import { START_KERNEL_MAP } from "./address-space.ts";

const MASK64 = (1n << 64n) - 1n;
export const SIZE_4K = 4096;
export const SIZE_2M = 2 * 1024 * 1024;
export const SIZE_1G = 1024 * 1024 * 1024;

/** Page tables in a buffer: a bump allocator of table pages in [poolStart, poolEnd). */
export class PageTableBuilder {
  readonly root: number;
  private next: number;

  constructor(
    readonly buf: Buffer,
    readonly levels: 4 | 5,
    poolStart: number,
    private readonly poolEnd: number,
    root?: number,
  ) {
    this.next = poolStart;
    this.root = root ?? this.allocTable();
    if (root !== undefined) buf.fill(0, root, root + SIZE_4K);
  }

  allocTable(): number {
    if (this.next + SIZE_4K > this.poolEnd) throw new Error("synthetic page-table pool exhausted");
    const pa = this.next;
    this.next += SIZE_4K;
    this.buf.fill(0, pa, pa + SIZE_4K);
    return pa;
  }

  static index(va: bigint, level: number): number {
    return Number((va >> BigInt(12 + 9 * (level - 1))) & 511n);
  }

  /** Maps one page of `size` at `va` to `pa` (flags: present | rw, plus PSE for large pages). */
  map(va: bigint, pa: number, size: number = SIZE_4K, extraFlags = 0n): void {
    const leafLevel = size === SIZE_1G ? 3 : size === SIZE_2M ? 2 : 1;
    let table = this.root;
    for (let level = this.levels; level > leafLevel; level--) {
      const at = table + PageTableBuilder.index(va, level) * 8;
      let entry = this.buf.readBigUInt64LE(at);
      if ((entry & 1n) === 0n) {
        entry = BigInt(this.allocTable()) | 0x63n;
        this.buf.writeBigUInt64LE(entry, at);
      }
      table = Number(entry & 0x000ffffffffff000n);
    }
    const flags = 0x63n | (leafLevel > 1 ? 0x80n : 0n) | extraFlags;
    this.buf.writeBigUInt64LE(BigInt(pa) | flags, table + PageTableBuilder.index(va, leafLevel) * 8);
  }

  /** Maps [va, va+length) to [pa, …) with pages of `size`. */
  mapRange(va: bigint, pa: number, length: number, size: number): void {
    for (let off = 0; off < length; off += size) this.map((va + BigInt(off)) & MASK64, pa + off, size);
  }
}

export interface SyntheticKernelOptions {
  levels?: 4 | 5;
  release?: string;
  /** Where the kernel image lives physically (2 MiB aligned, 4 MiB long). */
  imagePa?: number;
  /** Its virtual address (2 MiB aligned, ≥ START_KERNEL_MAP): phys_base = imagePa - (imageVa - START). */
  imageVa?: bigint;
  /** A 2 MiB-aligned region for page tables. */
  tablesPa?: number;
  /** 2 MiB of struct pages (vmemmap backing for PFNs 0..32767). */
  memmapPa?: number;
  /** A page-aligned area of 64 KiB for mem_section and the two VMCOREINFO copies. */
  miscPa?: number;
  /** Virtual bases of the direct map and vmemmap (defaults: the unrandomized ones, doc §2.3). */
  directMapBase?: bigint;
  vmemmapBase?: bigint;
  /** Map the direct map with 1 GiB pages (default) or 2 MiB pages. */
  directMapPageSize?: number;
  /** Extra VMCOREINFO lines, or overrides (same key replaces). */
  extra?: Record<string, string>;
  /** Write struct pages for PFNs below the end of the buffer (default true). */
  writeStructPages?: boolean;
}

export interface SyntheticKernel {
  release: string;
  levels: 4 | 5;
  physBase: bigint;
  rootPa: number;
  stext: bigint;
  stextPa: number;
  notePa: number;
  dataPagePa: number;
  vmemmapBase: bigint;
  directMapBase: bigint;
  memSectionVa: bigint;
  tables: PageTableBuilder;
  text: string;
  /** Writes a struct page (6.1 layout: flags @0, private @40, _mapcount @48, _refcount @52). */
  setStructPage(
    pfn: number,
    fields: { flags?: bigint; mapcount?: number; refcount?: number; private?: bigint },
  ): void;
}

/** Struct page size and field offsets of Debian's 6.1 (VMCOREINFO OFFSET(page.*), doc §1.1). */
export const STRUCT_PAGE = { size: 64, flags: 0, private: 40, mapcount: 48, refcount: 52 } as const;
/** 6.1 PAGE_BUDDY_MAPCOUNT_VALUE (include/linux/page-flags.h: ~PG_buddy with PG_buddy 0x80). */
export const BUDDY_MAPCOUNT_61 = -129;

/**
 * Builds a kernel into `buf` (which must be ≥ 32 MiB for the defaults). The buffer is the guest's RAM from
 * GPA 0; mem_section has one root whose first section (PFNs 0..32767) is present.
 */
export function buildSyntheticKernel(buf: Buffer, options: SyntheticKernelOptions = {}): SyntheticKernel {
  const levels = options.levels ?? 4;
  const release = options.release ?? "6.1.0-99-cloud-amd64";
  const imagePa = options.imagePa ?? 0x200000;
  const imageVa = options.imageVa ?? 0xffffffffa0000000n;
  const tablesPa = options.tablesPa ?? 0x600000;
  const memmapPa = options.memmapPa ?? 0x800000;
  const miscPa = options.miscPa ?? 0xa00000;
  const directMapBase = options.directMapBase ?? (levels === 5 ? 0xff11000000000000n : 0xffff888000000000n);
  const vmemmapBase = options.vmemmapBase ?? (levels === 5 ? 0xffd4000000000000n : 0xffffea0000000000n);
  const physBase = BigInt(imagePa) - (imageVa - START_KERNEL_MAP);
  // The top-level table is part of the kernel image (init_top_pgt lives in .data): image + 2 MiB.
  const rootPa = imagePa + SIZE_2M;
  const tables = new PageTableBuilder(buf, levels, tablesPa, tablesPa + SIZE_2M, rootPa);
  // Kernel image: 4 MiB with 2 MiB pages.
  tables.mapRange(imageVa, imagePa, 2 * SIZE_2M, SIZE_2M);
  // Direct map of all RAM.
  const dmSize = options.directMapPageSize ?? SIZE_1G;
  const ram = Math.ceil(buf.length / dmSize) * dmSize;
  tables.mapRange(directMapBase, 0, ram, dmSize);
  // vmemmap: struct pages of PFNs 0..32767 (one section), 2 MiB-mapped.
  tables.map(vmemmapBase, memmapPa, SIZE_2M);
  // init_uts_ns: at image + 1 MiB; release at name + 130.
  const utsVa = imageVa + 0x100000n;
  const utsPa = imagePa + 0x100000;
  buf.fill(0, utsPa, utsPa + 390);
  buf.write("Linux", utsPa, "latin1");
  buf.write(release, utsPa + 130, "latin1");
  // mem_section: root array (1 pointer used) at misc, root page at misc + 4 KiB, section 0 present.
  const rootArrayPa = miscPa;
  const rootPagePa = miscPa + SIZE_4K;
  buf.fill(0, rootArrayPa, rootArrayPa + 2 * SIZE_4K);
  const memSectionVa = directMapBase + BigInt(rootArrayPa);
  buf.writeBigUInt64LE(directMapBase + BigInt(rootPagePa), rootArrayPa);
  // SECTION_MARKED_PRESENT | HAS_MEM_MAP | ONLINE | EARLY, coded = vmemmap base (section 0 starts at PFN 0).
  buf.writeBigUInt64LE(vmemmapBase | 0xfn, rootPagePa);
  const stext = imageVa;
  const stextPa = imagePa;
  const lines: Record<string, string> = {
    OSRELEASE: release,
    "BUILD-ID": "0123456789abcdef0123456789abcdef01234567",
    PAGESIZE: "4096",
    "SYMBOL(init_uts_ns)": utsVa.toString(16),
    "OFFSET(uts_namespace.name)": "0",
    "SYMBOL(swapper_pg_dir)": (imageVa + BigInt(SIZE_2M)).toString(16),
    "SYMBOL(_stext)": stext.toString(16),
    "SYMBOL(mem_section)": memSectionVa.toString(16),
    "LENGTH(mem_section)": String(levels === 5 ? 262144 : 4096),
    "SIZE(mem_section)": "32",
    "OFFSET(mem_section.section_mem_map)": "0",
    "NUMBER(SECTION_SIZE_BITS)": "27",
    "NUMBER(MAX_PHYSMEM_BITS)": String(levels === 5 ? 52 : 46),
    "SIZE(page)": "64",
    "OFFSET(page.flags)": "0",
    "OFFSET(page.private)": "40",
    "OFFSET(page._mapcount)": "48",
    "OFFSET(page._refcount)": "52",
    "LENGTH(zone.free_area)": "11",
    "NUMBER(PAGE_BUDDY_MAPCOUNT_VALUE)": String(BUDDY_MAPCOUNT_61),
    "NUMBER(phys_base)": physBase.toString(10),
    "SYMBOL(init_top_pgt)": (imageVa + BigInt(SIZE_2M)).toString(16),
    "NUMBER(pgtable_l5_enabled)": levels === 5 ? "1" : "0",
    KERNELOFFSET: (imageVa - 0xffffffff81000000n).toString(16).replace("-", ""),
    "NUMBER(sme_mask)": "0",
    ...options.extra,
  };
  const text = `${Object.entries(lines)
    .map(([k, v]) => `${k}=${v}`)
    .join("\n")}\n`;
  // The ELF note (doc §1.2) at misc + 16 KiB and the data page at misc + 32 KiB.
  const notePa = miscPa + 0x4000;
  buf.fill(0, notePa, notePa + 2 * SIZE_4K);
  buf.writeUInt32LE(11, notePa);
  buf.writeUInt32LE(text.length, notePa + 4);
  buf.writeUInt32LE(0, notePa + 8);
  buf.write("VMCOREINFO\0\0", notePa + 12, "latin1");
  buf.write(text, notePa + 24, "latin1");
  const dataPagePa = miscPa + 0x8000;
  buf.fill(0, dataPagePa, dataPagePa + SIZE_4K);
  buf.write(text, dataPagePa, "latin1");
  const setStructPage: SyntheticKernel["setStructPage"] = (pfn, f) => {
    const at = memmapPa + pfn * STRUCT_PAGE.size;
    if (pfn >= 32768) throw new Error("synthetic memmap covers PFNs 0..32767");
    buf.fill(0, at, at + STRUCT_PAGE.size);
    buf.writeBigUInt64LE(f.flags ?? 0n, at + STRUCT_PAGE.flags);
    buf.writeBigUInt64LE(f.private ?? 0n, at + STRUCT_PAGE.private);
    buf.writeInt32LE(f.mapcount ?? -1, at + STRUCT_PAGE.mapcount);
    buf.writeInt32LE(f.refcount ?? 1, at + STRUCT_PAGE.refcount);
  };
  if (options.writeStructPages ?? true)
    for (let pfn = 0; pfn < Math.min(32768, buf.length / SIZE_4K); pfn++) setStructPage(pfn, {});
  return {
    release,
    levels,
    physBase,
    rootPa,
    stext,
    stextPa,
    notePa,
    dataPagePa,
    vmemmapBase,
    directMapBase,
    memSectionVa,
    tables,
    text,
    setStructPage,
  };
}
