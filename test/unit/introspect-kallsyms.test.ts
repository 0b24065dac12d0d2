/**
 * kallsyms decoding and BTF location on synthetic guests (src/introspect/synthetic-guest.ts): tables written
 * the way scripts/kallsyms.c writes them, in each of the four address encodings, then hostile variants (huge
 * counts, tokens and names running off their tables, forged BTF outside the image) that must end in a clear
 * error, never a hang or a wrong answer.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import {
  BTF_HEADER_PREFIX,
  BtfLocateError,
  btfFromKallsyms,
  kernelImageRange,
  locateBtf,
  scanImageForBtf,
} from "../../src/introspect/btf-locate.ts";
import { KallsymsError, openKallsyms } from "../../src/introspect/kallsyms.ts";
import { bufferMemory, type GuestKernel, openGuestKernel } from "../../src/introspect/kernel.ts";
import { buildSyntheticKernel, SIZE_2M } from "../../src/introspect/synthetic-guest.ts";

/** synthetic-guest.ts defaults: the 4 MiB image at this VA and PA (2 MiB pages), init_uts_ns at +1 MiB. */
const IMAGE_VA = 0xffffffffa0000000n;
const IMAGE_PA = 0x200000;
const IMAGE_BYTES = 2 * SIZE_2M;
const RAM = 32 * 1024 * 1024;
const PG_RESERVED = 1n << 12n;

/** Where the test puts the tables, as offsets into the image (free space of the synthetic layout). */
const AT = {
  numSyms: 0x110000,
  relativeBase: 0x110100,
  tokenTable: 0x110200,
  tokenIndex: 0x111200,
  offsets: 0x120000,
  addresses: 0x140000,
  names: 0x180000,
  memSectionVar: 0x210000,
  btf: 0x220000,
} as const;

type Encoding = "absolute" | "absolute-percpu" | "relative-base" | "place-relative";

interface Sym {
  name: string;
  type: string;
  address: bigint;
}

/** Tokens: printable ASCII as itself, plus a few multi-character ones the encoder prefers. */
const MULTI = ["func_", "__", "kallsyms", "_BTF", "init_"];
function tokenTable(): string[] {
  const tokens: string[] = [];
  for (let b = 0; b < 256; b++) tokens.push(b >= 0x21 && b <= 0x7e ? String.fromCharCode(b) : "");
  MULTI.forEach((t, i) => {
    tokens[0x80 + i] = t;
  });
  return tokens;
}

/** Greedy token encoding of type letter + name (the type letter is its own token, as in 6.1+). */
function encodeName(type: string, name: string, tokens: string[]): number[] {
  const out = [type.charCodeAt(0)];
  let i = 0;
  while (i < name.length) {
    const multi = MULTI.findIndex((t) => name.startsWith(t, i));
    if (multi >= 0) {
      out.push(0x80 + multi);
      i += (tokens[0x80 + multi] as string).length;
    } else {
      out.push(name.charCodeAt(i));
      i++;
    }
  }
  return out;
}

/** A tiny valid BTF: header, one INT type ("int", 4 bytes), strings "\0int\0" (include/uapi/linux/btf.h). */
function tinyBtf(): Buffer {
  const types = Buffer.alloc(16);
  types.writeUInt32LE(1, 0); // name_off -> "int"
  types.writeUInt32LE(1 << 24, 4); // info: kind 1 (INT), vlen 0
  types.writeUInt32LE(4, 8); // size
  types.writeUInt32LE(32, 12); // INT encoding: 32 bits
  const strings = Buffer.from("\0int\0", "latin1");
  const header = Buffer.alloc(24);
  BTF_HEADER_PREFIX.copy(header, 0);
  header.writeUInt32LE(0, 8);
  header.writeUInt32LE(types.length, 12);
  header.writeUInt32LE(types.length, 16);
  header.writeUInt32LE(strings.length, 20);
  return Buffer.concat([header, types, strings]);
}

