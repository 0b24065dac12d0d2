/**
 * VMCOREINFO: the kernel's own description of itself for crash dumps (kernel/crash_core.c, 6.9+
 * kernel/vmcore_info.c; arch keys from arch/x86/kernel/crash_core_64.c), found by scanning guest RAM, parsed and
 * validated against the memory it describes (../shared/docs/linux-page-introspection.md §1).
 *
 * Scan (§1.3): the text only ever starts at page offset 0 (the `vmcoreinfo_data` page, or the kdump safe copy)
 * or at page offset 24 of an ELF note (`vmcoreinfo_note`: n_namesz 11, n_descsz, n_type 0, "VMCOREINFO\0\0").
 * Only those two offsets of each page are tested, in large positional reads through one reused buffer.
 * Copies at other offsets (format strings in kernel rodata, /proc/kcore readers' buffers) are never candidates.
 *
 * Validation (§1.4): a candidate must describe the memory it lies in: `SYMBOL(_stext)` translates through its
 * own page tables to `__pa_symbol(_stext)`, and the release string at `init_uts_ns` equals OSRELEASE. Stale
 * copies of earlier boots usually fail this (their page tables are gone); the ones that do not are told apart
 * in kernel.ts.
 */
import { AddressSpace, kernelImagePa, type PagingLevels } from "./address-space.ts";
import { hex, IntrospectError, VmcoreinfoError } from "./errors.ts";
import type { GuestMemory } from "./guest-memory.ts";

const PAGE_SIZE = 4096;
const OSRELEASE = Buffer.from("OSRELEASE=", "latin1");
/** ELF note header (include/uapi/linux/elf.h Elf64_Nhdr) + name "VMCOREINFO" padded to 4 bytes. */
const NOTE_NAME = Buffer.from("VMCOREINFO\0\0", "latin1");
const NOTE_TEXT_OFFSET = 24;
/** The text is at most VMCOREINFO_BYTES = PAGE_SIZE (include/linux/crash_core.h); allow newer kernels 4x. */
const MAX_TEXT_BYTES = 4 * PAGE_SIZE;
/** `struct new_utsname`: sysname[65], nodename[65], release[65] (include/uapi/linux/utsname.h). */
const UTS_RELEASE_OFFSET = 130n;
const UTS_FIELD_BYTES = 65;

export type CandidateForm = "page" | "note";

export interface VmcoreinfoCandidate {
  /** Guest-physical address of the page (data page) or of the note header. */
  gpa: number;
  form: CandidateForm;
  text: string;
}

export interface ScanResult {
  /** Distinct texts (identical copies keep the first address; `copies` counts them all). */
  candidates: VmcoreinfoCandidate[];
  /** Every address where a candidate text was found, per distinct text index. */
  copies: number[][];
  scannedBytes: number;
  elapsedMs: number;
  /** Candidates beyond `maxCandidates` were dropped. */
  truncated: boolean;
}

export interface ScanOptions {
  /** Distinct candidate texts kept (default 64): forged copies cannot make the scan allocate without bound. */
  maxCandidates?: number;
  /** Bytes per positional read (default 256 KiB: the buffer stays in cache, twice as fast as 4 MiB). */
  chunkBytes?: number;
}

let scanBuffer: Buffer | undefined;

