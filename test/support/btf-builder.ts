/**
 * Builds small BTF blobs by hand for the parser's tests: every kind, any info word, and header fields that can
 * be bent (magic, version, flags, hdr_len, section offsets and lengths) to make hostile input. Layout follows
 * include/uapi/linux/btf.h: 24-byte header, type section, then string section, all little-endian u32 fields.
 * Type ids are handed out in order from 1, so a record may refer forward to `builder.nextId + n`.
 */

/** `BTF_KIND_*` (include/uapi/linux/btf.h). */
export const KIND = {
  INT: 1,
  PTR: 2,
  ARRAY: 3,
  STRUCT: 4,
  UNION: 5,
  ENUM: 6,
  FWD: 7,
  TYPEDEF: 8,
  VOLATILE: 9,
  CONST: 10,
  RESTRICT: 11,
  FUNC: 12,
  FUNC_PROTO: 13,
  VAR: 14,
  DATASEC: 15,
  FLOAT: 16,
  DECL_TAG: 17,
  TYPE_TAG: 18,
  ENUM64: 19,
} as const;

/** `BTF_INT_SIGNED`, `BTF_INT_CHAR`, `BTF_INT_BOOL`. */
export const INT_SIGNED = 1;
export const INT_CHAR = 2;
export const INT_BOOL = 4;

export interface MemberSpec {
  name: string;
  type: number;
  bitOffset: number;
  /** Bitfield width: only encoded when the struct is built with `kflag`. */
  bitfieldSize?: number;
}

export interface HeaderOverrides {
  magic?: number;
  version?: number;
  flags?: number;
  hdrLen?: number;
  typeOff?: number;
  typeLen?: number;
  strOff?: number;
  strLen?: number;
}

/** `info`: vlen bits 0-15, kind bits 24-28, kind_flag bit 31. */
export function info(kind: number, vlen = 0, kflag = false): number {
  return ((kflag ? 0x80000000 : 0) | ((kind & 0x1f) << 24) | (vlen & 0xffff)) >>> 0;
}

export class BtfBuilder {
  private readonly strings: Buffer[] = [Buffer.from([0])];
  private strLen = 1;
  private readonly stringOffsets = new Map<string, number>([["", 0]]);
  private readonly records: number[][] = [];

  /** The id the next record will get. */
  get nextId(): number {
    return this.records.length + 1;
  }

  /** Offset of `s` in the string section, added once. */
  str(s: string): number {
    const known = this.stringOffsets.get(s);
    if (known !== undefined) return known;
    const off = this.strLen;
    const bytes = Buffer.from(`${s}\0`, "latin1");
    this.strings.push(bytes);
    this.strLen += bytes.length;
    this.stringOffsets.set(s, off);
    return off;
  }

  /** Any record, as words: name_off, info, size/type, then kind-specific words. Returns its id. */
  raw(nameOff: number, infoWord: number, sizeOrType: number, extra: readonly number[] = []): number {
    this.records.push([nameOff, infoWord, sizeOrType, ...extra]);
    return this.records.length;
  }

  int(
    name: string,
    size: number,
    options: { bits?: number; offset?: number; encoding?: number } = {},
  ): number {
    const bits = options.bits ?? size * 8;
    const word = ((options.encoding ?? 0) << 24) | ((options.offset ?? 0) << 16) | bits;
    return this.raw(this.str(name), info(KIND.INT), size, [word >>> 0]);
  }

  ptr(type: number): number {
    return this.raw(0, info(KIND.PTR), type);
  }

  array(elemType: number, indexType: number, nelems: number): number {
    return this.raw(0, info(KIND.ARRAY), 0, [elemType, indexType, nelems]);
  }

  private composite(
    kind: number,
    name: string,
    size: number,
    members: readonly MemberSpec[],
    kflag: boolean,
  ) {
    const words: number[] = [];
    for (const m of members) {
      const offset = kflag ? (((m.bitfieldSize ?? 0) << 24) | m.bitOffset) >>> 0 : m.bitOffset;
      words.push(this.str(m.name), m.type, offset);
    }
    return this.raw(this.str(name), info(kind, members.length, kflag), size, words);
  }

