/**
 * The guest kernel's own symbol table (kallsyms), decoded from guest memory through the tables VMCOREINFO
 * points at (`SYMBOL(kallsyms_*)`, exported since Linux 6.0: commits 5fd8fea935a10 "vmcoreinfo: include
 * kallsyms symbols" and f09bddbd86619 "vmcoreinfo: add kallsyms_num_syms symbol"; kernel/crash_core.c, from
 * 6.9 kernel/vmcore_info.c). It resolves any kernel symbol without debug files: `__start_BTF`/`__stop_BTF`
 * (the BTF blob, btf-locate.ts), static keys, `vmemmap_base`.
 *
 * Tables (written by scripts/kallsyms.c, read by kernel/kallsyms.c):
 * - `kallsyms_num_syms`: u32 count.
 * - `kallsyms_names`: per symbol a token count, then that many token bytes. The count is one byte, or from
 *   6.1 (73bbb94466fd3 "kallsyms: support "big" kernel symbols") a two-byte ULEB128 when bit 7 is set:
 *   `(b0 & 0x7f) | (b1 << 7)`, b1 < 0x80, count 1..0x3fff. 6.0 wrote one byte only; the two readings differ
 *   only for counts ≥ 128, so a table that decodes and checks out one way is not tried the other.
 * - `kallsyms_token_index`: 256 u16 offsets into `kallsyms_token_table` (NUL-terminated strings). A name is
 *   the concatenation of its tokens; its first character is the symbol type (nm letter).
 * - Addresses, four encodings over the versions (drgn libdrgn/kallsyms.c keeps the same timeline):
 *   - absolute: `kallsyms_addresses[]` u64 (!CONFIG_KALLSYMS_BASE_RELATIVE, gone in 6.11 with 64e166099b69b);
 *   - absolute-percpu (CONFIG_KALLSYMS_ABSOLUTE_PERCPU, x86-64 SMP up to 6.14; removed in 6.15 by
 *     01157ddc58dc2): s32 `kallsyms_offsets[i]` ≥ 0 is the address itself (per-CPU symbols near 0), < 0 is
 *     `kallsyms_relative_base - 1 - offset`;
 *   - relative-base (6.15-6.19 on x86-64): `kallsyms_relative_base + (u32)offset`;
 *   - place-relative (7.0+, a081b5789255d "kallsyms: Get rid of kallsyms relative base"; no relative base in
 *     VMCOREINFO any more): `&kallsyms_offsets[i] + (s32)offset`.
 *
 * The encoding is never taken from the version string: each one the tables allow is tried, and the one whose
 * addresses agree with every symbol VMCOREINFO also names (`_stext` at least, `init_uts_ns`, `init_top_pgt`,
 * the `mem_section` pointer, the printk ring buffer) and that keeps the table sorted by address (the kernel's
 * own binary search in get_symbol_pos() relies on that order) is taken; none or more than one is a
 * KallsymsError. Everything is read through the guest's page tables with bounds on every size the guest
 * gives.
 */
import type { AddressSpace } from "./address-space.ts";
import { START_KERNEL_MAP } from "./address-space.ts";
import { hex, IntrospectError } from "./errors.ts";
import type { VmcoreInfo } from "./vmcoreinfo.ts";

const MASK64 = (1n << 64n) - 1n;
/** Symbols accepted: a distro kernel has ~150k; 4M bounds what a forged count can make us allocate. */
export const MAX_KALLSYMS = 1 << 22;
/** Token count of one name: scripts/kallsyms.c (6.1+) refuses lengths above 0x3FFF. */
const MAX_NAME_TOKENS = 0x3fff;
/**
 * KSYM_NAME_LEN (include/linux/kallsyms.h): 512 since 6.1 ("kallsyms: increase maximum kernel symbol length
 * to 512", for Rust), 128 before; it counts the NUL, and the type letter comes on top: at most 512
 * characters.
 */