/** Finds VMCOREINFO candidates at the two page offsets the kernel uses. */
export function scanForVmcoreinfo(memory: GuestMemory, options: ScanOptions = {}): ScanResult {
  const started = performance.now();
  const maxCandidates = options.maxCandidates ?? 64;
  const chunk = Math.max(PAGE_SIZE, Math.floor((options.chunkBytes ?? 256 * 1024) / PAGE_SIZE) * PAGE_SIZE);
  if (!scanBuffer || scanBuffer.length < chunk) scanBuffer = Buffer.allocUnsafe(chunk);
  const buf = scanBuffer;
  const byText = new Map<string, number>();
  const candidates: VmcoreinfoCandidate[] = [];
  const copies: number[][] = [];
  let truncated = false;
  let scannedBytes = 0;
  const o0 = OSRELEASE[0] as number;
  const add = (gpa: number, form: CandidateForm, text: string) => {
    const known = byText.get(text);
    if (known !== undefined) {
      const list = copies[known] as number[];
      if (list.length < 1024) list.push(gpa);
      return;
    }
    if (candidates.length >= maxCandidates) {
      truncated = true;
      return;
    }
    byText.set(text, candidates.length);
    candidates.push({ gpa, form, text });
    copies.push([gpa]);
  };
  for (const range of memory.ranges) {
    const first = Math.ceil(range.gpa / PAGE_SIZE) * PAGE_SIZE;
    const end = Math.floor((range.gpa + range.size) / PAGE_SIZE) * PAGE_SIZE;
    for (let base = first; base < end; base += chunk) {
      const n = Math.min(chunk, end - base);
      memory.readInto(base, buf, 0, n);
      scannedBytes += n;
      for (let p = 0; p < n; p += PAGE_SIZE) {
        if (buf[p] === o0 && buf.compare(OSRELEASE, 0, OSRELEASE.length, p, p + OSRELEASE.length) === 0) {
          // Search the page only: a forged page without NUL must not make this scan the rest of the chunk.
          const nul = buf.subarray(p, p + PAGE_SIZE).indexOf(0);
          add(base + p, "page", buf.toString("latin1", p, nul < 0 ? p + PAGE_SIZE : p + nul));
        }
        const t = p + NOTE_TEXT_OFFSET;
        if (
          buf[t] === o0 &&
          buf.compare(OSRELEASE, 0, OSRELEASE.length, t, t + OSRELEASE.length) === 0 &&
          buf.readUInt32LE(p) === 11 &&
          buf.readUInt32LE(p + 8) === 0 &&
          buf.compare(NOTE_NAME, 0, NOTE_NAME.length, p + 12, p + 24) === 0
        ) {
          const descsz = buf.readUInt32LE(p + 4);
          if (descsz === 0 || descsz > MAX_TEXT_BYTES || !memory.contains(base + t, descsz)) continue;
          const text = memory.read(base + t, descsz);
          const nul = text.indexOf(0);
          add(base + p, "note", text.toString("latin1", 0, nul < 0 ? text.length : nul));
        }
      }
    }
  }
  return { candidates, copies, scannedBytes, elapsedMs: performance.now() - started, truncated };
}

// ---------------------------------------------------------------------------------------------------------
// Parsing

/** Keys whose values are needed to open a kernel; missing ones make the candidate unusable. */
const REQUIRED = [
  "OSRELEASE",
  "PAGESIZE",
  "SYMBOL(_stext)",
  "SYMBOL(init_uts_ns)",
  "NUMBER(phys_base)",
] as const;

const KEY = /^[A-Za-z0-9_()./-]{1,128}$/;
const PRINTABLE = /^[\x20-\x7e]*$/;

/** Parsed VMCOREINFO text. Values keep their text; typed getters apply the printk formats of crash_core.h. */
export class VmcoreInfo {
  private constructor(
    readonly text: string,
    readonly entries: ReadonlyMap<string, string>,
  ) {}

  /** Parses the text; throws VmcoreinfoError when it is not VMCOREINFO of a supported x86-64 kernel. */
  static parse(text: string): VmcoreInfo {
    if (text.length > MAX_TEXT_BYTES)
      throw new VmcoreinfoError("bad-vmcoreinfo", `VMCOREINFO text of ${text.length} bytes is too long`);
    const entries = new Map<string, string>();
    const lines = text.split("\n");
    // A text that fills its page has no final newline: its last line may be cut, so drop it.
    if (!text.endsWith("\n")) lines.pop();
    for (const line of lines) {
      if (line === "") continue;
      const eq = line.indexOf("=");
      const key = eq > 0 ? line.slice(0, eq) : "";
      const value = line.slice(eq + 1);
      if (!KEY.test(key) || !PRINTABLE.test(value))
        throw new VmcoreinfoError("bad-vmcoreinfo", `VMCOREINFO: malformed line "${line.slice(0, 80)}"`);
      if (!entries.has(key)) entries.set(key, value);
    }
    const info = new VmcoreInfo(text, entries);
    for (const key of REQUIRED)
      if (!entries.has(key)) throw new VmcoreinfoError("bad-vmcoreinfo", `VMCOREINFO lacks ${key}`);
    if (info.pageSize !== PAGE_SIZE)
      throw new VmcoreinfoError(
        "bad-vmcoreinfo",
        `VMCOREINFO PAGESIZE=${info.pageSize}: only 4096 is supported`,
      );
    if (!entries.has("SYMBOL(init_top_pgt)") && !entries.has("SYMBOL(swapper_pg_dir)"))
      throw new VmcoreinfoError("bad-vmcoreinfo", "VMCOREINFO has no SYMBOL(init_top_pgt) (not x86-64?)");
    const release = info.osRelease;
    if (release.length === 0 || release.length >= UTS_FIELD_BYTES)
      throw new VmcoreinfoError(
        "bad-vmcoreinfo",
        `VMCOREINFO OSRELEASE "${release.slice(0, 80)}" is implausible`,
      );
    const l5 = info.optionalNumber("NUMBER(pgtable_l5_enabled)") ?? 0n;
    if (l5 !== 0n && l5 !== 1n)
      throw new VmcoreinfoError("bad-vmcoreinfo", `VMCOREINFO NUMBER(pgtable_l5_enabled)=${l5}`);
    return info;
  }

