/**
 * BTF (BPF Type Format): the kernel's own description of its types, the `.BTF` section between `__start_BTF`
 * and `__stop_BTF` (CONFIG_DEBUG_INFO_BTF), read out of guest memory to learn struct layouts and enum values of
 * kernels vmprune has no profile for (../shared/docs/kernel-layouts.md §2, §6).
 *
 * Format (include/uapi/linux/btf.h, Documentation/bpf/btf.rst): a header, then a type section of 12-byte
 * `struct btf_type` records, each followed by kind-specific data, then a string section of NUL-terminated names.
 * Type ids count records from 1; id 0 is void.
 *
 * The blob comes from guest memory, so it is untrusted: `Btf.parse` checks everything that lookups later rely on
 * (record bounds, kinds, string offsets, type ids, acyclic modifier chains) in one pass over the records and one
 * over the typedef/qualifier chains, allocates only in proportion to the bytes actually present, and throws
 * `BtfError` naming the byte offset of the first fault. Names are indexed on the first lookup by name.
 * After a successful parse, lookups return `undefined` for anything that is not there and throw only `BtfError`
 * (a nesting deeper than any kernel's, or a caller asking for the byte offset of a bitfield), never anything else.
 *
 * Checks follow what the kernel itself enforces on BTF it loads (kernel/bpf/btf.c: btf_parse_hdr,
 * btf_parse_str_sec, btf_check_meta and the per-kind check_meta functions). The kernel runs those checks on its own
 * vmlinux BTF at boot, so a real kernel's BTF always passes them, and garbage rarely does.
 */
import { IntrospectError, type IntrospectErrorCode } from "./errors.ts";

// ---- format constants (include/uapi/linux/btf.h unless said otherwise) ----

/** `BTF_MAGIC`, stored little-endian on x86-64: bytes 9f eb. */
const BTF_MAGIC = 0xeb9f;
/** The magic read with the wrong byte order: a big-endian blob (never an x86-64 guest's). */
const BTF_MAGIC_SWAPPED = 0x9feb;
/** `BTF_VERSION`. */
const BTF_VERSION = 1;
/** `sizeof(struct btf_header)`: magic u16, version u8, flags u8, hdr_len, type_off, type_len, str_off, str_len. */
const HEADER_BYTES = 24;
/**
 * A longer `hdr_len` is a newer header with more fields after ours; we read ours and skip the rest (the kernel
 * requires them zero, so a kernel whose header has more is newer than our reader). The bound is ours: real
 * headers are 24 bytes, and a forged length is caught before it moves the sections anywhere.
 */
const MAX_HEADER_BYTES = 4096;
/** `BTF_MAX_TYPE`: the highest type id. */
const BTF_MAX_TYPE = 0x000fffff;
/** `BTF_MAX_NAME_OFFSET`: the highest offset into the string section. */
const BTF_MAX_NAME_OFFSET = 0x00ffffff;
/** `sizeof(struct btf_type)`: name_off, info, size/type, in u32 words. */
const TYPE_WORDS = 3;
/** `info` bits: vlen 0-15, kind 24-28, kind_flag 31 (`BTF_INFO_VLEN`, `BTF_INFO_KIND`, `BTF_INFO_KFLAG`). */
const INFO_VLEN_MASK = 0xffff;
const INFO_KIND_SHIFT = 24;
const INFO_KIND_MASK = 0x1f;
/** Bits 16-23 and 29-30 of `info` are unused; the kernel rejects a set one (btf_check_meta, BTF_INFO_MASK). */
const INFO_UNUSED_MASK = 0x60ff0000;
/** `BTF_INT_ENCODING` bits 24-27, `BTF_INT_OFFSET` bits 16-23, `BTF_INT_BITS` bits 0-7 of the INT's u32. */
const INT_ENCODING_SHIFT = 24;
const INT_OFFSET_SHIFT = 16;
/** Bits of the INT's u32 the kernel rejects set: those outside BTF_INT_MASK 0x0fffffff (kernel/bpf/btf.c). */
const INT_UNUSED_MASK = 0xf0000000;
/** `BTF_INT_SIGNED`, `BTF_INT_CHAR`, `BTF_INT_BOOL`. */
const INT_SIGNED = 1;
const INT_CHAR = 2;
const INT_BOOL = 4;
/** The kernel's limit on an INT's bits (btf_int_check_meta: BITS_PER_U128). */
const INT_MAX_BITS = 128;
/** `BTF_MEMBER_BITFIELD_SIZE` (top 8 bits) and `BTF_MEMBER_BIT_OFFSET` (low 24 bits) when kind_flag is set. */
const MEMBER_BITFIELD_SHIFT = 24;
const MEMBER_BIT_OFFSET_MASK = 0xffffff;
/** Kind-specific data after `struct btf_type`, in u32 words (every field of every struct is a u32/s32). */
const INT_EXTRA_WORDS = 1; // u32 encoding/offset/bits
const ARRAY_WORDS = 3; // struct btf_array: type, index_type, nelems
const MEMBER_WORDS = 3; // struct btf_member: name_off, type, offset
const ENUM_WORDS = 2; // struct btf_enum: name_off, s32 val
const ENUM64_WORDS = 3; // struct btf_enum64: name_off, val_lo32, val_hi32
const PARAM_WORDS = 2; // struct btf_param: name_off, type
const VAR_WORDS = 1; // struct btf_var: linkage
const SECINFO_WORDS = 3; // struct btf_var_secinfo: type, offset, size
const DECL_TAG_WORDS = 1; // struct btf_decl_tag: s32 component_idx

/** `BTF_KIND_*`. */
const KIND_INT = 1;
const KIND_PTR = 2;
const KIND_ARRAY = 3;
const KIND_STRUCT = 4;
const KIND_UNION = 5;
const KIND_ENUM = 6;
const KIND_FWD = 7;
const KIND_TYPEDEF = 8;
const KIND_VOLATILE = 9;
const KIND_CONST = 10;
const KIND_RESTRICT = 11;
const KIND_FUNC = 12;
const KIND_FUNC_PROTO = 13;
const KIND_VAR = 14;
const KIND_DATASEC = 15;
const KIND_FLOAT = 16;
const KIND_DECL_TAG = 17;
const KIND_TYPE_TAG = 18;
const KIND_ENUM64 = 19;
const KIND_MAX = KIND_ENUM64;
/** `BTF_FUNC_EXTERN`: the highest `enum btf_func_linkage`. */
const BTF_FUNC_EXTERN = 2;

/** Lower-case `BTF_KIND_*` names, indexed by kind number. */
const KIND_NAMES = [
  "unkn",
  "int",
  "ptr",
  "array",
  "struct",
  "union",
  "enum",
  "fwd",
  "typedef",
  "volatile",
  "const",
  "restrict",
  "func",
  "func_proto",
  "var",
  "datasec",
  "float",
  "decl_tag",
  "type_tag",
  "enum64",
] as const;

export type BtfKindName = Exclude<(typeof KIND_NAMES)[number], "unkn">;

/**
 * How deep a typedef/const/volatile/restrict/type_tag chain, an array of arrays, or a nest of anonymous
 * structs may go. The kernel resolves at most MAX_RESOLVE_DEPTH = 32 levels (kernel/bpf/btf.c); real kernels stay
 * far below it, and a deeper one is malformed (or a cycle).
 */
