/**
 * Link framing (src/link/protocol.ts, src/link/decoder.ts): every message round-trips, a sample session decodes
 * the same at every split point, and each kind of malformed input gives a LinkError naming the frame's offset.
 */
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { test } from "node:test";
import { LinkDecoder } from "../../src/link/decoder.ts";
import { LinkError } from "../../src/link/errors.ts";
import {
  CAPABILITY,
  ERROR_CODE,
  encodeBytesFrames,
  encodeMessage,
  FRAME_HEADER_BYTES,
  LINK_MAGIC,
  MAX_PAYLOAD_BYTES,
  MAX_ZERO_PAGES,
  type Message,
  MSG,
  NACK_REASON,
  PAGE_BYTES,
  ROLE,
} from "../../src/link/protocol.ts";

const page = Buffer.alloc(PAGE_BYTES, 0xa5);
const hash = randomBytes(32);
// be64 offset|flags of a PAGE record without CONTINUE, then idlen + idstr, as QEMU writes it.
const pageHeader = Buffer.concat([
  Buffer.from("0000000000123008", "hex"),
  Buffer.from([6]),
  Buffer.from("pc.ram"),
]);

const samples: Message[] = [
  {
    type: MSG.HELLO,
    major: 1,
    minor: 3,
    role: ROLE.RECEIVE,
    windowBytes: 16 << 20,
    nonce: randomBytes(32),
    capabilities: [CAPABILITY.REF_SHA256, "future-thing"],
  },
  {
    type: MSG.HELLO,
    major: 1,
    minor: 0,
    role: ROLE.SEND,
    windowBytes: 0,
    nonce: randomBytes(32),
    capabilities: [],
  },
  { type: MSG.AUTH, mac: randomBytes(32) },
  { type: MSG.READY },
  { type: MSG.DATA, bytes: Buffer.from("QEVM\0\0\0\x03") },
  { type: MSG.REF, refId: 1, blockNumber: 123456789, hash, pageHeader },
  {
    type: MSG.REF,
    refId: Number.MAX_SAFE_INTEGER,
    blockNumber: 0,
    hash,
    pageHeader: pageHeader.subarray(0, 8),
  },
  { type: MSG.PAGE_DATA, refId: 7, page },
  {
    type: MSG.REF_FS,
    refId: 8,
    filesystem: Buffer.from("0f0e0d0c0b0a49088706050403020100", "hex"),
    blockNumber: 2 ** 40 + 8,
    hash,
    pageHeader,
  },
  // A bare REF_FS (1.3): a page inside a multifd packet, no record header.
  {
    type: MSG.REF_FS,
    refId: 9,
    filesystem: Buffer.from("0f0e0d0c0b0a49088706050403020100", "hex"),
    blockNumber: 16,
    hash,
    pageHeader: Buffer.alloc(0),
  },
  { type: MSG.ZEROS, pages: 3 },
  { type: MSG.ZEROS, pages: MAX_ZERO_PAGES },
  { type: MSG.RETURN, bytes: Buffer.from([0, 3, 0, 4, 1, 2, 3, 4]) },
  { type: MSG.NACK, refId: 7, reason: NACK_REASON.UNVERIFIED },
  { type: MSG.ACK, refId: 6 },
  { type: MSG.LOAD, busyPermille: 1000, destinationQueuedBytes: 3 * 1024 * 1024 },
  { type: MSG.EOF },
  {
    type: MSG.ERROR,
    code: ERROR_CODE.DESTINATION,
    message: "cannot connect to 127.0.0.1:4444 — ECONNREFUSED",
  },
  {
    type: MSG.HELLO,
    major: 1,
    minor: 1,
    role: ROLE.SEND,
    windowBytes: 0,
    nonce: randomBytes(32),
    capabilities: [CAPABILITY.REF_SHA256],
    claim: { migration: randomBytes(16), channel: 2, target: "vm-7.sock" },
  },
];

/** Decoded messages hold views; compare as plain values. */
function plain(messages: Message[]): unknown[] {
  return messages.map((m) =>
    Object.fromEntries(Object.entries(m).map(([k, v]) => [k, Buffer.isBuffer(v) ? v.toString("hex") : v])),
  );
}