const KSYM_NAME_LEN = 512;
/** `kallsyms_token_index` has one u16 per byte value (scripts/kallsyms.c write_src, 256 tokens). */
const TOKENS = 256;
/** Bytes of `kallsyms_names` we are willing to read: ~2 MiB for a distro kernel, 16x more for safety. */
const MAX_NAMES_BYTES = 32 * 1024 * 1024;
/** First read of the names stream, then doubled: most kernels are read in one or two positional reads. */
const NAMES_FIRST_READ = 4 * 1024 * 1024;
const PAGE = 4096;

export type KallsymsEncoding = "absolute" | "absolute-percpu" | "relative-base" | "place-relative";

export type KallsymsFailure =
  /** VMCOREINFO does not export the tables (kernels before 6.0, or CONFIG_KALLSYMS off). */
  | "absent"
  /** A table address the page tables do not map. */
  | "unreadable"
  /** A table that cannot be what scripts/kallsyms.c writes (count, lengths, tokens out of bounds). */
  | "malformed"
  /** The tables decode, but no address encoding agrees with VMCOREINFO. */
  | "mismatch"
  /** More than one encoding agrees (cannot happen with real tables: refused rather than guessed). */
  | "ambiguous";

export class KallsymsError extends IntrospectError {
  override readonly name = "KallsymsError";
  constructor(
    readonly reason: KallsymsFailure,
    message: string,
  ) {
    // One code for callers that only switch on IntrospectError codes; `reason` says which failure it was.
    super("bad-kallsyms", `kallsyms: ${message}`);
  }
}

/** What openKallsyms reads: a validated kernel's VMCOREINFO and address space (a GuestKernel has both). */
export interface KallsymsSource {
  info: VmcoreInfo;
  addressSpace: AddressSpace;
}

/** One comparison of a decoded address with VMCOREINFO. */
export interface KallsymsCheck {
  symbol: string;
  key: string;
  expected: bigint;
  /** The decoded address (or, for "pointer" checks, the value read there). */
  actual: bigint;
  how: "address" | "pointer";
}

/**
 * Symbols VMCOREINFO names that kallsyms also holds, with how their values relate. SYMBOL(x) prints `&x`
 * (include/linux/crash_core.h VMCOREINFO_SYMBOL); SYMBOL_ARRAY(x) prints the value of `x`: for `mem_section`
 * with SPARSEMEM_EXTREME a pointer stored at the symbol (without EXTREME the array's address), for `vmemmap`
 * (6.9+) the value of x86-64's `vmemmap_base` (arch/x86/include/asm/pgtable_64_types.h VMEMMAP_START). Left
 * out: `swapper_pg_dir` and `node_online_map`, macros on x86-64 (no kallsyms entry of that name). Each pair
 * was compared on Debian 6.1 and 6.12 guests. `_stext` must be there; the others count where both have them.
 */
const CHECKS: readonly { symbol: string; key: string; pointer: boolean }[] = [
  { symbol: "_stext", key: "SYMBOL(_stext)", pointer: false },
  { symbol: "init_uts_ns", key: "SYMBOL(init_uts_ns)", pointer: false },
  // arch/x86/kernel/crash_core_64.c: VMCOREINFO_SYMBOL(init_top_pgt), VMCOREINFO_SYMBOL(node_data).
  { symbol: "init_top_pgt", key: "SYMBOL(init_top_pgt)", pointer: false },
  { symbol: "node_data", key: "SYMBOL(node_data)", pointer: false },
  { symbol: "mem_section", key: "SYMBOL(mem_section)", pointer: true },
  { symbol: "vmemmap_base", key: "SYMBOL(vmemmap)", pointer: true },
  // kernel/printk/printk.c log_buf_vmcoreinfo_setup (the lockless ring buffer's keys, 5.10+).
  { symbol: "prb", key: "SYMBOL(prb)", pointer: false },
  { symbol: "printk_rb_static", key: "SYMBOL(printk_rb_static)", pointer: false },
  { symbol: "clear_seq", key: "SYMBOL(clear_seq)", pointer: false },
  // mm/vmalloc.c's list, exported until 6.9 replaced it with NUMBER(VMALLOC_START).
  { symbol: "vmap_area_list", key: "SYMBOL(vmap_area_list)", pointer: false },
];