  get osRelease(): string {
    return this.entries.get("OSRELEASE") ?? "";
  }
  get pageSize(): number {
    return Number(this.unsigned("PAGESIZE"));
  }
  get buildId(): string | undefined {
    return this.entries.get("BUILD-ID");
  }
  get physBase(): bigint {
    return this.signed("NUMBER(phys_base)");
  }
  get pagingLevels(): PagingLevels {
    return this.optionalNumber("NUMBER(pgtable_l5_enabled)") === 1n ? 5 : 4;
  }
  get smeMask(): bigint {
    return this.optionalNumber("NUMBER(sme_mask)") ?? 0n;
  }
  /** `KERNELOFFSET` (%lx): the virtual KASLR slide. */
  get kernelOffset(): bigint | undefined {
    const v = this.entries.get("KERNELOFFSET");
    return v === undefined ? undefined : parseHexValue("KERNELOFFSET", v);
  }
  /** The top-level page table (x86-64 `init_top_pgt`, the same as `swapper_pg_dir`). */
  get topPageTable(): bigint {
    return this.entries.has("SYMBOL(init_top_pgt)")
      ? this.symbol("SYMBOL(init_top_pgt)")
      : this.symbol("SYMBOL(swapper_pg_dir)");
  }

  has(key: string): boolean {
    return this.entries.has(key);
  }

  /** `SYMBOL(x)=%lx`: hex without 0x, the runtime (relocated) address. Key is e.g. "SYMBOL(_stext)". */
  symbol(key: string): bigint {
    const v = this.require(key);
    return parseHexValue(key, v);
  }

  /** `SIZE/OFFSET/LENGTH=%lu`. */
  unsigned(key: string): bigint {
    const v = this.require(key);
    if (!/^\d{1,20}$/.test(v))
      throw new VmcoreinfoError("bad-vmcoreinfo", `VMCOREINFO ${key}=${v} is not a number`);
    const n = BigInt(v);
    if (n >= 1n << 64n) throw new VmcoreinfoError("bad-vmcoreinfo", `VMCOREINFO ${key}=${v} overflows`);
    return n;
  }

  /** `NUMBER(x)=%ld`, or `0x%lx` (6.12's VMALLOC_START): decimal first, then hex (makedumpfile's rule). */
  signed(key: string): bigint {
    const v = this.require(key);
    if (/^-?\d{1,20}$/.test(v)) {
      const n = BigInt(v);
      if (n < -(1n << 63n) || n >= 1n << 64n)
        throw new VmcoreinfoError("bad-vmcoreinfo", `VMCOREINFO ${key}=${v} overflows`);
      return n;
    }
    if (/^0x[0-9a-fA-F]{1,16}$/.test(v)) return BigInt(v);
    throw new VmcoreinfoError("bad-vmcoreinfo", `VMCOREINFO ${key}=${v} is not a number`);
  }

  optionalNumber(key: string): bigint | undefined {
    return this.entries.has(key) ? this.signed(key) : undefined;
  }

  /** A SIZE/OFFSET/LENGTH/NUMBER value as a number within [min, max], else VmcoreinfoError. */
  bounded(key: string, min: number, max: number): number {
    const v = key.startsWith("NUMBER(") ? this.signed(key) : this.unsigned(key);
    if (v < BigInt(min) || v > BigInt(max))
      throw new VmcoreinfoError("bad-vmcoreinfo", `VMCOREINFO ${key}=${v} is outside [${min}, ${max}]`);
    return Number(v);
  }