  struct(
    name: string,
    size: number,
    members: readonly MemberSpec[],
    options: { kflag?: boolean } = {},
  ): number {
    return this.composite(KIND.STRUCT, name, size, members, options.kflag ?? false);
  }

  union(
    name: string,
    size: number,
    members: readonly MemberSpec[],
    options: { kflag?: boolean } = {},
  ): number {
    return this.composite(KIND.UNION, name, size, members, options.kflag ?? false);
  }

  /** ENUM: values are stored as 32 bits; `signed` sets kind_flag (Linux 6.0+ meaning). */
  enum(
    name: string,
    size: number,
    values: readonly [string, number][],
    options: { signed?: boolean } = {},
  ): number {
    const words: number[] = [];
    for (const [n, v] of values) words.push(this.str(n), v >>> 0);
    return this.raw(this.str(name), info(KIND.ENUM, values.length, options.signed ?? false), size, words);
  }

  enum64(
    name: string,
    size: number,
    values: readonly [string, bigint][],
    options: { signed?: boolean } = {},
  ): number {
    const words: number[] = [];
    for (const [n, v] of values) {
      const u = BigInt.asUintN(64, v);
      words.push(this.str(n), Number(u & 0xffffffffn), Number(u >> 32n));
    }
    return this.raw(this.str(name), info(KIND.ENUM64, values.length, options.signed ?? false), size, words);
  }

  fwd(name: string, union = false): number {
    return this.raw(this.str(name), info(KIND.FWD, 0, union), 0);
  }

  typedef(name: string, type: number): number {
    return this.raw(this.str(name), info(KIND.TYPEDEF), type);
  }

  volatile(type: number): number {
    return this.raw(0, info(KIND.VOLATILE), type);
  }

  const(type: number): number {
    return this.raw(0, info(KIND.CONST), type);
  }

  restrict(type: number): number {
    return this.raw(0, info(KIND.RESTRICT), type);
  }

  typeTag(name: string, type: number): number {
    return this.raw(this.str(name), info(KIND.TYPE_TAG), type);
  }

  func(name: string, proto: number, linkage = 1): number {
    return this.raw(this.str(name), info(KIND.FUNC, linkage), proto);
  }

  funcProto(returnType: number, params: readonly [string, number][]): number {
    const words: number[] = [];
    for (const [n, t] of params) words.push(this.str(n), t);
    return this.raw(0, info(KIND.FUNC_PROTO, params.length), returnType, words);
  }

  variable(name: string, type: number, linkage = 1): number {
    return this.raw(this.str(name), info(KIND.VAR), type, [linkage]);
  }

  datasec(name: string, size: number, vars: readonly [number, number, number][]): number {
    return this.raw(this.str(name), info(KIND.DATASEC, vars.length), size, vars.flat());
  }

  float(name: string, size: number): number {
    return this.raw(this.str(name), info(KIND.FLOAT), size);
  }

  declTag(name: string, type: number, componentIdx: number): number {
    return this.raw(this.str(name), info(KIND.DECL_TAG), type, [componentIdx >>> 0]);
  }

  /** The blob: header (with any field overridden), type section, string section. */
  build(overrides: HeaderOverrides = {}): Buffer {
    const words = this.records.flat();
    const types = Buffer.alloc(words.length * 4);
    words.forEach((w, i) => {
      types.writeUInt32LE(w >>> 0, i * 4);
    });
    const strs = Buffer.concat(this.strings);
    // A longer hdr_len (a newer header) gets zero padding; a shorter, hostile one keeps the 24 bytes.
    const header = Buffer.alloc(Math.max(24, Math.min(overrides.hdrLen ?? 24, 4096)));
    header.writeUInt16LE(overrides.magic ?? 0xeb9f, 0);
    header.writeUInt8(overrides.version ?? 1, 2);
    header.writeUInt8(overrides.flags ?? 0, 3);
    header.writeUInt32LE(overrides.hdrLen ?? 24, 4);
    header.writeUInt32LE(overrides.typeOff ?? 0, 8);
    header.writeUInt32LE(overrides.typeLen ?? types.length, 12);
    header.writeUInt32LE(overrides.strOff ?? types.length, 16);
    header.writeUInt32LE(overrides.strLen ?? strs.length, 20);
    return Buffer.concat([header, types, strs]);
  }
}