const MAX_DEPTH = 32;
/** x86-64 is LP64: BTF records no pointer size, and every guest vmprune reads is x86-64. */
const POINTER_BYTES = 8;

// ---- errors ----

/** Which check a blob failed, for callers that report it (the message says where and why). */
export type BtfErrorReason =
  /** Magic, version, flags or section offsets of the header. */
  | "bad-header"
  /** The buffer or a section ends before what it must hold. */
  | "truncated"
  /** A type record that cannot be right: unknown kind, unused bits set, impossible sizes. */
  | "bad-type"
  /** A name offset outside the string section, or a string section that is not NUL-delimited. */
  | "bad-string"
  /** A reference to a type id that does not exist. */
  | "bad-type-id"
  /** A modifier chain, array nesting or anonymous-member nesting that loops or goes deeper than any kernel's. */
  | "too-deep"
  /** A byte offset was asked of a bitfield member. */
  | "bitfield";

/**
 * The `IntrospectErrorCode` of every `BtfError`. errors.ts does not list it yet (that file is not ours to edit):
 * the cast stands until "bad-btf" joins the union there.
 */
const BTF_ERROR_CODE = "bad-btf" as string as IntrospectErrorCode;

/** A BTF blob that is malformed, truncated or not BTF at all; or a byte offset asked of a bitfield. */
export class BtfError extends IntrospectError {
  override readonly name = "BtfError";
  constructor(
    readonly reason: BtfErrorReason,
    /** Byte offset into the blob where the fault is, when there is one. */
    readonly offset: number | undefined,
    detail: string,
  ) {
    super(BTF_ERROR_CODE, offset === undefined ? `BTF: ${detail}` : `BTF at byte ${offset}: ${detail}`);
  }
}

// ---- decoded types ----

export interface BtfMember {
  /** "" for an anonymous member (an unnamed struct or union, or unnamed bitfield padding). */
  name: string;
  /** The declared type id (typedefs and qualifiers not stripped). */
  type: number;
  /** Bit offset from the start of the enclosing struct or union. */
  bitOffset: number;
  /** Width in bits of a bitfield, 0 for an ordinary member. */
  bitfieldSize: number;
}

export interface BtfEnumerator {
  name: string;
  value: bigint;
}

export interface BtfParam {
  name: string;
  type: number;
}

export interface BtfVarSecinfo {
  type: number;
  offset: number;
  size: number;
}

/** Kinds whose record holds nothing but another type's id. */
export type BtfRefKind = "ptr" | "typedef" | "volatile" | "const" | "restrict" | "type_tag";

interface Named {
  id: number;
  /** "" when the type has no name (anonymous struct, pointer, ...). */
  name: string;
}

/** One type record, decoded. Ids in it (`type`, `elemType`, ...) refer to other records of the same `Btf`. */
export type BtfType =
  | (Named & {
      kind: "int";
      size: number;
      bits: number;
      bitOffset: number;
      signed: boolean;
      char: boolean;
      bool: boolean;
    })
  | (Named & { kind: BtfRefKind; type: number })
  | (Named & { kind: "array"; elemType: number; indexType: number; nelems: number })
  | (Named & { kind: "struct" | "union"; size: number; members: BtfMember[] })
  | (Named & { kind: "enum" | "enum64"; size: number; signed: boolean; values: BtfEnumerator[] })
  | (Named & { kind: "fwd"; union: boolean })
  | (Named & { kind: "func"; type: number; linkage: number })
  | (Named & { kind: "func_proto"; returnType: number; params: BtfParam[] })
  | (Named & { kind: "var"; type: number; linkage: number })
  | (Named & { kind: "datasec"; size: number; vars: BtfVarSecinfo[] })
  | (Named & { kind: "float"; size: number })
  | (Named & { kind: "decl_tag"; type: number; componentIdx: number });

/** A member found by path: where it sits in the outermost struct or union the path started from. */
export interface BtfMemberLocation extends BtfMember {
  /** Bit offset from the start of the struct or union the lookup started from (`bitOffset` of BtfMember). */
  bitOffset: number;
  /** Id of the struct or union that declares the member (an anonymous one, for members of anonymous unions). */
  parent: number;
}

export interface BtfHeader {
  version: number;
  flags: number;
  hdrLen: number;
  /** Offsets relative to the end of the header, as in `struct btf_header`. */
  typeOff: number;
  typeLen: number;
  strOff: number;
  strLen: number;
}

/** A struct or union, by tag name ("page", without "struct ") or type id. */
export type BtfStructRef = string | number;

// ---- the parser ----

/** Per-kind tables, indexed by kind number, that keep the parse loop small and branch-free per kind. */
function kindTable(entries: Record<number, number>, fallback = 0): Int32Array {
  const table = new Int32Array(KIND_MAX + 1).fill(fallback);
  for (const [kind, value] of Object.entries(entries)) table[Number(kind)] = value;
  return table;
}
/** Words of fixed kind-specific data after the record. */
const FIXED_WORDS = kindTable({
  [KIND_INT]: INT_EXTRA_WORDS,
  [KIND_ARRAY]: ARRAY_WORDS,
  [KIND_VAR]: VAR_WORDS,
  [KIND_DECL_TAG]: DECL_TAG_WORDS,
});
/** Words of each of the vlen entries after the record (0: the kind has no entries). */
const ENTRY_WORDS = kindTable({
  [KIND_STRUCT]: MEMBER_WORDS,
  [KIND_UNION]: MEMBER_WORDS,
  [KIND_ENUM]: ENUM_WORDS,
  [KIND_ENUM64]: ENUM64_WORDS,
  [KIND_FUNC_PROTO]: PARAM_WORDS,
  [KIND_DATASEC]: SECINFO_WORDS,
});
/**
 * Highest vlen a kind allows: kinds without entries have 0, except FUNC, which keeps its linkage there
 * (btf_func_check_meta). -1 marks kind 0 (BTF_KIND_UNKN), which no record may have.
 */
const MAX_VLEN = kindTable(
  {
    [KIND_INT]: 0,
    [KIND_PTR]: 0,
    [KIND_ARRAY]: 0,
    [KIND_STRUCT]: INFO_VLEN_MASK,
    [KIND_UNION]: INFO_VLEN_MASK,
    [KIND_ENUM]: INFO_VLEN_MASK,
    [KIND_FWD]: 0,
    [KIND_TYPEDEF]: 0,
    [KIND_VOLATILE]: 0,
    [KIND_CONST]: 0,
    [KIND_RESTRICT]: 0,
    [KIND_FUNC]: BTF_FUNC_EXTERN,
    [KIND_FUNC_PROTO]: INFO_VLEN_MASK,
    [KIND_VAR]: 0,
    [KIND_DATASEC]: INFO_VLEN_MASK,
    [KIND_FLOAT]: 0,
    [KIND_DECL_TAG]: 0,
    [KIND_TYPE_TAG]: 0,
    [KIND_ENUM64]: INFO_VLEN_MASK,
  },
  -1,
);
/** 1 where the record's third word is a type id rather than a size. */
const HEADER_REF = kindTable({
  [KIND_PTR]: 1,
  [KIND_TYPEDEF]: 1,
  [KIND_VOLATILE]: 1,
  [KIND_CONST]: 1,
  [KIND_RESTRICT]: 1,
  [KIND_FUNC]: 1,
  [KIND_FUNC_PROTO]: 1,
  [KIND_VAR]: 1,
  [KIND_DECL_TAG]: 1,
  [KIND_TYPE_TAG]: 1,
});
/**
 * Stride of the parse loop's walk over a record's data, in words: the vlen entries of list kinds, or the one
 * btf_array of ARRAY (walked as a single entry so that its type ids go through the same check as members').
 */
