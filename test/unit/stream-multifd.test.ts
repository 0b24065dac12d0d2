/**
 * The multifd channel parser and the zero-list rewrite on real captured channels (test/fixtures/multifd: QEMU
 * 10.0 uncompressed and zstd, 7.2), split at arbitrary chunk boundaries, and on hostile variants of them: a
 * truncated header, pages_alloc huge, normal_pages > pages_alloc, zero_pages past the list, a bad magic mid-stream.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { MultifdError } from "../../src/stream/errors.ts";
import { type MultifdEvent, MultifdParser, type RamPacketHeader } from "../../src/stream/multifd.ts";
import { moveToZeroList } from "../../src/stream/multifd-rewrite.ts";
import { INIT_BYTES, RAM, ramHeaderBytes } from "../../src/stream/multifd-wire.ts";
import { type FixtureName, multifdFixture } from "../support/multifd-fixtures.ts";

const HEADER = ramHeaderBytes(4096);
const ALL: FixtureName[] = [
  "qemu10-nocomp-channel1",
  "qemu10-nocomp-channel2",
  "qemu10-zstd-channel1",
  "qemu72-nocomp-channel1",
];

function parse(
  input: Buffer,
  chunks: number[] = [input.length],
  parser = new MultifdParser(),
): MultifdEvent[] {
  const events: MultifdEvent[] = [];
  let at = 0;
  for (let i = 0; at < input.length; i++) {
    const n = Math.max(1, chunks[i % chunks.length] ?? input.length);
    events.push(...parser.push(input.subarray(at, at + n)));
    at += n;
  }
  events.push(...parser.end());
  return events;
}

const joined = (events: MultifdEvent[]) => Buffer.concat(events.map((e) => e.bytes));
const headers = (events: MultifdEvent[]) => events.flatMap((e) => (e.kind === "ram" ? [e] : []));

/** Where each packet starts in a channel (whole-input parse). */
function packetStarts(input: Buffer): number[] {
  return parse(input).flatMap((e) => (e.kind === "ram" || e.kind === "device" ? [e.offset] : []));
}

test("captured channels parse to their packets; the events' bytes are the input, for any chunking", () => {
  for (const name of ALL) {
    const f = multifdFixture(name);
    const whole = parse(f.bytes);
    const init = whole[0];
    assert.equal(init?.kind, "init", name);
    assert.deepEqual(
      headers(whole).map((e) => String(e.header.packetNum)),
      f.packetsKept,
      `${name}: every kept packet, in order`,
    );
    assert.ok(joined(whole).equals(f.bytes), name);
    assert.ok(!whole.some((e) => e.kind === "raw"), `${name}: nothing left unparsed`);
    let seed = 7;
    const random = Array.from({ length: 64 }, () => {
      seed = (seed * 48271) % 2147483647;
      return seed % 5000;
    });
    for (const chunks of [[1], [13], [HEADER - 1], [4096 + 9], random]) {
      const events = parse(f.bytes, chunks);
      assert.ok(joined(events).equals(f.bytes), `${name}, chunks ${chunks[0]}`);
      assert.deepEqual(
        headers(events).map((e) => e.header),
        headers(whole).map((e) => e.header),
      );
    }
  }
});

test("every split of the init and the first packets gives the same packets", () => {
  const f = multifdFixture("qemu10-nocomp-channel1");
  const want = headers(parse(f.bytes)).map((e) => e.header);
  for (let at = 1; at < INIT_BYTES + 2 * HEADER + 100; at++) {
    const events = parse(f.bytes, [at, f.bytes.length]);
    assert.ok(joined(events).equals(f.bytes), `split at ${at}`);
    assert.deepEqual(
      headers(events).map((e) => e.header),
      want,
      `split at ${at}`,
    );
  }
});

