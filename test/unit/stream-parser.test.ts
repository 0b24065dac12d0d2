/**
 * The migration-stream parser on streams built record by record with the writer (the real-QEMU streams are in
 * test/integration/stream-capture.test.ts): every record kind round-trips, chunking does not matter, and each
 * kind of malformed input gives a typed error at the right offset, or passthrough when asked.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { StreamError } from "../../src/stream/errors.ts";
import { StreamParser } from "../../src/stream/parser.ts";
import type { PageHeader, StreamRecord } from "../../src/stream/records.ts";
import { encodeRecord, pageToZero } from "../../src/stream/writer.ts";

const MiB = 1024 * 1024;

function page(addr: number, fill: number, block: string | null, cont = block === null): StreamRecord {
  const header: PageHeader = {
    addr,
    flags: 0x08 | (cont ? 0x20 : 0),
    idstr: block,
    block: block ?? "pc.ram",
  };
  return { kind: "ram", type: "page", offset: 0, header, data: Buffer.alloc(4096, fill) };
}

/** A plausible small stream: header, configuration, ram START/PART/END with every record type, a device FULL. */
function sampleRecords(): StreamRecord[] {
  const h = (addr: number, flags: number, idstr: string | null): PageHeader => ({
    addr,
    flags,
    idstr,
    block: idstr ?? "pc.ram",
  });
  return [
    { kind: "header", offset: 0, version: 3 },
    {
      kind: "configuration",
      offset: 0,
      machineType: "pc-q35-7.2",
      subsections: [
        { name: "configuration/capabilities", version: 1, capabilities: [] },
        { name: "configuration/uuid", version: 1, uuid: Buffer.alloc(16, 7) },
      ],
    },
    { kind: "command", offset: 0, cmd: 1, name: "OPEN_RETURN_PATH", payload: Buffer.alloc(0) },
    { kind: "command", offset: 0, cmd: 2, name: "PING", payload: Buffer.from([0, 0, 0, 1]) },
    { kind: "section", offset: 0, type: "START", sectionId: 2, idstr: "ram", instanceId: 0, versionId: 4 },
    {
      kind: "ram",
      type: "memSize",
      offset: 0,
      total: 2 * MiB + 64 * 1024,
      flags: 0x04,
      blocks: [
        { idstr: "pc.ram", length: 2 * MiB },
        { idstr: "/rom@etc/acpi/tables", length: 64 * 1024 },
      ],
    },
    { kind: "ram", type: "eos", offset: 0, value: 0x10 },
    { kind: "footer", offset: 0, sectionId: 2 },
    {
      kind: "section",
      offset: 0,
      type: "PART",
      sectionId: 2,
      idstr: null,
      instanceId: null,
      versionId: null,
    },
    page(0, 1, "pc.ram"),
    page(4096, 2, null),
    { kind: "ram", type: "zero", offset: 0, header: h(8192, 0x22, null), fill: 0 },
    page(0, 0, "/rom@etc/acpi/tables"),
    {
      kind: "ram",
      type: "xbzrle",
      offset: 0,
      header: h(0, 0x40, "pc.ram"),
      encoding: 1,
      data: Buffer.from([3, 1, 2, 3]),
    },
    { kind: "ram", type: "compress", offset: 0, header: h(12288, 0x120, null), data: Buffer.alloc(40, 9) },
    { kind: "ram", type: "multifdFlush", offset: 0, value: 0x200 },
    { kind: "ram", type: "eos", offset: 0, value: 0x10 },
    { kind: "footer", offset: 0, sectionId: 2 },
    { kind: "command", offset: 0, cmd: 11, name: "SWITCHOVER_START", payload: Buffer.alloc(0) },
    { kind: "section", offset: 0, type: "END", sectionId: 2, idstr: null, instanceId: null, versionId: null },
    page(2 * MiB - 4096, 3, "pc.ram"),
    { kind: "ram", type: "eos", offset: 0, value: 0x10 },
    { kind: "footer", offset: 0, sectionId: 2 },
    { kind: "section", offset: 0, type: "FULL", sectionId: 3, idstr: "timer", instanceId: 0, versionId: 2 },
    { kind: "raw", offset: 0, bytes: Buffer.from([0, 0, 0, 0, 0, 0, 0, 1, 0x7e, 0, 0, 0, 3, 0]) },
  ];
}