export interface OpenKallsymsOptions {
  /** Upper bound on `kallsyms_num_syms` (default MAX_KALLSYMS). */
  maxSymbols?: number;
}

/**
 * Decoded names, kept compressed: for each symbol where its tokens start in `kallsyms_names`, its type letter
 * and a hash of its name. The hash is polynomial (h·B^len + token), so it is built from per-token values with
 * no work per character, and no string is made per symbol (per-symbol strings and a Map of them cost ~4x the
 * rest of the decode). A lookup hashes the query, compares it with every symbol's hash (~0.2 ms for 200k)
 * and expands only the few that match; after LOOKUPS_BEFORE_INDEX lookups a hash → indices Map is built once.
 */
class SymbolNames {
  private lookups = 0;
  private index: Map<number, number[]> | undefined;

  constructor(
    private readonly stream: Uint8Array,
    /** Where each symbol's token bytes start in `stream`, and how many there are. */
    private readonly at: Uint32Array,
    private readonly tokenCounts: Uint16Array,
    readonly types: Uint8Array,
    private readonly hashes: Uint32Array,
    private readonly tokens: Tokens,
  ) {}

  get count(): number {
    return this.types.length;
  }

  /** The name of symbol i (without its type letter), expanded from its tokens. */
  name(i: number): string {
    const { data, start, length } = this.tokens;
    const from = this.at[i] as number;
    const end = from + (this.tokenCounts[i] as number);
    let out = "";
    for (let j = from; j < end; j++) {
      const t = this.stream[j] as number;
      const k = start[t] as number;
      out += Buffer.from(data.buffer, data.byteOffset + k, length[t] as number).toString("latin1");
    }
    return out.slice(1);
  }

  /** Indices of every symbol called `name`, in table order. */
  indices(name: string): number[] {
    const wanted = Buffer.from(name, "latin1");
    // A character outside Latin-1 is in no kernel name.
    if (wanted.length === 0 || wanted.toString("latin1") !== name) return [];
    let hash = 0;
    for (const c of wanted) hash = (Math.imul(hash, HASH_BASE) + c) | 0;
    hash >>>= 0;
    let candidates: number[];
    if (this.index) candidates = this.index.get(hash) ?? [];
    else if (++this.lookups > LOOKUPS_BEFORE_INDEX) {
      this.index = new Map();
      for (let i = 0; i < this.count; i++) {
        const h = this.hashes[i] as number;
        const list = this.index.get(h);
        if (list) list.push(i);
        else this.index.set(h, [i]);
      }
      candidates = this.index.get(hash) ?? [];
    } else {
      candidates = [];
      const hashes = this.hashes;
      for (let i = 0; i < hashes.length; i++) if (hashes[i] === hash) candidates.push(i);
    }
    return candidates.filter((i) => this.name(i) === name);
  }
}

/** Lookups by scanning the hashes before a Map of them pays off. */
const LOOKUPS_BEFORE_INDEX = 64;
/** Base of the polynomial name hash (FNV's 32-bit prime: odd, with well-spread bits). */
const HASH_BASE = 0x01000193;

/** The decoded symbol table of the running kernel. Immutable. */
export class Kallsyms {
  /** Wall time of openKallsyms (reads, decode, checks), ms. */
  readonly elapsedMs: number;

  constructor(
    readonly encoding: KallsymsEncoding,
    /** Whether names use 2-byte token counts (6.1+); false when no name needed one. */
    readonly longNames: boolean,
    private readonly names: SymbolNames,
    private readonly addressAt: (index: number) => bigint,
    /** The VMCOREINFO agreements that chose the encoding. */
    readonly checks: readonly KallsymsCheck[],
    elapsedMs: number,
  ) {
    this.elapsedMs = elapsedMs;
  }

  get count(): number {
    return this.names.count;
  }

  /** Address of the first (lowest-address) symbol called `name`, or undefined. */
  lookup(name: string): bigint | undefined {
    const [i] = this.names.indices(name);
    return i === undefined ? undefined : this.addressAt(i);
  }

