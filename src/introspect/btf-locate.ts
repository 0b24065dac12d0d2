/**
 * Finds the kernel's BTF blob (the `.BTF` section, CONFIG_DEBUG_INFO_BTF) in guest memory, for btf.ts to
 * parse (../shared/docs/kernel-layouts.md §6). Two ways, each giving candidates the caller must still check
 * against VMCOREINFO before trusting one:
 *
 * - kallsyms (6.0+): `__start_BTF`/`__stop_BTF` (include/asm-generic/vmlinux.lds.h puts the section in the
 *   kernel image's read-only data between those two symbols), read through the kernel's high mapping.
 * - image scan (kernels whose VMCOREINFO has no kallsyms tables, e.g. Debian's 5.10): the BTF header magic
 *   `9f eb 01 00 18 00 00 00` (include/uapi/linux/btf.h: magic 0xeB9F, version 1, flags 0, hdr_len 24)
 *   searched only in the live kernel image, never in the rest of RAM: old kernel images survive reboots and
 *   kexec, and user memory can hold anything (kernel-layouts.md §5).
 *
 * The live image (kernelImageRange): the kernel's high mapping (__START_KERNEL_map + phys_base,
 * page_64_types.h) from `SYMBOL(_stext)` (= `_text` on x86-64, arch/x86/kernel/vmlinux.lds.S) forward. At
 * boot cleanup_highmap() (arch/x86/mm/init_64.c) clears every PMD of that mapping outside [_text,
 * roundup(_brk_end, 2 MiB)), so the mapping ends near the image's end; but inside it, what
 * free_kernel_image_pages() (arch/x86/mm/init.c) gives back — the text/rodata and rodata/data gaps, initmem —
 * is unmapped only with PTI, and otherwise stays mapped while the buddy allocator hands those pages to
 * anyone, as it does the pages between _end and the 2 MiB boundary. So a page counts as image only when it is
 * mapped linearly (VA - __START_KERNEL_map + phys_base) and its struct page has every low flag bit `_stext`'s
 * page has: PG_reserved (memblock reserved the image, and freeing a page clears it, mm/page_alloc.c
 * free_reserved_page()). More bits are fine: the vDSO pages in rodata are also PG_referenced and mapped by
 * processes. Seen on Debian 6.1: text, rodata, data, bss and brk come out as image; the text/rodata and
 * rodata/data gaps, initmem, the unused `.bss..decrypted` tail and the brk pages past _brk_end (reused by
 * slab) do not. The walk stops after 16 MiB without an image page, at 128 MiB, or at the end of the kernel
 * image area (KERNEL_IMAGE_SIZE).
 */
import type { AddressSpace } from "./address-space.ts";
import { kernelImagePa, START_KERNEL_MAP } from "./address-space.ts";
import { hex, IntrospectError } from "./errors.ts";
import { hasKallsyms, type Kallsyms, KallsymsError, openKallsyms } from "./kallsyms.ts";
import type { MemMap } from "./memmap.ts";
import type { VmcoreInfo } from "./vmcoreinfo.ts";

const PAGE = 4096;
/** `struct btf_header` (include/uapi/linux/btf.h): 24 bytes, magic 0xeB9F, version 1. */
export const BTF_HEADER_BYTES = 24;
const BTF_MAGIC = 0xeb9f;
const BTF_VERSION = 1;
/** The first 8 bytes of every vmlinux BTF: magic, version 1, flags 0, hdr_len 24 (little-endian x86-64). */
export const BTF_HEADER_PREFIX = Buffer.from([0x9f, 0xeb, 0x01, 0x00, 0x18, 0x00, 0x00, 0x00]);
/** A distro vmlinux BTF is 3.5-5 MB (lab: 5.10 3.5 MB, 6.1 4.1 MB, 6.12 4.7 MB); 64 MiB bounds it. */
export const MAX_BTF_BYTES = 64 * 1024 * 1024;
/** Hard cap on the image walk (a Debian image is 30-60 MiB mapped). */
const IMAGE_CAP_BYTES = 128 * 1024 * 1024;
/** Gaps in the image (freed initmem, section gaps) are a few MiB: 16 MiB without an image page ends it. */
const IMAGE_MAX_GAP_BYTES = 16 * 1024 * 1024;
/**
 * KERNEL_IMAGE_SIZE (arch/x86/include/asm/page_64_types.h): 1 GiB with KASLR, 512 MiB without; VMCOREINFO
 * exports it as NUMBER(KERNEL_IMAGE_SIZE) (arch/x86/kernel/crash_core_64.c). Modules start right after it.
 */