const WALK_STRIDE = kindTable({
  [KIND_STRUCT]: MEMBER_WORDS,
  [KIND_UNION]: MEMBER_WORDS,
  [KIND_ENUM]: ENUM_WORDS,
  [KIND_ENUM64]: ENUM64_WORDS,
  [KIND_FUNC_PROTO]: PARAM_WORDS,
  [KIND_DATASEC]: SECINFO_WORDS,
  [KIND_ARRAY]: ARRAY_WORDS,
});
/** 1 where each entry starts with a name_off. */
const ENTRY_NAME = kindTable({
  [KIND_STRUCT]: 1,
  [KIND_UNION]: 1,
  [KIND_ENUM]: 1,
  [KIND_ENUM64]: 1,
  [KIND_FUNC_PROTO]: 1,
});
/**
 * Words FIRST..LAST of each entry are type ids (none where LAST < FIRST): btf_member.type, btf_param.type,
 * btf_var_secinfo.type, btf_array.type and index_type.
 */
const ENTRY_REF_FIRST = kindTable({ [KIND_STRUCT]: 1, [KIND_UNION]: 1, [KIND_FUNC_PROTO]: 1 }, 0);
const ENTRY_REF_LAST = kindTable(
  { [KIND_STRUCT]: 1, [KIND_UNION]: 1, [KIND_FUNC_PROTO]: 1, [KIND_DATASEC]: 0, [KIND_ARRAY]: 1 },
  -1,
);

function isModifier(kind: number): boolean {
  return (
    kind === KIND_TYPEDEF ||
    kind === KIND_VOLATILE ||
    kind === KIND_CONST ||
    kind === KIND_RESTRICT ||
    kind === KIND_TYPE_TAG
  );
}

/** Host byte order: the type section is read through an Int32Array, which uses it. */
const HOST_IS_LITTLE_ENDIAN = new Uint8Array(new Uint32Array([1]).buffer)[0] === 1;

export class Btf {
  /** Highest type id: ids 1..typeCount are types, 0 is void. */
  readonly typeCount: number;
  /** Bytes the blob occupies from its start (header + sections); a longer input buffer had trailing bytes. */
  readonly byteLength: number;

  /**
   * Names -> ids, built on the first lookup by name: one table for functions (about half of a kernel's names,
   * and never needed for a layout), one for every other kind.
   */
  private typeNames: NameTable | undefined;
  private funcNames: NameTable | undefined;
  /** Enumerator names -> enumerators, built on the first lookup across all enums. */
  private enumeratorNames: { table: NameTable; owner: Int32Array } | undefined;

  private constructor(
    readonly header: BtfHeader,
    /**
     * The type section as 32-bit words (every record and field is a u32 or s32), read signed: V8 keeps int32
     * values as small integers, where values of 2^31 and up in a Uint32Array would become heap numbers and
     * send the parse loop through deoptimizations. `word()` gives the unsigned value.
     */
    private readonly words: Int32Array,
    /** The string section. */
    private readonly strs: Buffer,
    /** Word index in `words` of each type's record, by id; index 0 unused. */
    private readonly recs: Uint32Array,
    /** Kind of each type, by id. */
    private readonly kinds: Uint8Array,
    /** name_off of each type, by id, for the name index. */
    private readonly nameOffs: Int32Array,
  ) {
    this.typeCount = recs.length - 1;
    this.byteLength =
      header.hdrLen + Math.max(header.typeOff + header.typeLen, header.strOff + header.strLen);
  }

  /**
   * Parses and checks a BTF blob. The input may be longer than the blob (a candidate found by scanning): bytes
   * after `byteLength` are ignored. Both sections are copied, so the caller may reuse its buffer.
   */
  static parse(input: Uint8Array): Btf {
    const header = parseHeader(input);
    const strStart = header.hdrLen + header.strOff;
    // Own copies: checks made here must still hold when lookups read the bytes later.
    const strs = Buffer.alloc(header.strLen);
    strs.set(input.subarray(strStart, strStart + header.strLen));
    checkStrings(strs, strStart);
    const typeStart = header.hdrLen + header.typeOff;
    const words = new Int32Array(header.typeLen / 4);
    new Uint8Array(words.buffer).set(input.subarray(typeStart, typeStart + header.typeLen));
    if (!HOST_IS_LITTLE_ENDIAN) {
      for (let i = 0; i < words.length; i++) {
        const v = words[i] as number;
        words[i] = ((v & 0xff) << 24) | ((v & 0xff00) << 8) | ((v >>> 8) & 0xff00) | (v >>> 24);
      }
    }
    const { recs, kinds, nameOffs } = walkTypes(words, typeStart, header.strLen);
    checkModifierChains(words, recs, kinds, typeStart);
    return new Btf(header, words, strs, recs, kinds, nameOffs);
  }

  // ---- raw access ----

  /** Byte offset in the blob of word `w` of the type section, for error messages. */
  private blobOffset(w: number): number {
    return this.header.hdrLen + this.header.typeOff + w * 4;
  }

  /** The NUL-terminated string at `off` of the string section (parse checked every offset a record holds). */
  private str(off: number): string {
    if (off === 0) return "";
    const end = this.strs.indexOf(0, off);
    return this.strs.toString("latin1", off, end < 0 ? this.strs.length : end);
  }

  private validId(id: number): boolean {
    return Number.isInteger(id) && id >= 1 && id <= this.typeCount;
  }

  private kindOf(id: number): number {
    return this.kinds[id] as number;
  }

  private rec(id: number): number {
    return this.recs[id] as number;
  }

  /** Word `w` of the type section, unsigned. */
  private word(w: number): number {
    return (this.words[w] as number) >>> 0;
  }

  private vlenOf(id: number): number {
    return this.word(this.rec(id) + 1) & INFO_VLEN_MASK;
  }

  private kflagOf(id: number): boolean {
    return this.word(this.rec(id) + 1) >>> 31 === 1;
  }

  /** The record's third word: `size` or `type` depending on the kind. */
  private sizeOrType(id: number): number {
    return this.word(this.rec(id) + 2);
  }

  // ---- general queries ----

  /** The kind of type `id` ("struct", "typedef", ...), or undefined if no such id (0, void, included). */
  kind(id: number): BtfKindName | undefined {
    if (!this.validId(id)) return undefined;
    return KIND_NAMES[this.kindOf(id)] as BtfKindName;
  }

  /** The name of type `id` ("" if anonymous), or undefined if no such id. */
  name(id: number): string | undefined {
    return this.validId(id) ? this.str(this.word(this.rec(id))) : undefined;
  }