  /** Addresses of every symbol called `name`, in table order (names repeat: statics of different files). */
  lookupAll(name: string): bigint[] {
    return this.names.indices(name).map((i) => this.addressAt(i));
  }

  /** The nm type letter of the first symbol called `name` ('T' text, 'D' data, 'R' rodata, 'B' bss...). */
  type(name: string): string | undefined {
    const [i] = this.names.indices(name);
    return i === undefined ? undefined : String.fromCharCode(this.names.types[i] ?? 0);
  }

  has(name: string): boolean {
    return this.names.indices(name).length > 0;
  }

  /** Symbol `index` in table (address) order. */
  at(index: number): { name: string; type: string; address: bigint } {
    if (!Number.isSafeInteger(index) || index < 0 || index >= this.count)
      throw new RangeError(`kallsyms index ${index} outside 0..${this.count - 1}`);
    return {
      name: this.names.name(index),
      type: String.fromCharCode(this.names.types[index] ?? 0),
      address: this.addressAt(index),
    };
  }
}

/** Whether VMCOREINFO exports enough of the tables to try (6.0+ with CONFIG_KALLSYMS). */
export function hasKallsyms(info: VmcoreInfo): boolean {
  return (
    info.has("SYMBOL(kallsyms_names)") &&
    info.has("SYMBOL(kallsyms_num_syms)") &&
    info.has("SYMBOL(kallsyms_token_table)") &&
    info.has("SYMBOL(kallsyms_token_index)") &&
    (info.has("SYMBOL(kallsyms_offsets)") || info.has("SYMBOL(kallsyms_addresses)"))
  );
}

/**
 * Decodes and validates the running kernel's kallsyms. Throws KallsymsError (an IntrospectError) when the
 * tables are absent, unreadable, malformed, or agree with VMCOREINFO under no encoding.
 */
export function openKallsyms(kernel: KallsymsSource, options: OpenKallsymsOptions = {}): Kallsyms {
  const started = performance.now();
  const { info, addressSpace: as } = kernel;
  if (!hasKallsyms(info))
    throw new KallsymsError(
      "absent",
      `VMCOREINFO of ${info.osRelease} exports no kallsyms tables (Linux < 6.0 or CONFIG_KALLSYMS off)`,
    );
  const sym = (key: string) => tableAddress(info, key);
  const maxSymbols = Math.min(options.maxSymbols ?? MAX_KALLSYMS, MAX_KALLSYMS);

  const count = readU32(as, sym("SYMBOL(kallsyms_num_syms)"), "kallsyms_num_syms");
  if (count < 1 || count > maxSymbols)
    throw new KallsymsError("malformed", `kallsyms_num_syms = ${count}, outside 1..${maxSymbols}`);

  const tokens = readTokens(as, sym("SYMBOL(kallsyms_token_index)"), sym("SYMBOL(kallsyms_token_table)"));
  const names = new NamesStream(as, sym("SYMBOL(kallsyms_names)"));
  const encodings = readEncodings(as, info, count);

  // 2-byte counts first (every kernel that exports the tables but 6.0); 1-byte counts only if that fails and
  // some count had bit 7 set (otherwise both readings are the same).
  let failure: KallsymsError | undefined;
  for (const long of [true, false]) {
    let decoded: Decoded;
    try {
      decoded = decodeNames(names, tokens, count, long);
    } catch (error) {
      if (!(error instanceof KallsymsError)) throw error;
      failure ??= error;
      continue;
    }
    try {
      const chosen = chooseEncoding(as, info, decoded, encodings);
      return new Kallsyms(
        chosen.encoding,
        long && decoded.sawLong,
        decoded.names,
        chosen.addressAt,
        chosen.checks,
        performance.now() - started,
      );
    } catch (error) {
      if (!(error instanceof KallsymsError)) throw error;
      failure ??= error;
      if (!decoded.sawLong) break;
    }
  }
  throw failure ?? new KallsymsError("malformed", "no decoding of kallsyms_names");
}