const DEFAULT_KERNEL_IMAGE_SIZE = 1024 * 1024 * 1024;
/**
 * Page-flag bits taken from `_stext`'s page: the PG_* bits sit below bit 24 in all versions read (PG_reserved
 * is bit 12 on 6.1, 13 on 6.12: include/linux/page-flags.h); zone, node and section fields sit at the top.
 */
const IMAGE_FLAG_MASK = 0xffffff;
/** Bytes per positional read while scanning (an image read is then ~15 reads). */
const SCAN_CHUNK = 4 * 1024 * 1024;

export type BtfLocateFailure =
  /** kallsyms has no `__start_BTF`/`__stop_BTF` (CONFIG_DEBUG_INFO_BTF off, or no data symbols). */
  | "no-symbols"
  /** The symbols give a range that cannot be the section (order, size, outside the image mapping). */
  | "bad-range"
  /** The range is not mapped. */
  | "unreadable"
  /** The bytes there are not a BTF header consistent with the range. */
  | "bad-header"
  /** No way found any candidate. */
  | "not-found"
  /** The kernel image could not be delimited. */
  | "no-image";

export class BtfLocateError extends IntrospectError {
  override readonly name = "BtfLocateError";
  constructor(
    readonly reason: BtfLocateFailure,
    message: string,
  ) {
    // One code for callers that only switch on IntrospectError codes; `reason` says which failure it was.
    super("bad-btf", `BTF: ${message}`);
  }
}

/** What locating needs: a validated kernel (GuestKernel has all of it; memmap enables the page check). */
export interface ImageSource {
  info: VmcoreInfo;
  addressSpace: AddressSpace;
  memmap?: MemMap;
}

export interface BtfCandidate {
  source: "kallsyms" | "image-scan";
  /** Kernel virtual address of the header. */
  va: bigint;
  /** The whole blob: header, type and string sections. */
  bytes: Buffer;
}

/** A stretch of image pages: mapped linearly, and (with a memmap) flagged like `_stext`'s page. */
export interface ImageRun {
  va: bigint;
  length: number;
}

export interface KernelImageRange {
  /** `_stext` rounded down to its page. */
  start: bigint;
  /** End of the last image run. */
  end: bigint;
  runs: ImageRun[];
  /** Sum of the runs. */
  bytes: number;
  /** Whether struct pages were consulted (false without a memmap: runs are then only "mapped linearly"). */
  pageCheck: boolean;
  /** Low flag bits of `_stext`'s page (PG_reserved); every image page has them all. */
  referenceFlags: number | null;
  elapsedMs: number;
}

export interface KernelImageOptions {
  capBytes?: number;
  maxGapBytes?: number;
}