  /** Decodes one type record, or undefined if no such id (0, void, included). */
  type(id: number): BtfType | undefined {
    if (!this.validId(id)) return undefined;
    const kind = this.kindOf(id);
    const w = this.rec(id);
    const name = this.str(this.word(w));
    const vlen = this.word(w + 1) & INFO_VLEN_MASK;
    const kflag = this.word(w + 1) >>> 31 === 1;
    const ref = this.word(w + 2);
    const data = w + TYPE_WORDS;
    switch (kind) {
      case KIND_INT: {
        const v = this.word(data);
        const encoding = (v >>> INT_ENCODING_SHIFT) & 0xf;
        return {
          kind: "int",
          id,
          name,
          size: ref,
          bits: v & 0xff,
          bitOffset: (v >>> INT_OFFSET_SHIFT) & 0xff,
          signed: (encoding & INT_SIGNED) !== 0,
          char: (encoding & INT_CHAR) !== 0,
          bool: (encoding & INT_BOOL) !== 0,
        };
      }
      case KIND_PTR:
      case KIND_TYPEDEF:
      case KIND_VOLATILE:
      case KIND_CONST:
      case KIND_RESTRICT:
      case KIND_TYPE_TAG:
        return { kind: KIND_NAMES[kind] as BtfRefKind, id, name, type: ref };
      case KIND_ARRAY:
        return {
          kind: "array",
          id,
          name,
          elemType: this.word(data),
          indexType: this.word(data + 1),
          nelems: this.word(data + 2),
        };
      case KIND_STRUCT:
      case KIND_UNION: {
        const members: BtfMember[] = [];
        for (let i = 0; i < vlen; i++) members.push(this.memberAt(id, i));
        return { kind: kind === KIND_STRUCT ? "struct" : "union", id, name, size: ref, members };
      }
      case KIND_ENUM:
      case KIND_ENUM64: {
        const values: BtfEnumerator[] = [];
        for (let i = 0; i < vlen; i++) values.push(this.enumeratorAt(id, i));
        return { kind: kind === KIND_ENUM ? "enum" : "enum64", id, name, size: ref, signed: kflag, values };
      }
      case KIND_FWD:
        return { kind: "fwd", id, name, union: kflag };
      case KIND_FUNC:
        // vlen holds the linkage (enum btf_func_linkage).
        return { kind: "func", id, name, type: ref, linkage: vlen };
      case KIND_FUNC_PROTO: {
        const params: BtfParam[] = [];
        for (let i = 0; i < vlen; i++) {
          const p = data + i * PARAM_WORDS;
          params.push({ name: this.str(this.word(p)), type: this.word(p + 1) });
        }
        return { kind: "func_proto", id, name, returnType: ref, params };
      }
      case KIND_VAR:
        return { kind: "var", id, name, type: ref, linkage: this.word(data) };
      case KIND_DATASEC: {
        const vars: BtfVarSecinfo[] = [];
        for (let i = 0; i < vlen; i++) {
          const p = data + i * SECINFO_WORDS;
          vars.push({ type: this.word(p), offset: this.word(p + 1), size: this.word(p + 2) });
        }
        return { kind: "datasec", id, name, size: ref, vars };
      }
      case KIND_FLOAT:
        return { kind: "float", id, name, size: ref };
      default:
        // KIND_DECL_TAG: parse admitted no other kind. component_idx is an s32 (-1: the type itself).
        return { kind: "decl_tag", id, name, type: ref, componentIdx: this.words[data] as number };
    }
  }

  /**
   * Member `i` of struct/union `id`, with the bitfield made explicit either way BTF encodes it: in the member's
   * offset word when the struct's kind_flag is set, or (older encoders) in the bit offset and width of the INT
   * type the member refers to.
   */
  private memberAt(id: number, i: number): BtfMember {
    const p = this.rec(id) + TYPE_WORDS + i * MEMBER_WORDS;
    const name = this.str(this.word(p));
    const type = this.word(p + 1);
    const raw = this.word(p + 2);
    if (this.kflagOf(id)) {
      return {
        name,
        type,
        bitOffset: raw & MEMBER_BIT_OFFSET_MASK,
        bitfieldSize: raw >>> MEMBER_BITFIELD_SHIFT,
      };
    }
    const target = this.resolveChecked(type);
    if (target !== 0 && this.kindOf(target) === KIND_INT) {
      const v = this.word(this.rec(target) + TYPE_WORDS);
      const bits = v & 0xff;
      const intOffset = (v >>> INT_OFFSET_SHIFT) & 0xff;
      if (intOffset !== 0 || bits !== this.sizeOrType(target) * 8) {
        return { name, type, bitOffset: raw + intOffset, bitfieldSize: bits };
      }
    }
    return { name, type, bitOffset: raw, bitfieldSize: 0 };
  }

  private enumeratorAt(id: number, i: number): BtfEnumerator {
    const signed = this.kflagOf(id);
    if (this.kindOf(id) === KIND_ENUM) {
      const p = this.rec(id) + TYPE_WORDS + i * ENUM_WORDS;
      // kind_flag says signed (Linux 6.0+); without it the 32 bits are an unsigned value, as libbpf reads them.
      const value = signed ? (this.words[p + 1] as number) : this.word(p + 1);
      return { name: this.str(this.word(p)), value: BigInt(value) };
    }
    const p = this.rec(id) + TYPE_WORDS + i * ENUM64_WORDS;
    const unsigned = (BigInt(this.word(p + 2)) << 32n) | BigInt(this.word(p + 1));
    return { name: this.str(this.word(p)), value: signed ? BigInt.asIntN(64, unsigned) : unsigned };
  }

  /**
   * Strips typedefs and qualifiers (const, volatile, restrict, type tags): the type a value really has. Returns
   * 0 for void, undefined if `id` is no type id.
   */
  resolve(id: number): number | undefined {
    if (id === 0) return 0;
    if (!this.validId(id)) return undefined;
    return this.resolveChecked(id);
  }

  /** `resolve` for an id parse already checked. */
  private resolveChecked(id: number): number {
    let current = id;
    for (let depth = 0; depth <= MAX_DEPTH; depth++) {
      if (current === 0 || !isModifier(this.kindOf(current))) return current;
      current = this.sizeOrType(current);
    }
    // Parse rejected cycles and chains this deep; reaching here means it did not, so say so rather than loop.
    throw new BtfError(
      "too-deep",
      this.blobOffset(this.rec(id)),
      `type ${id}: modifier chain deeper than ${MAX_DEPTH}`,
    );
  }

  /**
   * Size in bytes of a value of type `id` (typedefs and qualifiers stripped, arrays multiplied out, pointers 8).
   * Undefined for void, functions, forward declarations and unknown ids.
   */
  sizeOf(id: number): number | undefined {
    if (!this.validId(id)) return undefined;
    let multiplier = 1;
    let current = id;
    for (let depth = 0; depth <= MAX_DEPTH; depth++) {
      current = this.resolveChecked(current);
      if (current === 0) return undefined;
      switch (this.kindOf(current)) {
        case KIND_INT:
        case KIND_STRUCT:
        case KIND_UNION:
        case KIND_ENUM:
        case KIND_ENUM64:
        case KIND_FLOAT:
        case KIND_DATASEC:
          return multiplier * this.sizeOrType(current);
        case KIND_PTR:
          return multiplier * POINTER_BYTES;
        case KIND_ARRAY: {
          const data = this.rec(current) + TYPE_WORDS;
          multiplier *= this.word(data + 2);
          current = this.word(data);
          continue;
        }
        default:
          return undefined;
      }
    }
    throw new BtfError(
      "too-deep",
      this.blobOffset(this.rec(id)),
      `type ${id}: arrays nested deeper than ${MAX_DEPTH}`,
    );
  }