interface BuildOptions {
  encoding: Encoding;
  /** Extra symbols (sorted in with the rest). */
  extra?: Sym[];
  fillers?: number;
  release?: string;
  /** VMCOREINFO overrides (e.g. to point a table elsewhere). */
  vmcoreinfo?: Record<string, string>;
  /** Writes into the buffer after the tables (corruptions). */
  corrupt?: (buf: Buffer, at: (imageOffset: number) => number) => void;
  /** Leave the kallsyms keys out of VMCOREINFO (a < 6.0 kernel). */
  noKallsyms?: boolean;
  /** 6.0's one-byte token counts (no name then needs more than 255 tokens). */
  oneByteCounts?: boolean;
  /** Leave out the 200-character name (it needs a 2-byte count). */
  noLongName?: boolean;
}

interface Built {
  kernel: GuestKernel;
  buf: Buffer;
  symbols: Sym[];
  btf: Buffer;
}

function build(options: BuildOptions): Built {
  const buf = Buffer.alloc(RAM);
  const va = (off: number) => IMAGE_VA + BigInt(off);
  const pa = (off: number) => IMAGE_PA + off;
  const btf = tinyBtf();
  const percpu = options.encoding === "absolute-percpu";
  const symbols: Sym[] = [
    { name: "_stext", type: "T", address: va(0) },
    { name: "init_uts_ns", type: "D", address: va(0x100000) },
    { name: "init_top_pgt", type: "D", address: va(SIZE_2M) },
    { name: "mem_section", type: "B", address: va(AT.memSectionVar) },
    { name: "__start_BTF", type: "R", address: va(AT.btf) },
    { name: "__stop_BTF", type: "R", address: va(AT.btf + btf.length) },
    // A static name twice, and a name of more than 127 tokens (2-byte count).
    { name: "dup_static", type: "t", address: va(0x5000) },
    { name: "dup_static", type: "t", address: va(0x6000) },
    ...(options.noLongName ? [] : [{ name: `long_${"x".repeat(200)}`, type: "T", address: va(0x7000) }]),
    ...(options.extra ?? []),
  ];
  for (let i = 0; i < (options.fillers ?? 2000); i++)
    symbols.push({ name: `func_${i}`, type: i % 3 ? "t" : "T", address: va(0x10000 + i * 16) });
  // x86-64 per-CPU symbols sit near 0 while absolute-percpu is in force (up to 6.14).
  if (percpu)
    symbols.push(
      { name: "fixed_percpu_data", type: "D", address: 0n },
      { name: "cpu_number", type: "D", address: 0x20n },
    );
  symbols.sort((a, b) => (a.address < b.address ? -1 : a.address > b.address ? 1 : 0));

  const kallsymsKeys: Record<string, string> = options.noKallsyms
    ? {}
    : {
        "SYMBOL(kallsyms_names)": va(AT.names).toString(16),
        "SYMBOL(kallsyms_num_syms)": va(AT.numSyms).toString(16),
        "SYMBOL(kallsyms_token_table)": va(AT.tokenTable).toString(16),
        "SYMBOL(kallsyms_token_index)": va(AT.tokenIndex).toString(16),
        ...(options.encoding === "absolute"
          ? { "SYMBOL(kallsyms_addresses)": va(AT.addresses).toString(16) }
          : { "SYMBOL(kallsyms_offsets)": va(AT.offsets).toString(16) }),
        ...(options.encoding === "absolute-percpu" || options.encoding === "relative-base"
          ? { "SYMBOL(kallsyms_relative_base)": va(AT.relativeBase).toString(16) }
          : {}),
      };
  const k = buildSyntheticKernel(buf, {
    ...(options.release ? { release: options.release } : {}),
    extra: { ...kallsymsKeys, ...options.vmcoreinfo },
  });
  // mem_section: the variable in .bss holds the root array's address (SYMBOL_ARRAY prints that value).
  buf.writeBigUInt64LE(k.memSectionVa, pa(AT.memSectionVar));
  btf.copy(buf, pa(AT.btf));

  const tokens = tokenTable();
  let tableOff = 0;
  tokens.forEach((t, i) => {
    buf.writeUInt16LE(tableOff, pa(AT.tokenIndex) + i * 2);
    tableOff += buf.write(`${t}\0`, pa(AT.tokenTable) + tableOff, "latin1");
  });
  buf.writeUInt32LE(symbols.length, pa(AT.numSyms));
  let names = pa(AT.names);
  for (const s of symbols) {
    const enc = encodeName(s.type, s.name, tokens);
    if (enc.length > 0x7f && !options.oneByteCounts) {
      buf[names++] = (enc.length & 0x7f) | 0x80;
      buf[names++] = enc.length >> 7;
    } else buf[names++] = enc.length;
    for (const b of enc) buf[names++] = b;
  }
  const nonPercpu = symbols.filter((s) => s.address >= IMAGE_VA);
  const base = percpu ? (nonPercpu[0] as Sym).address : (symbols[0] as Sym).address;
  buf.writeBigUInt64LE(base, pa(AT.relativeBase));
  symbols.forEach((s, i) => {
    const at = pa(AT.offsets) + i * 4;
    if (options.encoding === "absolute") buf.writeBigUInt64LE(s.address, pa(AT.addresses) + i * 8);
    else if (options.encoding === "absolute-percpu")
      buf.writeInt32LE(s.address < IMAGE_VA ? Number(s.address) : Number(base - s.address - 1n), at);
    else if (options.encoding === "relative-base") buf.writeUInt32LE(Number(s.address - base), at);
    else buf.writeInt32LE(Number(s.address - (va(AT.offsets) + BigInt(i * 4))), at);
  });
  // The image's struct pages are PG_reserved (bit 12 on 6.1, include/linux/page-flags.h), like a real
  // kernel's.
  for (let off = 0; off < IMAGE_BYTES; off += 4096)
    k.setStructPage((IMAGE_PA + off) / 4096, { flags: PG_RESERVED });
  options.corrupt?.(buf, pa);
  return { kernel: openGuestKernel(bufferMemory(buf)), buf, symbols, btf };
}