test("header fields: 10.0 zero lists, 7.2's unused field, payload sizes by compression", () => {
  const ten = headers(parse(multifdFixture("qemu10-nocomp-channel1").bytes));
  const sync = ten[0];
  assert.equal(sync?.header.flags, 1, "10.0 starts with a SYNC packet");
  assert.equal(sync?.header.pagesAlloc, 0, "a 9.0+ SYNC packet carries no pages");
  const withPages = ten.find((e) => e.header.normalPages > 0);
  assert.ok(withPages);
  assert.ok(withPages.header.zeroPages > 0, "10.0 lists zero pages");
  assert.equal(withPages.header.offsets.length, withPages.header.normalPages + withPages.header.zeroPages);
  assert.equal(withPages.payloadBytes, withPages.header.normalPages * 4096);
  assert.equal(withPages.header.ramBlock, "ram0");

  const zstd = headers(parse(multifdFixture("qemu10-zstd-channel1").bytes)).find(
    (e) => e.header.normalPages > 0,
  );
  assert.ok(zstd);
  assert.equal(zstd.header.flags & 0x3e, 0x04, "zstd");
  assert.equal(
    zstd.payloadBytes,
    zstd.header.nextPacketSize,
    "a compressed payload is next_packet_size bytes",
  );

  const old = headers(parse(multifdFixture("qemu72-nocomp-channel1").bytes));
  assert.ok(
    old.every((e) => e.header.zeroPages === 0),
    "7.2 leaves the field zero",
  );
  assert.ok(
    old.every((e) => e.header.pagesAlloc === 128),
    "7.2 fills pages_alloc in every packet",
  );
  // 7.2 leaves next_packet_size of an earlier packet in a packet without pages: the payload follows normal_pages.
  const stale = old.find((e) => e.header.normalPages === 0 && e.header.nextPacketSize > 0);
  assert.ok(stale, "a 7.2 packet with no pages and a stale next_packet_size");
  assert.equal(stale.payloadBytes, 0);
});

/** A copy of a fixture with a be32 at `at` (from the start of packet `packet`) replaced. */
function patched(
  name: FixtureName,
  packet: number,
  field: number,
  value: number,
): { bytes: Buffer; at: number } {
  const bytes = Buffer.from(multifdFixture(name).bytes);
  const at = packetStarts(bytes)[packet] as number;
  bytes.writeUInt32BE(value, at + field);
  return { bytes, at };
}

test("hostile headers: a clear error at the packet's byte, or (passthrough) the rest unchanged", () => {
  const cases: [string, number, number, RegExp][] = [
    ["pages_alloc huge", RAM.pagesAlloc, 0xffffffff, /pages_alloc 4294967295 exceeds the 128 pages/],
    ["normal_pages > pages_alloc", RAM.normalPages, 129, /normal_pages 129 exceeds pages_alloc 128/],
    [
      "zero_pages past the list",
      RAM.zeroPages,
      120,
      /zero_pages 120 exceeds pages_alloc 128 - normal_pages 10/,
    ],
    ["a bad magic mid-stream", RAM.magic, 0xdeadbeef, /packet magic 0xdeadbeef, expected 0x11223344/],
    ["a bad version", RAM.version, 2, /packet version 2, expected 1/],
  ];
  for (const [what, field, value, message] of cases) {
    const { bytes, at } = patched("qemu10-nocomp-channel1", 1, field, value);
    assert.throws(
      () => parse(bytes),
      (error: unknown) =>
        error instanceof MultifdError &&
        message.test(error.message) &&
        error.offset >= at &&
        error.offset < at + HEADER,
      what,
    );
    for (const chunks of [[bytes.length], [1], [777]]) {
      const parser = new MultifdParser({ onError: "passthrough" });
      const events = parse(bytes, chunks, parser);
      assert.ok(joined(events).equals(bytes), `${what}: every byte passes`);
      assert.match(parser.error?.message ?? "", message, what);
      const firstRaw = events.find((e) => e.kind === "raw");
      assert.equal(firstRaw?.offset, at, `${what}: passthrough from the bad packet on`);
      assert.ok(
        events.every((e) => e.kind === "raw" || e.offset < at),
        `${what}: nothing parsed after the bad packet`,
      );
    }
  }
});

test("a truncated header or init is handed on raw at the end", () => {
  const f = multifdFixture("qemu10-nocomp-channel1");
  for (const cut of [10, INIT_BYTES + 5, INIT_BYTES + HEADER - 1, INIT_BYTES + HEADER + 100]) {
    const bytes = f.bytes.subarray(0, cut);
    const events = parse(bytes, [37]);
    assert.ok(joined(events).equals(bytes), `cut at ${cut}`);
  }
  const parser = new MultifdParser();
  parser.push(f.bytes.subarray(0, INIT_BYTES + 100));
  const tail = parser.end();
  assert.equal(tail.length, 1);
  assert.equal(tail[0]?.kind, "raw");
  assert.equal(tail[0]?.offset, INIT_BYTES);
});