function expectLinkError(fn: () => unknown, code: string, offset?: number): LinkError {
  let caught: unknown;
  try {
    fn();
  } catch (error) {
    caught = error;
  }
  assert.ok(caught instanceof LinkError, `expected a LinkError, got ${String(caught)}`);
  assert.equal(caught.code, code, caught.message);
  if (offset !== undefined) assert.equal(caught.offset, offset, caught.message);
  return caught;
}

test("every message type round-trips through encodeMessage and the decoder", () => {
  for (const message of samples) {
    const [decoded, ...more] = new LinkDecoder().push(encodeMessage(message));
    assert.equal(more.length, 0);
    assert.deepEqual(plain([decoded as Message]), plain([message]));
  }
  const types = new Set(samples.map((m) => m.type));
  assert.deepEqual([...types].sort(), Object.values(MSG).sort(), "a sample of every type");
});

test("a session decodes identically when split at every byte boundary, and in 3 pieces", () => {
  const wire = Buffer.concat(samples.map(encodeMessage));
  const expected = plain(samples);
  for (let cut = 0; cut <= wire.length; cut++) {
    const decoder = new LinkDecoder();
    const got = [...decoder.push(wire.subarray(0, cut)), ...decoder.push(wire.subarray(cut))];
    decoder.end();
    assert.deepEqual(plain(got), expected, `split at ${cut}`);
  }
  for (let a = 0; a < wire.length; a += 97) {
    for (let b = a; b <= wire.length; b += 89) {
      const decoder = new LinkDecoder();
      const got = [a, b, wire.length].flatMap((end, i) => decoder.push(wire.subarray([0, a, b][i], end)));
      assert.deepEqual(plain(got), expected, `split at ${a}, ${b}`);
    }
  }
  // Byte by byte.
  const decoder = new LinkDecoder();
  const got: Message[] = [];
  for (let i = 0; i < wire.length; i++) got.push(...decoder.push(wire.subarray(i, i + 1)));
  assert.deepEqual(plain(got), expected);
  assert.equal(decoder.offset, wire.length);
});

test("DATA larger than one frame is split into frames whose payloads are views of the input", () => {
  const bytes = randomBytes(2 * MAX_PAYLOAD_BYTES + 123);
  const frames = encodeBytesFrames(MSG.DATA, bytes);
  assert.equal(frames.length, 6);
  assert.equal(frames[1]?.buffer, bytes.buffer, "no copy");
  const got = new LinkDecoder().push(Buffer.concat(frames));
  assert.deepEqual(
    got.map((m) => (m.type === MSG.DATA ? m.bytes.length : -1)),
    [MAX_PAYLOAD_BYTES, MAX_PAYLOAD_BYTES, 123],
  );
  assert.ok(Buffer.concat(got.map((m) => (m.type === MSG.DATA ? m.bytes : Buffer.alloc(0)))).equals(bytes));
  assert.deepEqual(encodeBytesFrames(MSG.RETURN, Buffer.alloc(0)), []);
});

test("DATA of several buffers: frames across their boundaries, payloads still views, the bytes in order", () => {
  const parts = [randomBytes(100), Buffer.alloc(0), randomBytes(MAX_PAYLOAD_BYTES), randomBytes(5000)];
  const frames = encodeBytesFrames(MSG.DATA, parts);
  assert.ok(
    frames.some((f) => f.buffer === parts[2]?.buffer),
    "no copy of the input",
  );
  const got = new LinkDecoder().push(Buffer.concat(frames));
  assert.deepEqual(
    got.map((m) => (m.type === MSG.DATA ? m.bytes.length : -1)),
    [MAX_PAYLOAD_BYTES, 5100],
  );
  assert.ok(
    Buffer.concat(got.map((m) => (m.type === MSG.DATA ? m.bytes : Buffer.alloc(0)))).equals(
      Buffer.concat(parts),
    ),
  );
  assert.deepEqual(encodeBytesFrames(MSG.DATA, [Buffer.alloc(0), Buffer.alloc(0)]), []);
});