/** Delimits the live kernel image in the high mapping (see the header comment). */
export function kernelImageRange(kernel: ImageSource, options: KernelImageOptions = {}): KernelImageRange {
  const started = performance.now();
  const { info, addressSpace: as } = kernel;
  const physBase = info.physBase;
  const stext = info.symbol("SYMBOL(_stext)");
  const start = stext & ~BigInt(PAGE - 1);
  const imageSize = info.has("NUMBER(KERNEL_IMAGE_SIZE)")
    ? info.bounded("NUMBER(KERNEL_IMAGE_SIZE)", 64 * 1024 * 1024, 2 * DEFAULT_KERNEL_IMAGE_SIZE)
    : DEFAULT_KERNEL_IMAGE_SIZE;
  const areaEnd = START_KERNEL_MAP + BigInt(imageSize);
  if (start < START_KERNEL_MAP || start >= areaEnd)
    throw new BtfLocateError(
      "no-image",
      `_stext ${hex(stext)} is outside the kernel image area ${hex(START_KERNEL_MAP)}..${hex(areaEnd)}`,
    );
  const cap = BigInt(Math.min(options.capBytes ?? IMAGE_CAP_BYTES, IMAGE_CAP_BYTES));
  const maxGap = BigInt(options.maxGapBytes ?? IMAGE_MAX_GAP_BYTES);
  const limit = start + cap < areaEnd ? start + cap : areaEnd;

  // 1. Pages mapped linearly (the image's own mapping), from the page tables read a table page at a time.
  const linear: ImageRun[] = [];
  const tables = new PageTables(as, info.smeMask);
  let va = start;
  let lastMapped = start;
  while (va < limit && va - lastMapped <= maxGap) {
    const leaf = tables.leaf(va);
    const step = leaf.size - Number(va & BigInt(leaf.size - 1));
    const n = Math.min(step, Number(limit - va));
    if (leaf.pa >= 0 && BigInt(leaf.pa) === kernelImagePa(va, physBase)) {
      const prev = linear.at(-1);
      if (prev && prev.va + BigInt(prev.length) === va) prev.length += n;
      else linear.push({ va, length: n });
      lastMapped = va + BigInt(n);
    }
    va += BigInt(n);
  }
  if (linear[0]?.va !== start)
    throw new BtfLocateError("no-image", `_stext ${hex(stext)} is not mapped at __pa_symbol(_stext)`);

  // 2. Keep the pages whose struct page looks like _stext's (freed image pages do not).
  let runs = linear;
  let referenceFlags: number | null = null;
  const memmap = kernel.memmap;
  if (memmap) {
    const flagsAt = info.has("OFFSET(page.flags)")
      ? info.bounded("OFFSET(page.flags)", 0, memmap.structPageSize - 8)
      : 0;
    const pfnOf = (v: bigint) => Number(kernelImagePa(v, physBase) / BigInt(PAGE));
    const one = Buffer.alloc(memmap.structPageSize);
    if (!memmap.read(pfnOf(start), 1, one))
      throw new BtfLocateError("no-image", `no struct page for _stext's frame ${hex(pfnOf(start))}`);
    referenceFlags = one.readUInt32LE(flagsAt) & IMAGE_FLAG_MASK;
    // The image is always PG_reserved; a page without any flag cannot tell image from freed pages.
    if (referenceFlags === 0)
      throw new BtfLocateError(
        "no-image",
        `_stext's struct page (frame ${hex(pfnOf(start))}) has no page flags`,
      );
    runs = filterImagePages(linear, memmap, pfnOf, flagsAt, referenceFlags);
    // A gap of more than maxGap inside what stayed ends the image there.
    const kept: ImageRun[] = [];
    for (const r of runs) {
      const prev = kept.at(-1);
      if (prev && r.va - (prev.va + BigInt(prev.length)) > maxGap) break;
      kept.push(r);
    }
    runs = kept;
    if (runs.length === 0)
      throw new BtfLocateError("no-image", "no page of the kernel mapping is flagged like _stext's page");
  }
  const lastRun = runs.at(-1) as ImageRun;
  return {
    start,
    end: lastRun.va + BigInt(lastRun.length),
    runs,
    bytes: runs.reduce((sum, r) => sum + r.length, 0),
    pageCheck: memmap !== undefined,
    referenceFlags,
    elapsedMs: performance.now() - started,
  };
}

/**
 * The x86-64 page tables of `as` for enumerating a range: each table page is read once (4 KiB) and kept, so
 * walking the ~10k pages of an image costs a few dozen reads instead of four per page
 * (AddressSpace.translate). Same entry rules as address-space.ts (present bit 0, PSE bit 7 at PUD/PMD,
 * address bits 12..51 minus the SME bit); anything unexpected reads as unmapped, since these mappings only
 * select pages to read, and the reads themselves go through AddressSpace.
 */
class PageTables {
  private readonly pages = new Map<number, Buffer>();
  private readonly smeLo: number;
  private readonly smeHi: number;