/** A kallsyms table address from VMCOREINFO: must lie in the kernel image mapping (the tables are rodata). */
function tableAddress(info: VmcoreInfo, key: string): bigint {
  const va = info.symbol(key);
  if (va < START_KERNEL_MAP)
    throw new KallsymsError(
      "malformed",
      `${key}=${hex(va)} is outside the kernel image mapping (≥ ${hex(START_KERNEL_MAP)})`,
    );
  return va;
}

function readExact(as: AddressSpace, va: bigint, length: number, what: string): Buffer {
  const buf = Buffer.alloc(length);
  try {
    as.readVirt(va, buf);
  } catch (error) {
    if (error instanceof IntrospectError)
      throw new KallsymsError("unreadable", `${what} (${length} bytes at ${hex(va)}): ${error.message}`);
    throw error;
  }
  return buf;
}

function readU32(as: AddressSpace, va: bigint, what: string): number {
  return readExact(as, va, 4, what).readUInt32LE(0);
}

/**
 * Reads up to `length` bytes at `va`, stopping at the first page the tables do not map (tables end somewhere
 * in rodata and we do not know where: a short read is fine, the caller checks it got what it needs).
 */
function readMapped(as: AddressSpace, va: bigint, length: number): Buffer {
  const buf = Buffer.alloc(length);
  if (as.tryReadVirt(va, buf)) return buf;
  // Find the mapped prefix page by page (rare: only when the read crosses the end of the mapping).
  let mapped = 0;
  while (mapped < length && as.tryTranslate((va + BigInt(mapped)) & MASK64) >= 0) {
    const pageLeft = PAGE - Number((va + BigInt(mapped)) & BigInt(PAGE - 1));
    mapped = Math.min(length, mapped + pageLeft);
  }
  if (mapped === 0 || !as.tryReadVirt(va, buf, 0, mapped)) return buf.subarray(0, 0);
  return buf.subarray(0, mapped);
}

interface Tokens {
  /** All tokens' bytes; token b is data[start[b], start[b] + length[b]), length -1 for a refused token. */
  data: Uint8Array;
  start: Int32Array;
  length: Int32Array;
  /** Polynomial hash of each token, and HASH_BASE^length (to append a token to a hash). */
  hash: Int32Array;
  power: Int32Array;
  /** The same for the token without its first character (the first token of a name: the type letter). */
  tailHash: Int32Array;
  tailPower: Int32Array;
}

/**
 * The 256 tokens: u16 offsets, each a NUL-terminated string. scripts/kallsyms.c write_src() emits
 * `kallsyms_token_index` right after `kallsyms_token_table` (in 6.1's order and in 6.4+'s, 404bad70fcf7), so
 * when the index follows the table closely every token must end before it; otherwise within what is mapped.
 */
function readTokens(as: AddressSpace, indexVa: bigint, tableVa: bigint): Tokens {
  const index = readExact(as, indexVa, TOKENS * 2, "kallsyms_token_index");
  let maxOffset = 0;
  for (let i = 0; i < TOKENS; i++) maxOffset = Math.max(maxOffset, index.readUInt16LE(i * 2));
  const reach = maxOffset + KSYM_NAME_LEN + 1;
  const gap = indexVa - tableVa;
  const bounded = gap > 0n && gap <= BigInt(0x10000 + KSYM_NAME_LEN + 8);
  const table = bounded
    ? readExact(as, tableVa, Number(gap), "kallsyms_token_table")
    : readMapped(as, tableVa, reach);
  const start = new Int32Array(TOKENS);
  const length = new Int32Array(TOKENS);
  for (let i = 0; i < TOKENS; i++) {
    const at = index.readUInt16LE(i * 2);
    const end = at < table.length ? table.indexOf(0, at) : -1;
    if (end < 0 || end - at > KSYM_NAME_LEN)
      throw new KallsymsError(
        "malformed",
        `token ${i} at kallsyms_token_table+${at} does not end (NUL) within the ${table.length} bytes of the ${bounded ? "table (it ends where kallsyms_token_index starts)" : "mapped table"}`,
      );
    start[i] = at;
    // Symbol names are printable; a control character (our "\n" separator among them) makes the token
    // unusable.
    length[i] = table.subarray(at, end).some((c) => c < 0x20 || c === 0x7f) ? -1 : end - at;
  }
  const hash = new Int32Array(TOKENS);
  const power = new Int32Array(TOKENS);
  const tailHash = new Int32Array(TOKENS);
  const tailPower = new Int32Array(TOKENS);
  for (let i = 0; i < TOKENS; i++) {
    let h = 0;
    let p = 1;
    const from = start[i] as number;
    const end = from + Math.max(0, length[i] as number);
    for (let k = end - 1; k >= from; k--) {
      // Built from the end: h = Σ c_k·B^(end-1-k); the tail (from + 1) is the same sum without the first
      // term.
      if (k === from) {
        tailHash[i] = h;
        tailPower[i] = p;
      }
      h = (h + Math.imul(table[k] as number, p)) | 0;
      p = Math.imul(p, HASH_BASE);
    }
    hash[i] = h;
    power[i] = p;
  }
  return { data: table, start, length, hash, power, tailHash, tailPower };
}