  // ---- names ----

  /** All ids named `name`, in id order: of kinds other than FUNC, of FUNC only, or of any kind. */
  private idsNamed(name: string, which: "types" | "funcs" | "all" = "types"): number[] {
    const bytes = nameBytes(name);
    if (bytes === undefined) return [];
    if (which === "funcs") {
      this.funcNames ??= new NameTable(this.strs, this.nameOffs, this.typeCount, this.kinds, true);
      return this.funcNames.find(bytes);
    }
    this.typeNames ??= new NameTable(this.strs, this.nameOffs, this.typeCount, this.kinds, false);
    const ids = this.typeNames.find(bytes);
    if (which === "types") return ids;
    return [...ids, ...this.idsNamed(name, "funcs")].sort((a, b) => a - b);
  }

  /** All ids named `name`, in id order, optionally of one kind. */
  findTypeIds(name: string, kind?: BtfKindName): number[] {
    const ids = this.idsNamed(name, kind === undefined ? "all" : kind === "func" ? "funcs" : "types");
    return kind === undefined ? ids : ids.filter((id) => KIND_NAMES[this.kindOf(id)] === kind);
  }

  /** The first id named `name` (of `kind`, if given), or undefined. */
  findTypeId(name: string, kind?: BtfKindName): number | undefined {
    return this.findTypeIds(name, kind)[0];
  }

  /**
   * The struct or union a caller means: by id (typedefs stripped), or by name: `struct name` first, then
   * `union name`, then a typedef of that name that resolves to one (`memdesc_flags_t`).
   */
  private compositeId(ref: BtfStructRef): number | undefined {
    let id: number | undefined;
    if (typeof ref === "number") {
      id = this.resolve(ref);
    } else {
      id = this.findTypeId(ref, "struct") ?? this.findTypeId(ref, "union");
      if (id === undefined) {
        const typedef = this.findTypeId(ref, "typedef");
        if (typedef !== undefined) id = this.resolveChecked(typedef);
      }
    }
    if (id === undefined || id === 0) return undefined;
    const kind = this.kindOf(id);
    return kind === KIND_STRUCT || kind === KIND_UNION ? id : undefined;
  }

  /** sizeof(struct or union), or undefined if there is none of that name. */
  structSize(ref: BtfStructRef): number | undefined {
    const id = this.compositeId(ref);
    return id === undefined ? undefined : this.sizeOrType(id);
  }

  // ---- members ----

  /**
   * Finds member `name` of struct/union `id`, looking inside anonymous struct/union members too (C lets
   * `page->mapping` name a member of an anonymous struct inside an anonymous union). `visited` keeps a hostile
   * blob that reuses one anonymous struct many times from making the search exponential; C forbids a name twice
   * in one struct, so skipping a struct already searched never skips an answer.
   */
  private findMember(
    id: number,
    name: string,
    baseBits: number,
    depth: number,
    visited: Set<number>,
  ): BtfMemberLocation | undefined {
    if (depth > MAX_DEPTH) {
      throw new BtfError(
        "too-deep",
        this.blobOffset(this.rec(id)),
        `type ${id}: anonymous members nested deeper than ${MAX_DEPTH}`,
      );
    }
    visited.add(id);
    const vlen = this.vlenOf(id);
    for (let i = 0; i < vlen; i++) {
      const member = this.memberAt(id, i);
      if (member.name === name) return { ...member, bitOffset: baseBits + member.bitOffset, parent: id };
      if (member.name !== "") continue;
      const inner = this.resolveChecked(member.type);
      if (inner === 0 || visited.has(inner)) continue;
      const kind = this.kindOf(inner);
      if (kind !== KIND_STRUCT && kind !== KIND_UNION) continue;
      const found = this.findMember(inner, name, baseBits + member.bitOffset, depth + 1, visited);
      if (found) return found;
    }
    return undefined;
  }

  /**
   * Locates a member by path: "mapping" (found inside anonymous members too), or "flags.f" / "a.b.c" through
   * named members whose types are structs or unions. Undefined if the struct or any step is absent.
   */
  member(ref: BtfStructRef, path: string): BtfMemberLocation | undefined {
    let id = this.compositeId(ref);
    if (id === undefined) return undefined;
    let found: BtfMemberLocation | undefined;
    for (const part of path.split(".")) {
      if (part === "") return undefined;
      if (found !== undefined) {
        // Step into the previous member's type, which must be a struct or union.
        const inner = this.resolveChecked(found.type);
        if (inner === 0) return undefined;
        const kind = this.kindOf(inner);
        if (kind !== KIND_STRUCT && kind !== KIND_UNION) return undefined;
        id = inner;
      }
      found = this.findMember(id, part, found?.bitOffset ?? 0, 0, new Set<number>());
      if (found === undefined) return undefined;
    }
    return found;
  }

  hasMember(ref: BtfStructRef, path: string): boolean {
    return this.member(ref, path) !== undefined;
  }

  /** Bit offset of a member from the start of the struct (bitfields included), or undefined. */
  memberOffsetBits(ref: BtfStructRef, path: string): number | undefined {
    return this.member(ref, path)?.bitOffset;
  }

  /**
   * Byte offset of a member, or undefined if absent. Throws `BtfError` ("bitfield") for a bitfield or a member
   * not on a byte boundary: reading it as bytes would be wrong, and "absent" would hide why.
   */
  memberOffset(ref: BtfStructRef, path: string): number | undefined {
    const found = this.member(ref, path);
    if (found === undefined) return undefined;
    if (found.bitfieldSize !== 0 || found.bitOffset % 8 !== 0) {
      throw new BtfError(
        "bitfield",
        undefined,
        `${String(ref)}.${path} is a bitfield (bit ${found.bitOffset}, ${found.bitfieldSize} bits), not byte-addressable`,
      );
    }
    return found.bitOffset / 8;
  }

  /** The member's type with typedefs and qualifiers stripped (`page.flags` -> the struct inside memdesc_flags_t). */
  memberType(ref: BtfStructRef, path: string): BtfType | undefined {
    const found = this.member(ref, path);
    return found === undefined ? undefined : this.type(this.resolveChecked(found.type));
  }

  /** Size in bytes of the member's type (arrays multiplied out), or undefined. */
  memberSize(ref: BtfStructRef, path: string): number | undefined {
    const found = this.member(ref, path);
    return found === undefined ? undefined : this.sizeOf(found.type);
  }

  /** Element count of an array member (`zone.free_area`), or undefined if absent or not an array. */
  arrayLength(ref: BtfStructRef, path: string): number | undefined {
    const t = this.memberType(ref, path);
    return t?.kind === "array" ? t.nelems : undefined;
  }

  // ---- enums ----

  /** Ids of enums (ENUM or ENUM64) named `name`, or else reached through a typedef of that name. */
  private enumIds(name: string): number[] {
    const ids: number[] = [];
    for (const id of this.idsNamed(name)) {
      const kind = this.kindOf(id);
      if (kind === KIND_ENUM || kind === KIND_ENUM64) ids.push(id);
    }
    if (ids.length === 0) {
      for (const id of this.idsNamed(name)) {
        if (this.kindOf(id) !== KIND_TYPEDEF) continue;
        const target = this.resolveChecked(id);
        const kind = target === 0 ? 0 : this.kindOf(target);
        if (kind === KIND_ENUM || kind === KIND_ENUM64) ids.push(target);
      }
    }
    return ids;
  }