  constructor(
    private readonly as: AddressSpace,
    smeMask: bigint,
  ) {
    this.smeLo = Number(smeMask & 0xffffffffn);
    this.smeHi = Number((smeMask >> 32n) & 0xffffffffn);
  }

  private table(pa: number): Buffer | undefined {
    let page = this.pages.get(pa);
    if (page) return page;
    if (!this.as.memory.contains(pa, PAGE)) return undefined;
    page = this.as.memory.read(pa, PAGE);
    this.pages.set(pa, page);
    return page;
  }

  /** The leaf mapping `va`: its page's PA for `va`'s page start and size, or pa -1 and the unmapped span. */
  leaf(va: bigint): { pa: number; size: number } {
    let table = this.as.rootPa;
    for (let level: number = this.as.levels; level >= 1; level--) {
      const span = PAGE * 2 ** (9 * (level - 1));
      const page = this.table(table);
      if (!page) return { pa: -1, size: span };
      const at = Number((va >> BigInt(12 + 9 * (level - 1))) & 511n) * 8;
      const lo = page.readUInt32LE(at);
      const hi = page.readUInt32LE(at + 4);
      if ((lo & 1) === 0) return { pa: -1, size: span };
      const addr = (hi & 0xfffff & ~this.smeHi) * 2 ** 32 + ((lo & 0xfffff000 & ~this.smeLo) >>> 0);
      if (level === 1) return { pa: addr, size: PAGE };
      if (lo & 0x80) {
        if (level > 3) return { pa: -1, size: span };
        // A large page: the PA of va's 4 KiB page within it, and the rest of the large page as the size.
        const within = Number(va & BigInt(span - 1)) & ~(PAGE - 1);
        return { pa: addr - (addr % span) + within, size: span };
      }
      table = addr;
    }
    return { pa: -1, size: PAGE };
  }
}

function filterImagePages(
  linear: readonly ImageRun[],
  memmap: MemMap,
  pfnOf: (va: bigint) => number,
  flagsAt: number,
  reference: number,
): ImageRun[] {
  const batch = 8192;
  const size = memmap.structPageSize;
  const buf = Buffer.alloc(batch * size);
  const out: ImageRun[] = [];
  const keep = (va: bigint) => {
    const prev = out.at(-1);
    if (prev && prev.va + BigInt(prev.length) === va) prev.length += PAGE;
    else out.push({ va, length: PAGE });
  };
  for (const run of linear) {
    const pages = run.length / PAGE;
    for (let done = 0; done < pages; done += batch) {
      const n = Math.min(batch, pages - done);
      const va0 = run.va + BigInt(done * PAGE);
      // A frame without a readable struct page is not image (the image's frames always have one).
      if (!memmap.read(pfnOf(va0), n, buf)) continue;
      for (let i = 0; i < n; i++)
        if ((buf.readUInt32LE(i * size + flagsAt) & reference) === reference) keep(va0 + BigInt(i * PAGE));
    }
  }
  return out;
}

/**
 * Length of the BTF blob whose header is in `header` (≥ 24 bytes), or the reason it is not one. The kernel's
 * own rules (kernel/bpf/btf.c btf_parse_hdr, btf_check_sec_info, btf_parse_str_sec): hdr_len ≥ 24, type_off
 * 4-aligned, the two sections back to back from offset 0 with nothing after them, a non-empty string section.
 */