function encode(records: StreamRecord[]): Buffer {
  return Buffer.concat(records.flatMap(encodeRecord));
}

function parseAll(stream: Buffer, chunkSizes: (i: number) => number = () => stream.length): StreamRecord[] {
  const parser = new StreamParser();
  const out: StreamRecord[] = [];
  for (let at = 0, i = 0; at < stream.length; i++) {
    const n = Math.max(1, chunkSizes(i));
    out.push(...parser.push(stream.subarray(at, at + n)));
    at += n;
  }
  out.push(...parser.end());
  return out;
}

/** Records without raw chunk boundaries (which depend on chunking): kind, type, offset, and their bytes. */
function normalise(records: StreamRecord[]): string[] {
  const out: string[] = [];
  for (const r of records) {
    if (r.kind === "raw") {
      const last = out.at(-1);
      if (last?.startsWith("raw")) out[out.length - 1] = `${last}${r.bytes.toString("hex")}`;
      else out.push(`raw@${r.offset}:${r.bytes.toString("hex")}`);
    } else {
      out.push(`${r.kind}/${r.kind === "ram" ? r.type : ""}@${r.offset}:${encode([r]).toString("hex")}`);
    }
  }
  return out;
}

function expectError(stream: Buffer, code: string, offset: number): StreamError {
  try {
    parseAll(stream);
  } catch (error) {
    assert.ok(error instanceof StreamError, `a StreamError, got ${String(error)}`);
    assert.equal(error.code, code, error.message);
    assert.equal(error.offset, offset, error.message);
    return error;
  }
  assert.fail(`no error for a stream that should fail with ${code}`);
}

/** Offset of the i-th record of the sample in its encoding. */
function offsetOf(records: StreamRecord[], index: number): number {
  return encode(records.slice(0, index)).length;
}

test("every record kind round-trips byte for byte, with offsets, and passthrough starts at the device section", () => {
  const stream = encode(sampleRecords());
  const records = parseAll(stream);
  assert.ok(encode(records).equals(stream));
  const kinds = records.map((r) => (r.kind === "ram" ? r.type : r.kind));
  assert.deepEqual(kinds.slice(0, 8), [
    "header",
    "configuration",
    "command",
    "command",
    "section",
    "memSize",
    "eos",
    "footer",
  ]);
  for (const t of ["page", "zero", "xbzrle", "compress", "multifdFlush"] as const)
    assert.ok(kinds.includes(t), t);
  const pages = records.filter((r) => r.kind === "ram" && r.type === "page");
  assert.deepEqual(
    pages.map((r) =>
      r.kind === "ram" && r.type === "page" ? [r.header.block, r.header.addr, r.data[0]] : [],
    ),
    [
      ["pc.ram", 0, 1],
      ["pc.ram", 4096, 2],
      ["/rom@etc/acpi/tables", 0, 0],
      ["pc.ram", 2 * MiB - 4096, 3],
    ],
  );
  const parser = new StreamParser();
  parser.push(stream);
  const full = sampleRecords().findIndex((r) => r.kind === "section" && r.type === "FULL");
  assert.equal(parser.passthroughFrom, offsetOf(sampleRecords(), full));
  assert.match(parser.passthroughReason ?? "", /FULL section "timer"/);
  for (const r of records) if (r.kind !== "raw") assert.equal(encode([r]).length > 0, true);
  // Offsets are where each record starts in the stream.
  for (const r of records)
    if (r.kind !== "raw")
      assert.ok(
        stream
          .subarray(r.offset)
          .subarray(0, encode([r]).length)
          .equals(encode([r])),
      );
});