/** `kallsyms_names`, read on demand in growing positional reads, never beyond MAX_NAMES_BYTES. */
class NamesStream {
  bytes: Buffer = Buffer.alloc(0);
  /** The mapping ended (or the cap was reached): no more bytes will come. */
  private exhausted = false;

  constructor(
    private readonly as: AddressSpace,
    readonly va: bigint,
  ) {}

  /** Makes bytes [0, end) available; false if they are not mapped or exceed the cap. */
  ensure(end: number): boolean {
    while (end > this.bytes.length) {
      if (this.exhausted) return false;
      const target = Math.min(MAX_NAMES_BYTES, Math.max(NAMES_FIRST_READ, this.bytes.length * 2, end));
      const want = target - this.bytes.length;
      if (want <= 0) {
        this.exhausted = true;
        return false;
      }
      const more = readMapped(this.as, (this.va + BigInt(this.bytes.length)) & MASK64, want);
      if (more.length < want || target === MAX_NAMES_BYTES) this.exhausted = true;
      this.bytes = this.bytes.length === 0 ? more : Buffer.concat([this.bytes, more]);
    }
    return true;
  }
}

interface Decoded {
  names: SymbolNames;
  /** Some count used the 2-byte form. */
  sawLong: boolean;
}

/**
 * One pass over `count` names: the token count (1 or 2 bytes), then per token its length and hash; the first
 * character is the type letter (kernel/kallsyms.c kallsyms_expand_symbol skips it). Nothing is expanded here.
 */
function decodeNames(stream: NamesStream, tokens: Tokens, count: number, long: boolean): Decoded {
  if (!stream.ensure(Math.min(count * 2, MAX_NAMES_BYTES)) && stream.bytes.length === 0)
    throw new KallsymsError("unreadable", `kallsyms_names at ${hex(stream.va)} is not mapped`);
  const { length: tLength, hash: tHash, power: tPower, tailHash, tailPower, data, start: tStart } = tokens;
  const types = new Uint8Array(count);
  const hashes = new Uint32Array(count);
  const at = new Uint32Array(count);
  const tokenCounts = new Uint16Array(count);
  let bytes: Uint8Array = stream.bytes;
  let sawLong = false;
  let pos = 0;
  for (let i = 0; i < count; i++) {
    if (pos + 2 > bytes.length) {
      // The last name may end exactly at the end of the mapping: ask for one byte when two are not there.
      if (!stream.ensure(pos + 2) && !stream.ensure(pos + 1)) throw namesOverrun(i, count, pos + 1, stream);
      bytes = stream.bytes;
    }
    let len = bytes[pos++] as number;
    if (long && len & 0x80) {
      const high = bytes[pos++];
      if (high === undefined || high & 0x80)
        throw new KallsymsError(
          "malformed",
          `symbol ${i}: token count at kallsyms_names+${pos - 2} is longer than two bytes`,
        );
      len = (len & 0x7f) | (high << 7);
      sawLong = true;
    }
    if (len === 0 || len > MAX_NAME_TOKENS)
      throw new KallsymsError("malformed", `symbol ${i}: token count ${len} at kallsyms_names+${pos - 1}`);
    const end = pos + len;
    if (end > bytes.length) {
      if (!stream.ensure(end)) throw namesOverrun(i, count, end, stream);
      bytes = stream.bytes;
    }
    let typed = false;
    let chars = 0;
    let h = 0;
    for (let j = pos; j < end; j++) {
      const t = bytes[j] as number;
      const tl = tLength[t] as number;
      if (tl < 0)
        throw new KallsymsError("malformed", `symbol ${i} uses token ${t}, which holds a control character`);
      chars += tl;
      if (typed) h = (Math.imul(h, tPower[t] as number) + (tHash[t] as number)) | 0;
      else if (tl > 0) {
        types[i] = data[tStart[t] as number] as number;
        h = (Math.imul(h, tailPower[t] as number) + (tailHash[t] as number)) | 0;
        typed = true;
      }
    }
    if (chars < 2 || chars > KSYM_NAME_LEN)
      throw new KallsymsError(
        "malformed",
        `symbol ${i} expands to ${chars} characters (type letter + name, 2..${KSYM_NAME_LEN})`,
      );
    at[i] = pos;
    tokenCounts[i] = len;
    hashes[i] = h >>> 0;
    pos = end;
  }
  return { names: new SymbolNames(stream.bytes, at, tokenCounts, types, hashes, tokens), sawLong };
}