  /** Every NUMBER/SIZE/OFFSET/LENGTH value that is a safe integer (what kernel-profiles.ts selectProfile takes). */
  numbers(): Map<string, number> {
    const out = new Map<string, number>();
    for (const key of this.entries.keys()) {
      if (!/^(NUMBER|SIZE|OFFSET|LENGTH)\(/.test(key)) continue;
      try {
        const n = key.startsWith("NUMBER(") ? this.signed(key) : this.unsigned(key);
        if (n >= BigInt(Number.MIN_SAFE_INTEGER) && n <= BigInt(Number.MAX_SAFE_INTEGER))
          out.set(key, Number(n));
      } catch {
        // a malformed optional value is simply absent
      }
    }
    return out;
  }

  private require(key: string): string {
    const v = this.entries.get(key);
    if (v === undefined) throw new VmcoreinfoError("bad-vmcoreinfo", `VMCOREINFO lacks ${key}`);
    return v;
  }
}

function parseHexValue(key: string, v: string): bigint {
  const digits = v.startsWith("0x") ? v.slice(2) : v;
  if (!/^[0-9a-fA-F]{1,16}$/.test(digits))
    throw new VmcoreinfoError("bad-vmcoreinfo", `VMCOREINFO ${key}=${v} is not a hex address`);
  return BigInt(`0x${digits}`);
}

// ---------------------------------------------------------------------------------------------------------
// Validation

export interface ValidatedKernel {
  info: VmcoreInfo;
  addressSpace: AddressSpace;
  /** Guest-physical address of `init_top_pgt`. */
  rootPa: number;
  /** Guest-physical address of `_stext`. */
  stextPa: number;
}

/**
 * Checks that `info` describes the kernel whose memory this is (doc §1.4 checks 1 and 2, plus: the top-level
 * table maps itself at its kernel-image address). Throws VmcoreinfoError naming the failed check.
 */
export function validateVmcoreinfo(memory: GuestMemory, info: VmcoreInfo): ValidatedKernel {
  const physBase = info.physBase;
  const top = info.topPageTable;
  const rootBig = kernelImagePa(top, physBase);
  if (
    rootBig >= BigInt(memory.end) ||
    rootBig % BigInt(PAGE_SIZE) !== 0n ||
    !memory.contains(Number(rootBig), PAGE_SIZE)
  )
    throw new VmcoreinfoError(
      "unvalidated-vmcoreinfo",
      `init_top_pgt ${hex(top)} with phys_base ${physBase} gives PA ${hex(rootBig)}, not a page of guest RAM`,
    );
  const rootPa = Number(rootBig);
  const as = new AddressSpace(memory, { rootPa, levels: info.pagingLevels, smeMask: info.smeMask });
  const check = <T>(what: string, f: () => T): T => {
    try {
      return f();
    } catch (error) {
      if (error instanceof IntrospectError)
        throw new VmcoreinfoError("unvalidated-vmcoreinfo", `${what}: ${error.message}`);
      throw error;
    }
  };
  const stext = info.symbol("SYMBOL(_stext)");
  const stextPa = check("translating _stext", () => as.translate(stext));
  const expected = kernelImagePa(stext, physBase);
  if (BigInt(stextPa) !== expected)
    throw new VmcoreinfoError(
      "unvalidated-vmcoreinfo",
      `_stext ${hex(stext)} translates to ${hex(stextPa)}, but phys_base says ${hex(expected)}`,
    );
  const rootSelf = check("translating init_top_pgt", () => as.translate(top));
  if (rootSelf !== rootPa)
    throw new VmcoreinfoError(
      "unvalidated-vmcoreinfo",
      `init_top_pgt ${hex(top)} maps to ${hex(rootSelf)}, not to itself at ${hex(rootPa)}`,
    );
  const uts = info.symbol("SYMBOL(init_uts_ns)");
  // Where `name` sits in struct uts_namespace: VMCOREINFO says so from 5.11; before, a `struct kref` (4 bytes)
  // came first (include/linux/utsname.h@v5.10), and 5.11 moved `name` to the front. Without the key both
  // places are tried, and the one holding the release wins.
  const nameOffsets = info.has("OFFSET(uts_namespace.name)")
    ? [BigInt(info.bounded("OFFSET(uts_namespace.name)", 0, 4096))]
    : [0n, 4n];
  const seen: string[] = [];
  for (const nameOffset of nameOffsets) {
    const release = check("reading init_uts_ns", () =>
      as.readCString((uts + nameOffset + UTS_RELEASE_OFFSET) & ((1n << 64n) - 1n), UTS_FIELD_BYTES),
    );
    if (release === info.osRelease) return { info, addressSpace: as, rootPa, stextPa };
    seen.push(`"${release.slice(0, 64)}" at +${nameOffset}`);
  }
  throw new VmcoreinfoError(
    "unvalidated-vmcoreinfo",
    `init_uts_ns holds release ${seen.join(", ")}, VMCOREINFO says "${info.osRelease}": this VMCOREINFO belongs to ` +
      "another kernel (a stale copy of an earlier boot) or struct uts_namespace has a layout vmprune does not know",
  );
}