test("chunking does not change the records: one byte at a time, random sizes, every split point", () => {
  const stream = encode(sampleRecords());
  const whole = normalise(parseAll(stream));
  assert.deepEqual(normalise(parseAll(stream, () => 1)), whole);
  let seed = 42;
  const random = () => {
    seed = (seed * 1103515245 + 12345) % 2 ** 31;
    return seed;
  };
  for (let round = 0; round < 20; round++)
    assert.deepEqual(normalise(parseAll(stream, () => 1 + (random() % 9000))), whole);
  for (let split = 1; split < stream.length; split++)
    assert.deepEqual(
      normalise(parseAll(stream, (i) => (i === 0 ? split : stream.length))),
      whole,
      `split at ${split}`,
    );
});

test("a page turned into a zero record keeps block, offset and CONTINUE, and is what QEMU writes for a zero page", () => {
  const cont = page(4096, 0, null);
  assert.ok(cont.kind === "ram" && cont.type === "page");
  if (cont.kind !== "ram" || cont.type !== "page") return;
  const zero = pageToZero(cont);
  const bytes = encode([zero]);
  // be64 (offset | ZERO | CONTINUE), fill byte 0: 9 bytes (ram.c@v7.2.0:1257-1270).
  assert.equal(bytes.toString("hex"), "0000000000001022" + "00");
  const named = page(8192, 0, "pc.ram");
  if (named.kind !== "ram" || named.type !== "page") return;
  assert.equal(
    encode([pageToZero(named)]).toString("hex"),
    `0000000000002002 06${Buffer.from("pc.ram").toString("hex")} 00`.replaceAll(" ", ""),
  );
});

test("bad magic and bad version are typed errors at offsets 0 and 4", () => {
  const stream = encode(sampleRecords());
  const wrongMagic = Buffer.from(stream);
  wrongMagic.write("XEVM", 0, "latin1");
  assert.match(expectError(wrongMagic, "bad-magic", 0).message, /not a QEMU migration stream/);
  const v2 = Buffer.from(stream);
  v2.writeUInt32BE(2, 4);
  expectError(v2, "bad-version", 4);
});

test("truncation anywhere before the device section is a typed 'truncated' error at the incomplete record", () => {
  const records = sampleRecords();
  const stream = encode(records);
  const full = offsetOf(
    records,
    records.findIndex((r) => r.kind === "section" && r.type === "FULL"),
  );
  const starts = records.map((_, i) => offsetOf(records, i));
  // The configuration has no terminator: it is complete only once the byte after it is seen (not 0x05).
  const afterConfiguration = starts[2];
  for (let cut = 0; cut < full; cut++) {
    const expected = cut === afterConfiguration ? starts[1] : Math.max(...starts.filter((s) => s <= cut));
    const error = expectError(stream.subarray(0, cut), "truncated", expected ?? -1);
    assert.ok(error.message.includes("byte"));
  }
});