function namesOverrun(i: number, count: number, end: number, stream: NamesStream): KallsymsError {
  return new KallsymsError(
    "malformed",
    `kallsyms_names ends (mapped or capped at ${stream.bytes.length} bytes) before symbol ${i} of ${count} (needs ${end} bytes)`,
  );
}

interface EncodingInput {
  encoding: KallsymsEncoding;
  addressAt: (index: number) => bigint;
  /** Whether addresses are non-decreasing in table order (scripts/kallsyms.c sorts by address). */
  sorted: () => number;
}

/** The address encodings the exported tables allow, each with its address function. */
function readEncodings(as: AddressSpace, info: VmcoreInfo, count: number): EncodingInput[] {
  const out: EncodingInput[] = [];
  if (info.has("SYMBOL(kallsyms_addresses)")) {
    const va = tableAddress(info, "SYMBOL(kallsyms_addresses)");
    const table = readExact(as, va, count * 8, "kallsyms_addresses");
    out.push({
      encoding: "absolute",
      addressAt: (i) => table.readBigUInt64LE(i * 8),
      sorted: () => firstUnsorted(count, (i) => table.readBigUInt64LE(i * 8)),
    });
  }
  if (!info.has("SYMBOL(kallsyms_offsets)")) return out;
  const offsetsVa = tableAddress(info, "SYMBOL(kallsyms_offsets)");
  const offsets = readExact(as, offsetsVa, count * 4, "kallsyms_offsets");
  if (info.has("SYMBOL(kallsyms_relative_base)")) {
    const baseVa = tableAddress(info, "SYMBOL(kallsyms_relative_base)");
    const base = readExact(as, baseVa, 8, "kallsyms_relative_base").readBigUInt64LE(0);
    out.push({
      encoding: "absolute-percpu",
      addressAt: (i) => {
        const v = offsets.readInt32LE(i * 4);
        return v >= 0 ? BigInt(v) : (base - 1n - BigInt(v)) & MASK64;
      },
      // Absolute (per-CPU, ≥ 0) entries come first, then base-relative ones with -1-v growing.
      sorted: () => {
        let inRelative = false;
        let prev = -1;
        for (let i = 0; i < count; i++) {
          const v = offsets.readInt32LE(i * 4);
          if (v < 0 && !inRelative) {
            inRelative = true;
            prev = -1;
          }
          if (v >= 0 && inRelative) return i;
          const key = v >= 0 ? v : -1 - v;
          if (key < prev) return i;
          prev = key;
        }
        return -1;
      },
    });
    out.push({
      encoding: "relative-base",
      addressAt: (i) => (base + BigInt(offsets.readUInt32LE(i * 4))) & MASK64,
      sorted: () => firstUnsorted(count, (i) => offsets.readUInt32LE(i * 4)),
    });
  }
  out.push({
    encoding: "place-relative",
    addressAt: (i) => (offsetsVa + BigInt(i * 4 + offsets.readInt32LE(i * 4))) & MASK64,
    sorted: () => firstUnsorted(count, (i) => i * 4 + offsets.readInt32LE(i * 4)),
  });
  return out;
}