export function btfBlobLength(header: Buffer): number | string {
  if (header.length < BTF_HEADER_BYTES) return `${header.length} bytes is shorter than a BTF header`;
  const magic = header.readUInt16LE(0);
  if (magic !== BTF_MAGIC) return `magic ${hex(magic)}, not ${hex(BTF_MAGIC)}`;
  if (header[2] !== BTF_VERSION) return `version ${header[2]}`;
  const hdrLen = header.readUInt32LE(4);
  if (hdrLen < BTF_HEADER_BYTES || hdrLen > PAGE) return `hdr_len ${hdrLen}`;
  const typeOff = header.readUInt32LE(8);
  const typeLen = header.readUInt32LE(12);
  const strOff = header.readUInt32LE(16);
  const strLen = header.readUInt32LE(20);
  if (typeOff % 4 !== 0) return `type_off ${typeOff} is not 4-aligned`;
  if (strLen === 0) return "empty string section";
  // Sections sorted by offset must start at 0 and follow each other without gap or overlap.
  const [a, b] = typeOff <= strOff ? [typeOff, strOff] : [strOff, typeOff];
  const aLen = typeOff <= strOff ? typeLen : strLen;
  if (a !== 0 || b !== aLen)
    return `sections type ${typeOff}+${typeLen}, strings ${strOff}+${strLen} are not back to back from 0`;
  const total = hdrLen + typeLen + strLen;
  if (total > MAX_BTF_BYTES) return `${total} bytes is more than ${MAX_BTF_BYTES}`;
  return total;
}

/** Checks a whole blob beyond its header: the string section starts and ends with NUL (btf_parse_str_sec). */
function btfBlobProblem(bytes: Buffer): string | undefined {
  const length = btfBlobLength(bytes);
  if (typeof length === "string") return length;
  if (length !== bytes.length) return `header says ${length} bytes, the range holds ${bytes.length}`;
  const strStart = bytes.readUInt32LE(4) + bytes.readUInt32LE(16);
  const strEnd = strStart + bytes.readUInt32LE(20);
  if (bytes[strStart] !== 0 || bytes[strEnd - 1] !== 0)
    return "string section does not start and end with NUL";
  return undefined;
}

function readVirt(as: AddressSpace, va: bigint, length: number, what: string): Buffer {
  const buf = Buffer.alloc(length);
  try {
    as.readVirt(va, buf);
  } catch (error) {
    if (error instanceof IntrospectError)
      throw new BtfLocateError("unreadable", `${what} (${length} bytes at ${hex(va)}): ${error.message}`);
    throw error;
  }
  return buf;
}

/** The `.BTF` section between `__start_BTF` and `__stop_BTF`. */
export function btfFromKallsyms(kernel: ImageSource, kallsyms: Kallsyms): BtfCandidate {
  const startVa = kallsyms.lookup("__start_BTF");
  const stopVa = kallsyms.lookup("__stop_BTF");
  if (startVa === undefined || stopVa === undefined)
    throw new BtfLocateError(
      "no-symbols",
      `kallsyms has no __start_BTF/__stop_BTF (${kallsyms.count} symbols; CONFIG_DEBUG_INFO_BTF off?)`,
    );
  const stext = kernel.info.symbol("SYMBOL(_stext)");
  const size = stopVa - startVa;
  if (
    startVa <= stext ||
    stopVa <= startVa ||
    size < BigInt(BTF_HEADER_BYTES) ||
    size > BigInt(MAX_BTF_BYTES)
  )
    throw new BtfLocateError(
      "bad-range",
      `__start_BTF ${hex(startVa)}..__stop_BTF ${hex(stopVa)} is not a section after _stext ${hex(stext)} of 24 B..${MAX_BTF_BYTES} B`,
    );
  const bytes = readVirt(kernel.addressSpace, startVa, Number(size), "__start_BTF..__stop_BTF");
  const problem = btfBlobProblem(bytes);
  if (problem) throw new BtfLocateError("bad-header", `at __start_BTF ${hex(startVa)}: ${problem}`);
  return { source: "kallsyms", va: startVa, bytes };
}