  private enumeratorInEnum(id: number, enumerator: string): bigint | undefined {
    const vlen = this.vlenOf(id);
    for (let i = 0; i < vlen; i++) {
      const e = this.enumeratorAt(id, i);
      if (e.name === enumerator) return e.value;
    }
    return undefined;
  }

  /**
   * Value of `enumerator` in enum `enumName` (`enum pageflags` -> "pageflags"), or in any enum when `enumName`
   * is "" (for anonymous enums; the first enum in id order that has it wins). Undefined if absent.
   */
  enumValue(enumName: string, enumerator: string): bigint | undefined {
    if (enumName === "") {
      const id = this.enumHolding(enumerator);
      return id === undefined ? undefined : this.enumeratorInEnum(id, enumerator);
    }
    for (const id of this.enumIds(enumName)) {
      const value = this.enumeratorInEnum(id, enumerator);
      if (value !== undefined) return value;
    }
    return undefined;
  }

  /** Every enumerator of enum `enumName` in declaration order, or undefined if there is no such enum. */
  enumerators(enumName: string): BtfEnumerator[] | undefined {
    const id = this.enumIds(enumName)[0];
    if (id === undefined) return undefined;
    const t = this.type(id);
    return t?.kind === "enum" || t?.kind === "enum64" ? t.values : undefined;
  }

  /** The first enum (in id order) with an enumerator called `enumerator`. */
  private enumHolding(enumerator: string): number | undefined {
    const bytes = nameBytes(enumerator);
    if (bytes === undefined) return undefined;
    if (!this.enumeratorNames) this.enumeratorNames = this.buildEnumeratorNames();
    const first = this.enumeratorNames.table.find(bytes)[0];
    return first === undefined ? undefined : this.enumeratorNames.owner[first];
  }

  /** Every enumerator of every enum, numbered from 1 in id order, with the enum that owns it. */
  private buildEnumeratorNames(): { table: NameTable; owner: Int32Array } {
    const { offs, owner, count } = collectEnumerators(this.words, this.recs, this.kinds);
    return { table: new NameTable(this.strs, offs, count), owner };
  }
}

/**
 * Name offsets of all enumerators, numbered from 1 in id order, and the enum owning each. A function of typed
 * arrays rather than a method, so V8 optimizes its loops once (see walkTypes).
 */
function collectEnumerators(
  words: Int32Array,
  recs: Uint32Array,
  kinds: Uint8Array,
): { offs: Int32Array; owner: Int32Array; count: number } {
  // Enums are a few thousand of a kernel's 125k types: find them with the native indexOf, not a JS loop.
  const enums: number[] = [];
  for (const wanted of [KIND_ENUM, KIND_ENUM64]) {
    for (let id = kinds.indexOf(wanted, 1); id > 0; id = kinds.indexOf(wanted, id + 1)) enums.push(id);
  }
  enums.sort((a, b) => a - b);
  let total = 0;
  for (const id of enums) total += (words[(recs[id] as number) + 1] as number) & INFO_VLEN_MASK;
  // Bounded by the bytes present: every enumerator took at least 8 bytes of the type section.
  const offs = new Int32Array(total + 1);
  const owner = new Int32Array(total + 1);
  let n = 0;
  for (const id of enums) {
    const stride = kinds[id] === KIND_ENUM ? ENUM_WORDS : ENUM64_WORDS;
    const w = recs[id] as number;
    const data = w + TYPE_WORDS;
    const end = data + ((words[w + 1] as number) & INFO_VLEN_MASK) * stride;
    for (let e = data; e < end; e += stride) {
      n++;
      offs[n] = words[e] as number;
      owner[n] = id;
    }
  }
  return { offs, owner, count: n };
}

/** FNV-1a (32-bit) offset basis and prime. */
const FNV_BASIS = 0x811c9dc5;
const FNV_PRIME = 0x01000193;

/**
 * Names to items (types, or enumerators) whose name offsets point at those names, built without decoding a
 * string: each name is hashed in place in the string section into an open-addressing table of item numbers.
 * Decoding the 125k names of a distro kernel into a Map costs more than parsing; hashing their bytes costs a
 * fraction of it. Items go in ascending, and linear probing puts a later item further along, so the items of
 * one name come out in ascending order.
 */
class NameTable {
  private readonly slots: Int32Array;
  private readonly mask: number;

  constructor(
    private readonly strs: Buffer,
    /** Name offset of items 1..count (0: anonymous, not indexed); parse checked each is inside `strs`. */
    private readonly offs: Int32Array,
    count: number,
    /** With kinds: index only FUNC items (`funcs`) or only the others. */
    kinds?: Uint8Array,
    funcs = false,
  ) {
    // At most half full, so every probe sequence reaches an empty slot.
    let size = 16;
    while (size < count * 2) size *= 2;
    this.slots = new Int32Array(size);
    this.mask = size - 1;
    fillNameSlots(this.slots, this.mask, strs, offs, count, kinds, funcs);
  }

  /** Items named `name` (its latin1 bytes), in ascending order. */
  find(name: Buffer): number[] {
    const found: number[] = [];
    let slot = hashBytes(name, 0, name.length) & this.mask;
    for (let item = this.slots[slot] as number; item !== 0; item = this.slots[slot] as number) {
      const off = this.offs[item] as number;
      if (
        this.strs[off + name.length] === 0 &&
        this.strs.compare(name, 0, name.length, off, off + name.length) === 0
      ) {
        found.push(item);
      }
      slot = (slot + 1) & this.mask;
    }
    return found;
  }
}

/**
 * The table-filling loop, outside the class so V8 optimizes it on its own (see walkTypes). Each name is hashed
 * up to its NUL right here rather than through indexOf: a native call per name costs more than the bytes.
 */
function fillNameSlots(
  slots: Int32Array,
  mask: number,
  strs: Uint8Array,
  offs: Int32Array,
  count: number,
  kinds: Uint8Array | undefined,
  funcs: boolean,
): void {
  for (let item = 1; item <= count; item++) {
    const off = offs[item] as number;
    if (off === 0 || (kinds !== undefined && (kinds[item] === KIND_FUNC) !== funcs)) continue;
    // The string section ends with a NUL (checked at parse), so every name ends inside it.
    let h = FNV_BASIS;
    for (let i = off; strs[i] !== 0 && i < strs.length; i++)
      h = Math.imul(h ^ (strs[i] as number), FNV_PRIME);
    let slot = (h >>> 0) & mask;
    while (slots[slot] !== 0) slot = (slot + 1) & mask;
    slots[slot] = item;
  }
}

function hashBytes(bytes: Uint8Array, start: number, end: number): number {
  let h = FNV_BASIS;
  for (let i = start; i < end; i++) h = Math.imul(h ^ (bytes[i] as number), FNV_PRIME);
  return h >>> 0;
}

/** A name's bytes as the string section holds them, or undefined if no name in it can be equal to it. */
function nameBytes(name: string): Buffer | undefined {
  if (name === "") return undefined;
  for (let i = 0; i < name.length; i++) {
    const c = name.charCodeAt(i);
    // Names were decoded as latin1 and end at the first NUL.
    if (c === 0 || c > 0xff) return undefined;
  }
  return Buffer.from(name, "latin1");
}