for (const encoding of ["absolute", "absolute-percpu", "relative-base", "place-relative"] as const) {
  test(`kallsyms: ${encoding} tables decode, agree with VMCOREINFO, resolve every symbol`, () => {
    const { kernel, symbols } = build({ encoding });
    const ks = openKallsyms(kernel);
    assert.equal(ks.encoding, encoding);
    assert.equal(ks.count, symbols.length);
    assert.equal(ks.longNames, true);
    assert.deepEqual(
      ks.checks.map((c) => `${c.symbol}:${c.how}`),
      ["_stext:address", "init_uts_ns:address", "init_top_pgt:address", "mem_section:pointer"],
    );
    for (const s of symbols) assert.ok(ks.lookupAll(s.name).includes(s.address), s.name);
    assert.equal(ks.lookup("_stext"), kernel.info.symbol("SYMBOL(_stext)"));
    assert.deepEqual(ks.lookupAll("dup_static"), [IMAGE_VA + 0x5000n, IMAGE_VA + 0x6000n]);
    assert.equal(ks.type("func_1"), "t");
    assert.equal(ks.type("func_3"), "T");
    assert.equal(ks.lookup("no_such_symbol"), undefined);
    assert.equal(ks.at(0).address, symbols[0]?.address);
  });
}

test("kallsyms: 6.0's one-byte token counts of 128 and more decode too", () => {
  // 6.0 names are < 128 characters, but a count may still have bit 7 set: 127 untokenized characters + type.
  const name = "y".repeat(127);
  const { kernel } = build({
    encoding: "absolute-percpu",
    oneByteCounts: true,
    noLongName: true,
    extra: [{ name, type: "T", address: IMAGE_VA + 0x8000n }],
  });
  const ks = openKallsyms(kernel);
  assert.equal(ks.longNames, false);
  assert.equal(ks.lookup(name), IMAGE_VA + 0x8000n);
  assert.equal(ks.lookup("_stext"), IMAGE_VA);
});