/** Every BTF blob whose header and whole extent lie in one run of the image, in address order. */
export function scanImageForBtf(
  kernel: ImageSource,
  range: KernelImageRange = kernelImageRange(kernel),
): BtfCandidate[] {
  const as = kernel.addressSpace;
  const out: BtfCandidate[] = [];
  const overlap = BTF_HEADER_PREFIX.length - 1;
  const chunk = Buffer.alloc(SCAN_CHUNK + overlap);
  for (const run of range.runs) {
    const runEnd = run.va + BigInt(run.length);
    /** Hits before this address are inside a blob already taken. */
    let resume = run.va;
    for (let off = 0; off < run.length; off += SCAN_CHUNK) {
      const n = Math.min(SCAN_CHUNK + overlap, run.length - off);
      const base = run.va + BigInt(off);
      if (!as.tryReadVirt(base, chunk, 0, n)) continue;
      const view = chunk.subarray(0, n);
      for (let at = view.indexOf(BTF_HEADER_PREFIX); at >= 0; at = view.indexOf(BTF_HEADER_PREFIX, at + 1)) {
        // A hit in the overlap starts in the next chunk, which sees it whole.
        if (at >= SCAN_CHUNK) break;
        const va = base + BigInt(at);
        if (va < resume) continue;
        const header = Buffer.alloc(BTF_HEADER_BYTES);
        if (!as.tryReadVirt(va, header)) continue;
        const length = btfBlobLength(header);
        if (typeof length === "string" || va + BigInt(length) > runEnd) continue;
        const bytes = Buffer.alloc(length);
        if (!as.tryReadVirt(va, bytes) || btfBlobProblem(bytes) !== undefined) continue;
        out.push({ source: "image-scan", va, bytes });
        resume = va + BigInt(length);
      }
    }
  }
  return out;
}

export interface LocateBtfOptions {
  /** Decoded kallsyms to use; null to skip kallsyms; default: decode them when VMCOREINFO exports them. */
  kallsyms?: Kallsyms | null;
  /** Scan the image "always", only when kallsyms gave nothing ("fallback", default), or "never". */
  scan?: "always" | "fallback" | "never";
}

export interface BtfLocation {
  /** In order of preference: kallsyms first, then image-scan hits at other addresses, by address. */
  candidates: BtfCandidate[];
  kallsyms: Kallsyms | null;
  image: KernelImageRange | null;
  /** Why a way gave nothing (kallsyms absent, symbols missing...). */
  notes: string[];
  timings: { kallsymsMs: number; kallsymsBtfMs: number; imageRangeMs: number; scanMs: number };
}

/** BTF candidates of the running kernel; throws BtfLocateError("not-found") when there is none. */
export function locateBtf(kernel: ImageSource, options: LocateBtfOptions = {}): BtfLocation {
  const notes: string[] = [];
  const timings = { kallsymsMs: 0, kallsymsBtfMs: 0, imageRangeMs: 0, scanMs: 0 };
  const candidates: BtfCandidate[] = [];
  let kallsyms = options.kallsyms ?? null;
  if (options.kallsyms === undefined) {
    if (hasKallsyms(kernel.info)) {
      const t = performance.now();
      try {
        kallsyms = openKallsyms(kernel);
      } catch (error) {
        if (!(error instanceof KallsymsError)) throw error;
        notes.push(error.message);
      }
      timings.kallsymsMs = performance.now() - t;
    } else notes.push(`VMCOREINFO of ${kernel.info.osRelease} exports no kallsyms tables`);
  }
  if (kallsyms) {
    const t = performance.now();
    try {
      candidates.push(btfFromKallsyms(kernel, kallsyms));
    } catch (error) {
      if (!(error instanceof BtfLocateError)) throw error;
      notes.push(error.message);
    }
    timings.kallsymsBtfMs = performance.now() - t;
  }
  const scan = options.scan ?? "fallback";
  let image: KernelImageRange | null = null;
  if (scan === "always" || (scan === "fallback" && candidates.length === 0)) {
    try {
      image = kernelImageRange(kernel);
      timings.imageRangeMs = image.elapsedMs;
      const t = performance.now();
      const found = scanImageForBtf(kernel, image);
      timings.scanMs = performance.now() - t;
      for (const c of found)
        if (!candidates.some((k) => k.va === c.va && k.bytes.length === c.bytes.length)) candidates.push(c);
      if (found.length === 0)
        notes.push(
          `no BTF header in ${image.bytes} bytes of kernel image ${hex(image.start)}..${hex(image.end)}`,
        );
    } catch (error) {
      if (!(error instanceof IntrospectError)) throw error;
      notes.push(error.message);
    }
  }
  if (candidates.length === 0) throw new BtfLocateError("not-found", notes.join("; ") || "nothing tried");
  return { candidates, kallsyms, image, notes, timings };
}