// ---- parse steps ----

function parseHeader(input: Uint8Array): BtfHeader {
  const buf = Buffer.from(input.buffer, input.byteOffset, input.byteLength);
  if (buf.length < HEADER_BYTES) {
    throw new BtfError("truncated", 0, `${buf.length} bytes: shorter than the ${HEADER_BYTES}-byte header`);
  }
  const magic = buf.readUInt16LE(0);
  if (magic === BTF_MAGIC_SWAPPED) {
    throw new BtfError("bad-header", 0, "big-endian BTF (magic bytes eb 9f): not an x86-64 kernel's");
  }
  if (magic !== BTF_MAGIC) {
    throw new BtfError("bad-header", 0, `magic 0x${magic.toString(16)}, not 0x${BTF_MAGIC.toString(16)}`);
  }
  const version = buf[2] as number;
  if (version !== BTF_VERSION)
    throw new BtfError("bad-header", 2, `version ${version}, only ${BTF_VERSION} is known`);
  // No flag is defined; the kernel refuses any (btf_parse_hdr), so a set one is not a kernel's BTF.
  const flags = buf[3] as number;
  if (flags !== 0) throw new BtfError("bad-header", 3, `flags 0x${flags.toString(16)}, none are defined`);
  const hdrLen = buf.readUInt32LE(4);
  if (hdrLen < HEADER_BYTES || hdrLen > MAX_HEADER_BYTES) {
    throw new BtfError("bad-header", 4, `hdr_len ${hdrLen} outside ${HEADER_BYTES}..${MAX_HEADER_BYTES}`);
  }
  const header: BtfHeader = {
    version,
    flags,
    hdrLen,
    typeOff: buf.readUInt32LE(8),
    typeLen: buf.readUInt32LE(12),
    strOff: buf.readUInt32LE(16),
    strLen: buf.readUInt32LE(20),
  };
  const { typeOff, typeLen, strOff, strLen } = header;
  // Every record and field is a u32, so the section is u32-aligned and a whole number of words (btf_parse_hdr).
  if (typeOff % 4 !== 0) throw new BtfError("bad-header", 8, `type_off ${typeOff} is not 4-byte aligned`);
  if (typeLen % 4 !== 0) throw new BtfError("bad-header", 12, `type_len ${typeLen} is not a multiple of 4`);
  if (strLen === 0 || strLen - 1 > BTF_MAX_NAME_OFFSET) {
    throw new BtfError("bad-header", 20, `str_len ${strLen} outside 1..${BTF_MAX_NAME_OFFSET + 1}`);
  }
  // Sections may not overlap (btf_check_sec_info); their order and gaps between them do not matter to a reader.
  const typeEnd = typeOff + typeLen;
  const strEnd = strOff + strLen;
  if (typeLen > 0 && typeOff < strEnd && strOff < typeEnd) {
    throw new BtfError(
      "bad-header",
      8,
      `type section ${typeOff}..${typeEnd} overlaps string section ${strOff}..${strEnd} (relative to the header's end)`,
    );
  }
  const needed = hdrLen + Math.max(typeEnd, strEnd);
  if (needed > buf.length) {
    const which = typeEnd > strEnd ? "type" : "string";
    throw new BtfError(
      "truncated",
      buf.length,
      `the ${which} section ends at byte ${needed}, but the buffer holds ${buf.length} bytes`,
    );
  }
  return header;
}

function checkStrings(strs: Buffer, strStart: number): void {
  // The first string is "" (name offset 0 means anonymous) and the last byte ends the last string, so every
  // in-range name offset reads a terminated string inside the section (btf_parse_str_sec).
  if (strs[0] !== 0)
    throw new BtfError("bad-string", strStart, "string section does not start with an empty string");
  if (strs[strs.length - 1] !== 0) {
    throw new BtfError("bad-string", strStart + strs.length - 1, "string section does not end with a NUL");
  }
}

interface Walked {
  recs: Uint32Array;
  kinds: Uint8Array;
  nameOffs: Int32Array;
}

/**
 * One pass over the type section: each record's bounds, kind and vlen, every name offset, and every type id it
 * refers to (checked against the final count at the end, as records may refer forward). The loop is kept small
 * and table-driven, with its faults built by functions outside it: a distro kernel has 125k records, and a loop
 * V8 compiles once runs several times faster than one it compiles, drops and recompiles as new kinds turn up.
 */
function walkTypes(words: Int32Array, typeStart: number, strLen: number): Walked {
  const end = words.length;
  // At most one record per 3 words: the arrays are bounded by the bytes present, not by any count in the blob.
  const capacity = Math.floor(end / TYPE_WORDS) + 1;
  const recs = new Uint32Array(capacity);
  const kinds = new Uint8Array(capacity);
  const nameOffs = new Int32Array(capacity);
  // Highest type id referred to, and the word holding it. A negative word is an id of 2^31 or more: too big.
  let maxRef = 0;
  let maxRefAt = -1;
  let count = 0;
  let w = 0;
  while (w < end) {
    if (end - w < TYPE_WORDS) throw recordFault(words, typeStart, w, count + 1, "truncated");
    const info = words[w + 1] as number;
    const kind = (info >>> INFO_KIND_SHIFT) & INFO_KIND_MASK;
    const vlen = info & INFO_VLEN_MASK;
    if (kind > KIND_MAX || (info & INFO_UNUSED_MASK) !== 0 || vlen > (MAX_VLEN[kind] as number)) {
      throw recordFault(words, typeStart, w, count + 1, "info");
    }
    const stride = ENTRY_WORDS[kind] as number;
    const data = w + TYPE_WORDS;
    const next = data + (FIXED_WORDS[kind] as number) + stride * vlen;
    if (next > end) throw recordFault(words, typeStart, w, count + 1, "truncated");
    const nameOff = words[w] as number;
    if (nameOff < 0 || nameOff >= strLen) throw nameFault(words, typeStart, w, count + 1, strLen);
    if (HEADER_REF[kind] === 1) {
      const ref = words[w + 2] as number;
      if (ref < 0 || ref > maxRef) {
        maxRef = ref < 0 ? BTF_MAX_TYPE + 1 : ref;
        maxRefAt = w + 2;
      }
    }
    const walkStride = WALK_STRIDE[kind] as number;
    if (walkStride !== 0) {
      const named = ENTRY_NAME[kind] === 1;
      const refFirst = ENTRY_REF_FIRST[kind] as number;
      const refLast = ENTRY_REF_LAST[kind] as number;
      for (let e = data; e < next; e += walkStride) {
        if (named) {
          const off = words[e] as number;
          if (off < 0 || off >= strLen) throw nameFault(words, typeStart, e, count + 1, strLen);
        }
        for (let r = e + refFirst; r <= e + refLast; r++) {
          const ref = words[r] as number;
          if (ref < 0 || ref > maxRef) {
            maxRef = ref < 0 ? BTF_MAX_TYPE + 1 : ref;
            maxRefAt = r;
          }
        }
      }
    }
    if (
      kind === KIND_INT ||
      kind === KIND_STRUCT ||
      kind === KIND_UNION ||
      kind === KIND_ENUM ||
      kind === KIND_ENUM64
    ) {
      checkSized(words, typeStart, w, count + 1, kind);
    }
    count++;
    if (count > BTF_MAX_TYPE)
      throw new BtfError("bad-type", typeStart + w * 4, `more than ${BTF_MAX_TYPE} types`);
    recs[count] = w;
    kinds[count] = kind;
    nameOffs[count] = nameOff;
    w = next;
  }
  if (maxRef > count) {
    const id = (words[maxRefAt] as number) >>> 0;
    throw new BtfError(
      "bad-type-id",
      typeStart + maxRefAt * 4,
      `refers to type ${id}, but there are only ${count} types`,
    );
  }
  return {
    recs: recs.slice(0, count + 1),
    kinds: kinds.slice(0, count + 1),
    nameOffs: nameOffs.slice(0, count + 1),
  };
}