test("malformed RAM records: unknown flags, unknown block, CONTINUE first, impossible offsets and lengths", () => {
  const base = sampleRecords();
  const partAt = base.findIndex((r) => r.kind === "section" && r.type === "PART");
  const at = offsetOf(base, partAt + 1);
  const withRecord = (bytes: Buffer) => Buffer.concat([encode(base.slice(0, partAt + 1)), bytes]);
  const be64 = (hi: number, lo: number) => {
    const b = Buffer.alloc(8);
    b.writeUInt32BE(hi, 0);
    b.writeUInt32BE(lo, 4);
    return b;
  };
  const idstr = (s: string) => Buffer.concat([Buffer.from([s.length]), Buffer.from(s, "latin1")]);
  expectError(
    withRecord(Buffer.concat([be64(0, 0x0a), idstr("pc.ram"), Buffer.alloc(4096)])),
    "unknown-ram-flags",
    at,
  );
  expectError(withRecord(be64(0, 0x80)), "unknown-ram-flags", at);
  expectError(
    withRecord(Buffer.concat([be64(0, 0x08), idstr("pc.rom"), Buffer.alloc(4096)])),
    "unknown-block",
    at,
  );
  expectError(
    withRecord(Buffer.concat([be64(0, 0x08 + 0x200000), idstr("pc.ram")])),
    "impossible-offset",
    at,
  );
  expectError(withRecord(be64(0x7fffffff, 0x08)), "impossible-offset", at);
  const xbzrle = Buffer.concat([be64(0, 0x40), idstr("pc.ram"), Buffer.from([1, 0x13, 0x88])]);
  expectError(withRecord(xbzrle), "impossible-length", at);
  const compress = Buffer.concat([be64(0, 0x100), idstr("pc.ram"), Buffer.from([0, 1, 0, 0])]);
  expectError(withRecord(compress), "impossible-length", at);

  // CONTINUE with no block named yet: right after MEM_SIZE's EOS and footer, the block state is empty.
  const startAt = base.findIndex((r) => r.kind === "section" && r.type === "START");
  const contFirst = Buffer.concat([encode(base.slice(0, startAt + 2)), be64(0, 0x28), Buffer.alloc(4096)]);
  expectError(contFirst, "no-current-block", offsetOf(base, startAt + 2));

  // MEM_SIZE whose block is longer than the announced total; a total of 2^60 bytes.
  const memAt = offsetOf(base, startAt + 1);
  const head = encode(base.slice(0, startAt + 1));
  expectError(
    Buffer.concat([head, be64(0, 0x1004), idstr("pc.ram"), be64(0, 0x2000)]),
    "impossible-length",
    memAt + 8,
  );
  expectError(Buffer.concat([head, be64(0x10000000, 0x04)]), "impossible-length", memAt);
});

test("malformed top level: unknown section type, unknown command, bad command length, huge PACKAGED, footer mismatch", () => {
  const base = sampleRecords();
  const cmdAt = base.findIndex((r) => r.kind === "command");
  const head = encode(base.slice(0, cmdAt));
  const at = head.length;
  expectError(Buffer.concat([head, Buffer.from([0x09])]), "unknown-section-type", at);
  expectError(Buffer.concat([head, Buffer.from([0x08, 0, 99, 0, 0])]), "unknown-command", at);
  expectError(Buffer.concat([head, Buffer.from([0x08, 0, 2, 0, 3, 1, 2, 3])]), "bad-command-length", at);
  expectError(
    Buffer.concat([head, Buffer.from([0x08, 0, 7, 0, 4, 0x40, 0, 0, 0])]),
    "impossible-length",
    at + 5,
  );
  // A footer that names another section.
  const eos = base.findIndex((r) => r.kind === "ram" && r.type === "eos");
  const badFooter = Buffer.concat([encode(base.slice(0, eos + 1)), Buffer.from([0x7e, 0, 0, 0, 9])]);
  expectError(badFooter, "footer-mismatch", offsetOf(base, eos + 1));
});

test("onError passthrough: the error is recorded, everything after it comes out raw, the bytes are unchanged", () => {
  const stream = Buffer.from(encode(sampleRecords()));
  const base = sampleRecords();
  const partAt = base.findIndex((r) => r.kind === "section" && r.type === "PART");
  const bad = offsetOf(base, partAt + 1);
  stream[bad + 7] = 0x0a; // PAGE|ZERO: not a valid combination
  const parser = new StreamParser({ onError: "passthrough" });
  const records = [
    ...parser.push(stream.subarray(0, bad + 100)),
    ...parser.push(stream.subarray(bad + 100)),
    ...parser.end(),
  ];
  assert.equal(parser.error?.code, "unknown-ram-flags");
  assert.equal(parser.passthroughFrom, bad);
  assert.ok(encode(records).equals(stream));
  assert.ok(records.filter((r) => r.offset >= bad).every((r) => r.kind === "raw"));
});