test("a channel that is not multifd (another magic) is a clear error", () => {
  const bytes = Buffer.from(multifdFixture("qemu10-nocomp-channel1").bytes);
  bytes.writeUInt32BE(0x5145564d, 0);
  assert.throws(() => parse(bytes), /byte 0: MultiFDInit_t magic 0x5145564d, expected 0x11223344/);
});

/** A whole packet with pages from a fixture: header bytes, parsed header, payload. */
function wholePacket(
  name: FixtureName,
  minPages: number,
): { headerBytes: Buffer; header: RamPacketHeader; payload: Buffer } {
  const events = parse(multifdFixture(name).bytes);
  const i = events.findIndex((e) => e.kind === "ram" && e.header.normalPages >= minPages);
  const e = events[i];
  assert.ok(e?.kind === "ram");
  const payload = Buffer.concat(
    events
      .slice(i + 1, i + 1 + events.slice(i + 1).findIndex((x) => x.kind === "payload" && x.endsPacket) + 1)
      .map((x) => x.bytes),
  );
  return { headerBytes: e.bytes, header: e.header, payload };
}

test("moveToZeroList: moved pages leave the normal list and the payload, the rest is QEMU's bytes", () => {
  const packet = wholePacket("qemu10-nocomp-channel1", 10);
  const { header } = packet;
  const moved = new Set([0, 3, header.normalPages - 1]);
  const out = Buffer.concat(moveToZeroList(packet, moved, 4096));
  const events = parse(
    Buffer.concat([multifdFixture("qemu10-nocomp-channel1").bytes.subarray(0, INIT_BYTES), out]),
  );
  const again = headers(events)[0];
  assert.ok(again);
  const h = again.header;
  assert.equal(h.normalPages, header.normalPages - 3);
  assert.equal(h.zeroPages, header.zeroPages + 3);
  assert.equal(h.nextPacketSize, header.nextPacketSize - 3 * 4096);
  assert.equal(h.pagesAlloc, header.pagesAlloc);
  assert.equal(h.packetNum, header.packetNum);
  assert.equal(h.flags, header.flags);
  assert.equal(h.ramBlock, header.ramBlock);
  const keptIdx = [...Array(header.normalPages).keys()].filter((i) => !moved.has(i));
  const normalOffsets = header.offsets.slice(0, header.normalPages);
  assert.deepEqual(
    h.offsets.slice(0, h.normalPages),
    keptIdx.map((i) => normalOffsets[i]),
  );
  assert.deepEqual(
    h.offsets.slice(h.normalPages, h.normalPages + 3),
    [...moved].map((i) => normalOffsets[i]),
  );
  assert.deepEqual(
    h.offsets.slice(h.normalPages + 3),
    header.offsets.slice(header.normalPages),
    "QEMU's zero pages last",
  );
  // The bytes outside the changed fields are QEMU's.
  const changed = new Set<number>([RAM.normalPages, RAM.nextPacketSize, RAM.zeroPages]);
  for (let at = 0; at < RAM.offsets; at += 4)
    if (!changed.has(at))
      assert.equal(out.readUInt32BE(at), packet.headerBytes.readUInt32BE(at), `header byte ${at}`);
  const payload = Buffer.concat(events.filter((e) => e.kind === "payload").map((e) => e.bytes));
  assert.ok(
    payload.equals(Buffer.concat(keptIdx.map((i) => packet.payload.subarray(i * 4096, (i + 1) * 4096)))),
    "the kept pages' bytes, in order",
  );
  assert.ok(
    Buffer.concat(moveToZeroList(packet, new Set(), 4096)).equals(
      Buffer.concat([packet.headerBytes, packet.payload]),
    ),
  );
});

test("moveToZeroList refuses what it cannot rewrite: a compressed packet, a page that is not there", () => {
  const zstd = wholePacket("qemu10-zstd-channel1", 1);
  assert.throws(() => moveToZeroList(zstd, new Set([0]), 4096), /only an uncompressed RAM packet/);
  const plain = wholePacket("qemu10-nocomp-channel1", 1);
  assert.throws(() => moveToZeroList(plain, new Set([plain.header.normalPages]), 4096), /no normal page/);
});