/** Index of the first entry below its predecessor, or -1 (offsets as numbers, addresses as bigints). */
function firstUnsorted<T extends number | bigint>(count: number, at: (i: number) => T): number {
  let prev = at(0);
  for (let i = 1; i < count; i++) {
    const v = at(i);
    if (v < prev) return i;
    prev = v;
  }
  return -1;
}

/**
 * The one encoding under which every checkable VMCOREINFO symbol agrees and the table is sorted. Mismatches
 * of every candidate are reported, so a refusal says what was compared.
 */
function chooseEncoding(
  as: AddressSpace,
  info: VmcoreInfo,
  decoded: Decoded,
  encodings: readonly EncodingInput[],
): { encoding: KallsymsEncoding; addressAt: (index: number) => bigint; checks: KallsymsCheck[] } {
  const names = decoded.names;
  // Each name is looked up once (a lookup scans the names), then compared under every encoding.
  const applicable = CHECKS.filter((c) => info.has(c.key))
    .map((c) => ({ ...c, indices: names.indices(c.symbol) }))
    .filter((c) => c.indices.length > 0);
  const stext = applicable.find((c) => c.symbol === "_stext");
  if (!stext)
    throw new KallsymsError(
      "mismatch",
      `no symbol "_stext" among ${names.count} decoded names (wrong name encoding?)`,
    );
  const passing: { encoding: KallsymsEncoding; addressAt: (i: number) => bigint; checks: KallsymsCheck[] }[] =
    [];
  const reasons: string[] = [];
  for (const enc of encodings) {
    const checks: KallsymsCheck[] = [];
    let failed: string | undefined;
    for (const c of applicable) {
      const expected = info.symbol(c.key);
      const indices = c.indices;
      // Any symbol of that name may be the one VMCOREINFO means (a static of the same name elsewhere is not).
      let match: KallsymsCheck | undefined;
      let shown = 0n;
      for (const i of indices) {
        const address = enc.addressAt(i);
        shown = address;
        if (address === expected) {
          match = { symbol: c.symbol, key: c.key, expected, actual: address, how: "address" };
          break;
        }
        if (c.pointer) {
          const value = readPointer(as, address);
          if (value === expected) {
            match = { symbol: c.symbol, key: c.key, expected, actual: value, how: "pointer" };
            break;
          }
        }
      }
      if (!match) {
        failed = `${c.symbol} decodes to ${hex(shown)}, ${c.key} is ${hex(expected)}`;
        break;
      }
      checks.push(match);
    }
    if (failed === undefined) {
      const unsorted = enc.sorted();
      if (unsorted >= 0)
        failed = `addresses not sorted at symbol ${unsorted} (${names.name(unsorted)} ${hex(enc.addressAt(unsorted))})`;
    }
    if (failed === undefined) passing.push({ encoding: enc.encoding, addressAt: enc.addressAt, checks });
    else reasons.push(`${enc.encoding}: ${failed}`);
  }
  const [only] = passing;
  if (passing.length === 1 && only) return only;
  if (passing.length > 1)
    throw new KallsymsError(
      "ambiguous",
      `encodings ${passing.map((p) => p.encoding).join(" and ")} both agree with VMCOREINFO`,
    );
  throw new KallsymsError(
    "mismatch",
    `no address encoding agrees with VMCOREINFO (${reasons.join("; ") || "no encoding applies"})`,
  );
}

function readPointer(as: AddressSpace, va: bigint): bigint | undefined {
  const buf = Buffer.alloc(8);
  return as.tryReadVirt(va, buf) ? buf.readBigUInt64LE(0) : undefined;
}