test("kallsyms: many lookups (an index is built after the first 64) give the same answers", () => {
  const { kernel, symbols } = build({ encoding: "relative-base" });
  const ks = openKallsyms(kernel);
  for (let round = 0; round < 2; round++)
    for (const s of symbols.slice(0, 100)) assert.ok(ks.lookupAll(s.name).includes(s.address), s.name);
  assert.equal(ks.lookup("func_"), undefined, "a prefix is not a name");
  assert.equal(ks.lookup("func_1\nfunc_2"), undefined);
  assert.equal(ks.lookup("\u20ac"), undefined);
});

test("kallsyms: the encoding comes from the checks, not from the release string", () => {
  // A 7.x layout (no relative base) in a kernel that calls itself 6.1.
  const ks = openKallsyms(build({ encoding: "place-relative", release: "6.1.0-99-amd64" }).kernel);
  assert.equal(ks.encoding, "place-relative");
});

test("kallsyms and BTF: found by both ways, the same bytes, inside the image", () => {
  const { kernel, btf } = build({ encoding: "absolute-percpu" });
  const ks = openKallsyms(kernel);
  const fromSymbols = btfFromKallsyms(kernel, ks);
  assert.ok(fromSymbols.bytes.equals(btf));
  assert.equal(fromSymbols.va, IMAGE_VA + BigInt(AT.btf));
  const range = kernelImageRange(kernel);
  assert.equal(range.start, IMAGE_VA);
  assert.equal(range.end, IMAGE_VA + BigInt(IMAGE_BYTES));
  assert.equal(range.pageCheck, true);
  const scanned = scanImageForBtf(kernel, range);
  assert.deepEqual(
    scanned.map((c) => [c.source, c.va]),
    [["image-scan", fromSymbols.va]],
  );
  assert.ok(scanned[0]?.bytes.equals(btf));
  const located = locateBtf(kernel, { scan: "always" });
  assert.deepEqual(
    located.candidates.map((c) => c.source),
    ["kallsyms"],
    "the scan's hit is the same blob",
  );
});

test("BTF without kallsyms (a 5.10-like VMCOREINFO): image scan only; forgeries outside the image are ignored", () => {
  const { kernel, buf, btf } = build({
    encoding: "place-relative",
    noKallsyms: true,
    corrupt: (b, pa) => {
      // A copy in RAM outside the kernel image (user memory, an old kernel): never a candidate.
      tinyBtf().copy(b, 0x1000000);
      // A copy inside the mapped image on a page the kernel freed (flags unlike _stext's page).
      tinyBtf().copy(b, pa(0x300000 + 0x800));
      // A header whose sections run past the image: not a candidate either.
      const bad = tinyBtf();
      bad.writeUInt32LE(0x1000000, 20);
      bad.copy(b, pa(0x3f0000));
    },
  });
  // The freed page lost PG_reserved and is on an LRU now (PG_lru, bit 4).
  const freedPfn = (IMAGE_PA + 0x300000) / 4096;
  buf.writeBigUInt64LE(1n << 4n, 0x800000 + freedPfn * 64);
  assert.throws(
    () => openKallsyms(kernel),
    (e: unknown) => e instanceof KallsymsError && e.reason === "absent",
  );
  const located = locateBtf(kernel);
  assert.deepEqual(
    located.candidates.map((c) => [c.source, c.va]),
    [["image-scan", IMAGE_VA + BigInt(AT.btf)]],
  );
  assert.ok(located.candidates[0]?.bytes.equals(btf));
  assert.match(located.notes.join(";"), /no kallsyms tables/);
  assert.ok(located.image && located.image.bytes === IMAGE_BYTES - 4096, "the freed page is not image");
});