/** DATA and RETURN handed on in parts, joined back: consecutive messages of one of those types as one. */
function joinParts(messages: Message[]): unknown[] {
  const joined: Message[] = [];
  for (const m of messages) {
    const last = joined.at(-1);
    if ((m.type === MSG.DATA || m.type === MSG.RETURN) && last?.type === m.type)
      joined[joined.length - 1] = { type: m.type, bytes: Buffer.concat([last.bytes, m.bytes]) } as Message;
    else joined.push(m);
  }
  return plain(joined);
}

test("bytesInParts: DATA and RETURN come as views of the input as it arrives, the same bytes at every split", () => {
  const big = randomBytes(3 * 1024 + 17);
  const session = [...samples, { type: MSG.DATA, bytes: big } as Message, samples[0] as Message];
  const wire = Buffer.concat(session.map(encodeMessage));
  const expected = joinParts(session);
  for (let cut = 0; cut <= wire.length; cut++) {
    const decoder = new LinkDecoder({ bytesInParts: true });
    const first = wire.subarray(0, cut);
    const second = Buffer.from(wire.subarray(cut)); // a buffer of its own: views of it are told apart
    const got = [...decoder.push(first), ...decoder.push(second)];
    decoder.end();
    assert.deepEqual(joinParts(got), expected, `split at ${cut}`);
    for (const m of got)
      if (m.type === MSG.DATA || m.type === MSG.RETURN) {
        assert.ok(m.bytes.length > 0, "no empty part");
        assert.ok(m.bytes.buffer === first.buffer || m.bytes.buffer === second.buffer, "a view, not a copy");
      }
    assert.equal(decoder.offset, wire.length);
  }
  // Byte by byte: the large DATA frame's payload comes as one part per byte, nothing held in between.
  const payloadStart = wire.length - encodeMessage(samples[0] as Message).length - big.length;
  const decoder = new LinkDecoder({ bytesInParts: true });
  const got: Message[] = [];
  for (let i = 0; i < wire.length; i++) {
    const messages = decoder.push(wire.subarray(i, i + 1));
    got.push(...messages);
    if (i >= payloadStart && i < payloadStart + big.length) {
      assert.equal(decoder.bufferedBytes, 0, `held bytes at ${i}`);
      assert.equal(messages.length, 1);
    }
  }
  assert.deepEqual(joinParts(got), expected);
  // Without the option, DATA is assembled whole like every other type.
  assert.deepEqual(plain(new LinkDecoder().push(wire)), plain(session));
});

test("bytesInParts: a link cut inside a DATA frame handed on in parts is truncated at that frame", () => {
  const ready = encodeMessage({ type: MSG.READY });
  const data = encodeMessage({ type: MSG.DATA, bytes: randomBytes(1000) });
  const decoder = new LinkDecoder({ bytesInParts: true });
  const got = decoder.push(Buffer.concat([ready, data.subarray(0, 400)]));
  assert.deepEqual(
    got.map((m) => m.type),
    [MSG.READY, MSG.DATA],
  );
  assert.equal(decoder.offset, ready.length + 400, "the part handed on is consumed");
  assert.throws(() => decoder.takeRemainder(), /inside a frame handed on in parts/);
  const e = expectLinkError(() => decoder.end(), "truncated", ready.length);
  assert.match(e.message, /DATA frame with 605 of its 1000 payload bytes missing/);
});