/** The error for record `id` at word `w` whose info word or length is wrong. */
function recordFault(
  words: Int32Array,
  typeStart: number,
  w: number,
  id: number,
  what: "info" | "truncated",
): BtfError {
  const at = typeStart + w * 4;
  const left = (words.length - w) * 4;
  if (left < TYPE_WORDS * 4) {
    return new BtfError(
      "truncated",
      at,
      `type ${id}: ${left} bytes left in the type section, a record needs 12`,
    );
  }
  const info = (words[w + 1] as number) >>> 0;
  const kind = (info >>> INFO_KIND_SHIFT) & INFO_KIND_MASK;
  const vlen = info & INFO_VLEN_MASK;
  if (kind === 0 || kind > KIND_MAX)
    return new BtfError("bad-type", at + 4, `type ${id}: unknown kind ${kind}`);
  const kindName = KIND_NAMES[kind];
  if ((info & INFO_UNUSED_MASK) !== 0) {
    return new BtfError(
      "bad-type",
      at + 4,
      `type ${id} (${kindName}): unused info bits set (info 0x${info.toString(16)})`,
    );
  }
  if (what === "info") {
    return new BtfError(
      "bad-type",
      at + 4,
      `type ${id} (${kindName}): vlen ${vlen}, at most ${MAX_VLEN[kind]}`,
    );
  }
  const needed = (TYPE_WORDS + (FIXED_WORDS[kind] as number) + (ENTRY_WORDS[kind] as number) * vlen) * 4;
  return new BtfError(
    "truncated",
    at,
    `type ${id} (${kindName}, vlen ${vlen}) needs ${needed} bytes, ${left} left in the type section`,
  );
}

/** The error for a name_off at word `w` (of record `id`) beyond the string section. */
function nameFault(words: Int32Array, typeStart: number, w: number, id: number, strLen: number): BtfError {
  const off = (words[w] as number) >>> 0;
  return new BtfError(
    "bad-string",
    typeStart + w * 4,
    `type ${id}: name_off ${off} beyond the ${strLen}-byte string section`,
  );
}

/**
 * The checks the kernel makes of sized kinds (kernel/bpf/btf.c: btf_int_check_meta, btf_struct_check_meta and
 * the kflag member checks, btf_enum_check_meta): an INT without kind_flag or bits outside BTF_INT_MASK, whose
 * offset + bits fit both 128 and its size, with at most one encoding flag; struct members inside the struct and
 * union members at offset 0; an enum of 1, 2, 4 or 8 bytes.
 */
function checkSized(words: Int32Array, typeStart: number, w: number, id: number, kind: number): void {
  const size = (words[w + 2] as number) >>> 0;
  const data = w + TYPE_WORDS;
  const kindName = KIND_NAMES[kind];
  if (kind === KIND_INT) {
    const v = (words[data] as number) >>> 0;
    const bits = v & 0xff;
    const bitOffset = (v >>> INT_OFFSET_SHIFT) & 0xff;
    const encoding = (v >>> INT_ENCODING_SHIFT) & 0xf;
    const kflag = (words[w + 1] as number) >>> 31 === 1;
    if (
      kflag ||
      (v & INT_UNUSED_MASK) !== 0 ||
      bitOffset + bits > INT_MAX_BITS ||
      bitOffset + bits > size * 8 ||
      (encoding !== 0 && encoding !== INT_SIGNED && encoding !== INT_CHAR && encoding !== INT_BOOL)
    ) {
      throw new BtfError(
        "bad-type",
        typeStart + data * 4,
        `type ${id} (int): size ${size}, encoding 0x${v.toString(16)}`,
      );
    }
    return;
  }
  if (kind === KIND_ENUM || kind === KIND_ENUM64) {
    if (size !== 1 && size !== 2 && size !== 4 && size !== 8) {
      throw new BtfError("bad-type", typeStart + (w + 2) * 4, `type ${id} (${kindName}): size ${size}`);
    }
    return;
  }
  const info = (words[w + 1] as number) >>> 0;
  const kflag = info >>> 31 === 1;
  const vlen = info & INFO_VLEN_MASK;
  const sizeBits = size * 8;
  for (let i = 0; i < vlen; i++) {
    const m = data + i * MEMBER_WORDS;
    const raw = (words[m + 2] as number) >>> 0;
    const bitOffset = kflag ? raw & MEMBER_BIT_OFFSET_MASK : raw;
    const bitfield = kflag ? raw >>> MEMBER_BITFIELD_SHIFT : 0;
    if (bitOffset + bitfield > sizeBits || (kind === KIND_UNION && bitOffset !== 0)) {
      throw new BtfError(
        "bad-type",
        typeStart + (m + 2) * 4,
        `type ${id} (${kindName}, ${size} bytes) member ${i}: bit offset ${bitOffset}, bitfield ${bitfield}`,
      );
    }
  }
}

/**
 * Every typedef/qualifier chain must end in a non-modifier within MAX_DEPTH steps. Each type's chain length is
 * remembered, so the whole check is linear however chains share their tails.
 */
function checkModifierChains(
  words: Int32Array,
  recs: Uint32Array,
  kinds: Uint8Array,
  typeStart: number,
): void {
  const count = recs.length - 1;
  const at = (id: number) => typeStart + (recs[id] as number) * 4;
  // 0: not yet known; 1..MAX_DEPTH: chain length to a non-modifier; ON_PATH: on the walk under way.
  const ON_PATH = 255;
  const depth = new Uint8Array(count + 1);
  const path: number[] = [];
  for (let id = 1; id <= count; id++) {
    if (depth[id] !== 0 || !isModifier(kinds[id] as number)) continue;
    path.length = 0;
    let current = id;
    let tail = 0;
    while (current !== 0 && isModifier(kinds[current] as number)) {
      const known = depth[current] as number;
      if (known === ON_PATH) {
        throw new BtfError(
          "too-deep",
          at(current),
          `type ${current}: typedef/qualifier chain loops back on itself`,
        );
      }
      if (known !== 0) {
        tail = known;
        break;
      }
      depth[current] = ON_PATH;
      path.push(current);
      if (path.length > MAX_DEPTH) {
        throw new BtfError(
          "too-deep",
          at(id),
          `type ${id}: typedef/qualifier chain longer than ${MAX_DEPTH}`,
        );
      }
      // walkTypes checked every referred id against the count, so this is 0..count.
      current = words[(recs[current] as number) + 2] as number;
    }
    if (path.length + tail > MAX_DEPTH) {
      throw new BtfError("too-deep", at(id), `type ${id}: typedef/qualifier chain longer than ${MAX_DEPTH}`);
    }
    for (let i = path.length - 1; i >= 0; i--) depth[path[i] as number] = ++tail;
  }
}