test("kernel image: pages with more flags than _stext's stay image (the vDSO); an unflagged _stext is refused", () => {
  const { kernel, buf } = build({ encoding: "place-relative" });
  // PG_referenced besides PG_reserved, as the vDSO pages in rodata have once processes map them.
  buf.writeBigUInt64LE(PG_RESERVED | 2n, 0x800000 + ((IMAGE_PA + 0x250000) / 4096) * 64);
  assert.equal(kernelImageRange(kernel).bytes, IMAGE_BYTES);
  buf.writeBigUInt64LE(0n, 0x800000 + (IMAGE_PA / 4096) * 64);
  assert.throws(
    () => kernelImageRange(kernel),
    (e: unknown) => e instanceof BtfLocateError && e.reason === "no-image" && /no page flags/.test(e.message),
  );
});

test("BTF: no blob anywhere is a typed error naming what was tried", () => {
  const { kernel } = build({
    encoding: "relative-base",
    noKallsyms: true,
    corrupt: (b, pa) => b.fill(0, pa(AT.btf), pa(AT.btf) + 64),
  });
  assert.throws(
    () => locateBtf(kernel),
    (e: unknown) =>
      e instanceof BtfLocateError && e.reason === "not-found" && /no BTF header/.test(e.message),
  );
});

// ---------------------------------------------------------------------------------------------------------
// Hostile tables

function rejects(options: BuildOptions, reason: string, pattern: RegExp): void {
  const { kernel } = build(options);
  const started = performance.now();
  assert.throws(
    () => openKallsyms(kernel),
    (e: unknown) => {
      assert.ok(e instanceof KallsymsError, `KallsymsError, got ${String(e)}`);
      assert.equal(e.reason, reason, e.message);
      assert.match(e.message, pattern);
      return true;
    },
  );
  assert.ok(performance.now() - started < 2000, "refused promptly");
}

test("hostile kallsyms: a huge or zero symbol count", () => {
  rejects(
    { encoding: "place-relative", corrupt: (b, pa) => b.writeUInt32LE(0x7fffffff, pa(AT.numSyms)) },
    "malformed",
    /kallsyms_num_syms = 2147483647/,
  );
  rejects(
    { encoding: "place-relative", corrupt: (b, pa) => b.writeUInt32LE(0, pa(AT.numSyms)) },
    "malformed",
    /kallsyms_num_syms = 0/,
  );
  // The largest count accepted: its offsets table runs off the 4 MiB image.
  rejects(
    { encoding: "place-relative", corrupt: (b, pa) => b.writeUInt32LE(1 << 22, pa(AT.numSyms)) },
    "unreadable",
    /kallsyms_offsets/,
  );
});

test("hostile kallsyms: more symbols than names", () => {
  // Offsets for 2x the symbols fit the image; the names after the real ones are zeros (count 0).
  rejects(
    {
      encoding: "place-relative",
      corrupt: (b, pa) => b.writeUInt32LE(b.readUInt32LE(pa(AT.numSyms)) * 2, pa(AT.numSyms)),
    },
    "malformed",
    /token count 0/,
  );
});

test("hostile kallsyms: a token index outside the token table", () => {
  rejects(
    { encoding: "relative-base", corrupt: (b, pa) => b.writeUInt16LE(0xffff, pa(AT.tokenIndex) + 2 * 0x41) },
    "malformed",
    /token 65 .* does not end/,
  );
  // A token table at the very end of the mapping, its index elsewhere: tokens run into unmapped memory.
  const tableAtEnd = (IMAGE_VA + BigInt(IMAGE_BYTES - 16)).toString(16);
  rejects(
    {
      encoding: "relative-base",
      vmcoreinfo: { "SYMBOL(kallsyms_token_table)": tableAtEnd },
      corrupt: (b, pa) => b.fill(0x41, pa(IMAGE_BYTES - 16), pa(IMAGE_BYTES)),
    },
    "malformed",
    /mapped table/,
  );
});

test("hostile kallsyms: a token with a control character", () => {
  rejects(
    {
      encoding: "relative-base",
      corrupt: (b, pa) =>
        b.write("\n", pa(AT.tokenTable) + b.readUInt16LE(pa(AT.tokenIndex) + 0x5f * 2), "latin1"),
    },
    "malformed",
    /uses token 95, which holds a control character/,
  );
});