test("malformed input: each case is a typed LinkError at the offending frame's offset", () => {
  const ready = encodeMessage({ type: MSG.READY });
  const header = (type: number, length: number) => {
    const b = Buffer.alloc(FRAME_HEADER_BYTES);
    b[0] = type;
    b.writeUInt32BE(length, 1);
    return b;
  };
  const hello = encodeMessage(samples[0] as Message);

  // Unknown type (a QEMU stream sent to a link port), after one good frame.
  const qemu = Buffer.concat([ready, Buffer.from("QEVM\0\0\0\x03")]);
  const e = expectLinkError(() => new LinkDecoder().push(qemu), "unknown-type", ready.length);
  assert.match(e.message, /QEMU/);
  // Oversized frame: rejected from the header alone, nothing allocated for it.
  const decoder = new LinkDecoder();
  expectLinkError(
    () => decoder.push(Buffer.concat([ready, header(MSG.DATA, MAX_PAYLOAD_BYTES + 1)])),
    "bad-length",
    5,
  );
  assert.ok(decoder.bufferedBytes < 64);
  expectLinkError(() => decoder.push(ready), "bad-length", 5); // unusable afterwards
  expectLinkError(() => new LinkDecoder().push(header(MSG.DATA, 0xffffffff)), "bad-length", 0);
  // A fixed-size message of the wrong size.
  expectLinkError(
    () => new LinkDecoder().push(Buffer.concat([header(MSG.ACK, 9), Buffer.alloc(9)])),
    "bad-length",
    0,
  );
  expectLinkError(() => new LinkDecoder().push(header(MSG.READY, 1)), "bad-length", 0);
  // Bad magic in HELLO.
  const badMagic = Buffer.from(hello);
  badMagic.write("qemu-vm!", FRAME_HEADER_BYTES, "latin1");
  expectLinkError(() => new LinkDecoder().push(Buffer.concat([ready, badMagic])), "bad-magic", ready.length);
  // HELLO whose capability list runs past the payload.
  const cut = Buffer.from(hello);
  cut.writeUInt32BE(hello.length - FRAME_HEADER_BYTES - 3, 1);
  expectLinkError(() => new LinkDecoder().push(cut.subarray(0, hello.length - 3)), "bad-payload", 0);
  // Unknown role.
  const badRole = Buffer.from(hello);
  badRole[FRAME_HEADER_BYTES + LINK_MAGIC.length + 4] = 9;
  expectLinkError(() => new LinkDecoder().push(badRole), "bad-payload", 0);
  // A refId beyond 2^53.
  const ref = encodeMessage(samples[5] as Message);
  ref.writeBigUInt64BE(1n << 60n, FRAME_HEADER_BYTES);
  expectLinkError(() => new LinkDecoder().push(Buffer.concat([ready, ready, ref])), "bad-payload", 10);
  // Truncated at the end: inside the header, and inside the payload.
  const pageData = encodeMessage(samples[7] as Message);
  for (const [bytes, at] of [
    [Buffer.concat([ready, pageData.subarray(0, 3)]), 5],
    [Buffer.concat([ready, pageData.subarray(0, 100)]), 5],
  ] as const) {
    const d = new LinkDecoder();
    assert.equal(d.push(bytes).length, 1);
    expectLinkError(() => d.end(), "truncated", at);
  }
  const whole = new LinkDecoder();
  whole.push(Buffer.concat([ready, pageData]));
  whole.end();
});

test("a decode error is never untyped: random garbage gives LinkErrors or messages, nothing else", () => {
  for (let i = 0; i < 2000; i++) {
    const garbage = randomBytes(1 + (i % 64));
    // Make valid types likely so payload decoders see garbage too.
    garbage[0] = (Object.values(MSG)[i % Object.values(MSG).length] as number) ?? 0;
    if (garbage.length >= 5) garbage.writeUInt32BE(garbage.length - 5, 1);
    const decoder = new LinkDecoder();
    try {
      decoder.push(garbage);
      decoder.end();
    } catch (error) {
      assert.ok(error instanceof LinkError, String(error));
    }
  }
});

test("takeRemainder hands back the bytes after the last frame taken", () => {
  const wire = Buffer.concat([encodeMessage({ type: MSG.READY }), encodeMessage(samples[4] as Message)]);
  for (let cut = 5; cut <= wire.length; cut++) {
    const decoder = new LinkDecoder();
    decoder.write(wire.subarray(0, cut));
    assert.equal(decoder.nextFrame()?.type, MSG.READY);
    if (cut < wire.length) {
      // Possibly a partial frame pending.
      assert.equal(decoder.nextFrame(), null);
    }
    const rest = decoder.takeRemainder();
    assert.ok(Buffer.concat([rest, wire.subarray(cut)]).equals(wire.subarray(5)), `cut ${cut}`);
  }
});