test("hostile kallsyms: names that overflow", () => {
  // A count of 127 tokens 10 bytes before the end of the mapping.
  const namesAtEnd = (IMAGE_VA + BigInt(IMAGE_BYTES - 10)).toString(16);
  rejects(
    {
      encoding: "place-relative",
      vmcoreinfo: { "SYMBOL(kallsyms_names)": namesAtEnd },
      corrupt: (b, pa) => {
        b[pa(IMAGE_BYTES - 10)] = 0x7f;
      },
    },
    "malformed",
    /kallsyms_names ends .* before symbol 0/,
  );
  // A 2-byte count whose second byte continues (3-byte ULEB128 is never written).
  rejects(
    {
      encoding: "place-relative",
      corrupt: (b, pa) => {
        b[pa(AT.names)] = 0x81;
        b[pa(AT.names) + 1] = 0x80;
      },
    },
    "malformed",
    /longer than two bytes/,
  );
  // A name that expands past KSYM_NAME_LEN: 200 tokens of "kallsyms" (8 characters each); one symbol, so the
  // bytes after it need not parse.
  rejects(
    {
      encoding: "place-relative",
      corrupt: (b, pa) => {
        b.writeUInt32LE(1, pa(AT.numSyms));
        b[pa(AT.names)] = 0x80 | (200 & 0x7f);
        b[pa(AT.names) + 1] = 200 >> 7;
        b.fill(0x82, pa(AT.names) + 2, pa(AT.names) + 202);
      },
    },
    "malformed",
    /expands to 1600 characters/,
  );
});

test("hostile kallsyms: tables outside the kernel image mapping", () => {
  rejects(
    { encoding: "place-relative", vmcoreinfo: { "SYMBOL(kallsyms_names)": "ffff888000100000" } },
    "malformed",
    /outside the kernel image mapping/,
  );
});

test("hostile kallsyms: addresses that agree with VMCOREINFO under no encoding", () => {
  // Every offset moved by 4 KiB: _stext no longer decodes to SYMBOL(_stext) in any encoding.
  rejects(
    {
      encoding: "place-relative",
      corrupt: (b, pa) => {
        const n = b.readUInt32LE(pa(AT.numSyms));
        for (let i = 0; i < n; i++) {
          const at = pa(AT.offsets) + i * 4;
          b.writeInt32LE(b.readInt32LE(at) + 4096, at);
        }
      },
    },
    "mismatch",
    /place-relative: _stext decodes to 0xffffffffa0001000, SYMBOL\(_stext\) is 0xffffffffa0000000/,
  );
  // Right _stext, wrong init_uts_ns: one disagreement is enough.
  rejects(
    {
      encoding: "relative-base",
      corrupt: (b, pa) => {
        const n = b.readUInt32LE(pa(AT.numSyms));
        // init_uts_ns is the one symbol 1 MiB above the relative base (_stext).
        for (let i = 0; i < n; i++) {
          const at = pa(AT.offsets) + i * 4;
          if (b.readUInt32LE(at) === 0x100000) b.writeUInt32LE(0x100040, at);
        }
      },
    },
    "mismatch",
    /init_uts_ns decodes to 0xffffffffa0100040/,
  );
});

test("hostile kallsyms: an unsorted table is refused even when the checked symbols agree", () => {
  rejects(
    {
      encoding: "place-relative",
      corrupt: (b, pa) => {
        // Swap two fillers' offsets (kept place-relative, so only the order breaks).
        const i = 100;
        const a = b.readInt32LE(pa(AT.offsets) + i * 4) + i * 4;
        const c = b.readInt32LE(pa(AT.offsets) + (i + 1) * 4) + (i + 1) * 4;
        b.writeInt32LE(c - i * 4, pa(AT.offsets) + i * 4);
        b.writeInt32LE(a - (i + 1) * 4, pa(AT.offsets) + (i + 1) * 4);
      },
    },
    "mismatch",
    /not sorted at symbol 101/,
  );
});