test("HELLO 1.1 claims: a 1.0 send's HELLO has none; a bad destination name or a cut claim is refused", () => {
  const claimed = samples.find((m) => m.type === MSG.HELLO && m.claim) as Message;
  const frame = encodeMessage(claimed);
  // The same bytes read as a 1.0 HELLO (minor 0): the claim is a later field, skipped.
  const asOld = Buffer.from(frame);
  asOld.writeUInt16BE(0, FRAME_HEADER_BYTES + LINK_MAGIC.length + 2);
  const [old] = new LinkDecoder().push(asOld);
  assert.ok(old?.type === MSG.HELLO && old.claim === undefined);
  // A claim cut short.
  const cut = Buffer.from(frame.subarray(0, frame.length - 12));
  cut.writeUInt32BE(cut.length - FRAME_HEADER_BYTES, 1);
  expectLinkError(() => new LinkDecoder().push(cut), "bad-payload", 0);
  // A name that could leave the allowed directory: never encoded, never decoded.
  assert.throws(
    () =>
      encodeMessage({
        ...(claimed as Extract<Message, { type: 1 }>),
        claim: { migration: randomBytes(16), channel: 0, target: "../x" },
      }),
    /bad destination name/,
  );
  const slash = Buffer.from(frame);
  const at = frame.indexOf(Buffer.from("vm-7.sock"));
  slash.write("/", at + 2, "latin1");
  expectLinkError(() => new LinkDecoder().push(slash), "bad-payload", 0);
});

test("REF_FS: a pageHeader is empty (bare, 1.3) or a RAM record header: 1 to 7 bytes are refused both ways", () => {
  const ref = {
    type: MSG.REF_FS,
    refId: 1,
    filesystem: Buffer.alloc(16, 1),
    blockNumber: 8,
    hash,
  } as const;
  assert.throws(() => encodeMessage({ ...ref, pageHeader: Buffer.alloc(5) }), RangeError);
  // Made by hand: a frame whose payload carries a 5-byte header.
  const good = encodeMessage({ ...ref, pageHeader: Buffer.alloc(8) });
  const bad = Buffer.concat([good.subarray(0, good.length - 3)]);
  bad.writeUInt32BE(bad.length - FRAME_HEADER_BYTES, 1);
  expectLinkError(() => new LinkDecoder().push(bad), "bad-payload", 0);
  assert.equal(CAPABILITY.REF_FS_BARE, "ref-fs-bare");
});

test("ZEROS: 1 to MAX_ZERO_PAGES pages (no more than a DATA frame's bytes); 0 or more are refused both ways", () => {
  assert.equal(MAX_ZERO_PAGES * PAGE_BYTES, MAX_PAYLOAD_BYTES);
  assert.throws(() => encodeMessage({ type: MSG.ZEROS, pages: 0 }), RangeError);
  assert.throws(() => encodeMessage({ type: MSG.ZEROS, pages: MAX_ZERO_PAGES + 1 }), RangeError);
  for (const pages of [0, MAX_ZERO_PAGES + 1, 0xffffffff]) {
    const frame = encodeMessage({ type: MSG.ZEROS, pages: 1 });
    frame.writeUInt32BE(pages, FRAME_HEADER_BYTES);
    expectLinkError(() => new LinkDecoder().push(frame), "bad-payload", 0);
  }
});

test("LOAD: busyPermille 0..1000 and a queue that fits be32; out of range is refused both ways", () => {
  assert.throws(
    () => encodeMessage({ type: MSG.LOAD, busyPermille: 1001, destinationQueuedBytes: 0 }),
    RangeError,
  );
  assert.throws(
    () => encodeMessage({ type: MSG.LOAD, busyPermille: -1, destinationQueuedBytes: 0 }),
    RangeError,
  );
  assert.throws(
    () => encodeMessage({ type: MSG.LOAD, busyPermille: 5, destinationQueuedBytes: -1 }),
    RangeError,
  );
  // A queue beyond be32 is sent as the largest value, not wrapped.
  const [big] = new LinkDecoder().push(
    encodeMessage({ type: MSG.LOAD, busyPermille: 5, destinationQueuedBytes: 2 ** 40 }),
  );
  assert.deepEqual(big, { type: MSG.LOAD, busyPermille: 5, destinationQueuedBytes: 0xffffffff });
  const frame = encodeMessage({ type: MSG.LOAD, busyPermille: 0, destinationQueuedBytes: 0 });
  frame.writeUInt16BE(1001, FRAME_HEADER_BYTES);
  expectLinkError(() => new LinkDecoder().push(frame), "bad-payload", 0);
  assert.equal(CAPABILITY.LOAD_REPORT, "load-report");
});
