/**
 * receive's REF reassembly (src/link/ref-reassembler.ts) and send's ledger (src/link/ref-ledger.ts), without
 * sockets: the destination stream is rebuilt byte for byte in order, a REF that fails verification holds everything
 * after it until its PAGE_DATA, and protocol breaks are typed errors.
 */
import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { test } from "node:test";
import { LinkDecoder } from "../../src/link/decoder.ts";
import { LinkError } from "../../src/link/errors.ts";
import {
  type Ack,
  encodeMessage,
  type Message,
  MSG,
  NACK_REASON,
  type Nack,
  PAGE_BYTES,
  type Ref,
  WINDOW_SLACK_BYTES,
} from "../../src/link/protocol.ts";
import { RefLedger } from "../../src/link/ref-ledger.ts";
import { type ReassemblerOutput, RefReassembler, type RefResolver } from "../../src/link/ref-reassembler.ts";

const sha256 = (bytes: Buffer) => createHash("sha256").update(bytes).digest();

/** A shared disk of `blocks` random blocks; `resolve` checks the hash like receive's storage does. */
function fakeDisk(blocks: number) {
  const disk = Array.from({ length: blocks }, () => randomBytes(PAGE_BYTES));
  const resolve: RefResolver = (blockNumber, hash) => {
    const block = disk[blockNumber];
    return block && sha256(block).equals(hash) ? Buffer.from(block) : null;
  };
  return { disk, resolve };
}

const headerOf = (n: number) => {
  const header = Buffer.alloc(8);
  header.writeBigUInt64BE(BigInt(n * PAGE_BYTES) | 0x08n); // RAM_SAVE_FLAG_PAGE
  return header;
};

function ref(refId: number, blockNumber: number, page: Buffer): Ref {
  return { type: MSG.REF, refId, blockNumber, hash: sha256(page), pageHeader: headerOf(refId) };
}
const data = (text: string): Message => ({ type: MSG.DATA, bytes: Buffer.from(text) });
const text = (out: ReassemblerOutput) => Buffer.concat(out.toQemu);

function expectLinkError(fn: () => unknown, code: string): void {
  assert.throws(fn, (error: unknown) => error instanceof LinkError && error.code === code);
}

test("REFs that verify are rebuilt inline: the QEMU stream comes out whole, one ACK per batch", () => {
  const { disk, resolve } = fakeDisk(4);
  const r = new RefReassembler({ resolveRef: resolve, windowBytes: 1 << 20 });
  const [b0, b3] = [disk[0] as Buffer, disk[3] as Buffer];
  const head = data("QEVM");
  const out = r.push([head, ref(1, 3, b3), data("-mid-"), ref(2, 0, b0), { type: MSG.EOF }]);
  const expected = Buffer.concat([
    Buffer.from("QEVM"),
    headerOf(1),
    b3,
    Buffer.from("-mid-"),
    headerOf(2),
    b0,
  ]);
  assert.ok(text(out).equals(expected));
  assert.deepEqual(out.toSend, [{ type: MSG.ACK, refId: 2 }]);
  assert.equal(out.end, true);
  assert.equal(r.ended, true);
  assert.equal(
    out.toQemu[0],
    head.type === MSG.DATA ? head.bytes : null,
    "DATA passes through without a copy",
  );
  const stats = r.stats;
  assert.equal(stats.refsResolved, 2);
  assert.equal(stats.refsNacked, 0);
  assert.equal(stats.dataBytes, 9);
  assert.equal(stats.bytesToQemu, expected.length);
  assert.equal(stats.peakHeldBytes, 0);
});

test("a REF that fails verification is NACKed and holds all later DATA until its PAGE_DATA, then in order", () => {
  const { disk, resolve } = fakeDisk(2);
  const r = new RefReassembler({ resolveRef: resolve, windowBytes: 1 << 20 });
  const stale = randomBytes(PAGE_BYTES); // what the guest held when QEMU read it; the disk block changed since
  const fresh = randomBytes(PAGE_BYTES); // guest memory now: what send answers the NACK with
  const first = r.push([
    data("a"),
    { ...ref(1, 1, stale) },
    data("b"),
    ref(2, 0, disk[0] as Buffer),
    data("c"),
  ]);
  assert.equal(text(first).toString(), "a");
  assert.deepEqual(first.toSend, [{ type: MSG.NACK, refId: 1, reason: NACK_REASON.UNVERIFIED }]);
  assert.equal(r.heldBytes, 8 + PAGE_BYTES + 1 + 8 + PAGE_BYTES + 1);
  assert.equal(r.awaitingPages, 1);
  // More DATA and the EOF arrive before the answer: still held.
  const second = r.push([data("d"), { type: MSG.EOF }]);
  assert.deepEqual(second, { toQemu: [], toSend: [], end: false });
  const third = r.push([{ type: MSG.PAGE_DATA, refId: 1, page: fresh }]);
  const expected = Buffer.concat([
    headerOf(1),
    fresh,
    Buffer.from("b"),
    headerOf(2),
    disk[0] as Buffer,
    Buffer.from("cd"),
  ]);
  assert.ok(text(third).equals(expected));
  assert.deepEqual(third.toSend, [{ type: MSG.ACK, refId: 2 }]);
  assert.equal(third.end, true);
  assert.equal(r.heldBytes, 0);
  assert.equal(r.stats.peakHeldBytes, 8 + PAGE_BYTES + 1 + 8 + PAGE_BYTES + 2);
});

test("several outstanding NACKs: sent at once, answers in any order, output released in stream order", () => {
  const { disk, resolve } = fakeDisk(1);
  const r = new RefReassembler({ resolveRef: resolve, windowBytes: 1 << 20 });
  const pages = [randomBytes(PAGE_BYTES), randomBytes(PAGE_BYTES), randomBytes(PAGE_BYTES)];
  const out1 = r.push([
    ref(1, 0, pages[0] as Buffer),
    data("x"),
    ref(2, 7, pages[1] as Buffer), // block 7 is off the disk
    ref(3, 0, disk[0] as Buffer),
    ref(4, 0, pages[2] as Buffer),
    data("y"),
  ]);
  assert.deepEqual(out1.toQemu, []);
  assert.deepEqual(
    out1.toSend.map((m) => (m as Nack).refId),
    [1, 2, 4],
  );
  assert.equal(r.awaitingPages, 3);
  const pageData = (refId: number, page: Buffer): Message => ({ type: MSG.PAGE_DATA, refId, page });
  assert.deepEqual(r.push([pageData(4, pages[2] as Buffer)]).toQemu, [], "ref 1 still blocks");
  assert.deepEqual(r.push([pageData(2, pages[1] as Buffer)]).toQemu, []);
  const out = r.push([pageData(1, pages[0] as Buffer)]);
  const expected = Buffer.concat([
    headerOf(1),
    pages[0] as Buffer,
    Buffer.from("x"),
    headerOf(2),
    pages[1] as Buffer,
    headerOf(3),
    disk[0] as Buffer,
    headerOf(4),
    pages[2] as Buffer,
    Buffer.from("y"),
  ]);
  assert.ok(text(out).equals(expected));
  assert.deepEqual(out.toSend, [{ type: MSG.ACK, refId: 4 }]);
  assert.deepEqual(r.stats.refsNacked, 3);
  assert.deepEqual(r.stats.pagesReceived, 3);
  assert.deepEqual(r.stats.refsResolved, 1);
});

test("a resolver that throws or returns a short block gives NACK READ_FAILED, not a failed link", () => {
  const r = new RefReassembler({
    resolveRef: (block) => {
      if (block === 1) throw new Error("EIO");
      return Buffer.alloc(100);
    },
    windowBytes: 1 << 20,
  });
  const out = r.push([ref(1, 1, Buffer.alloc(PAGE_BYTES)), ref(2, 2, Buffer.alloc(PAGE_BYTES))]);
  assert.deepEqual(out.toSend, [
    { type: MSG.NACK, refId: 1, reason: NACK_REASON.READ_FAILED },
    { type: MSG.NACK, refId: 2, reason: NACK_REASON.READ_FAILED },
  ]);
  assert.equal(r.stats.readFailures, 2);
});

test("protocol breaks are typed errors: unknown or repeated PAGE_DATA, REF ids going back, DATA after EOF, wrong direction", () => {
  const { resolve } = fakeDisk(1);
  const page = randomBytes(PAGE_BYTES);
  const make = () => new RefReassembler({ resolveRef: resolve, windowBytes: 1 << 20 });
  expectLinkError(() => make().push([{ type: MSG.PAGE_DATA, refId: 1, page }]), "unknown-ref");
  {
    const r = make();
    r.push([ref(5, 0, page)]);
    expectLinkError(() => r.push([{ type: MSG.PAGE_DATA, refId: 4, page }]), "unknown-ref");
    r.push([{ type: MSG.PAGE_DATA, refId: 5, page }]);
    expectLinkError(() => r.push([{ type: MSG.PAGE_DATA, refId: 5, page }]), "unknown-ref");
    expectLinkError(() => r.push([ref(5, 0, page)]), "unknown-ref");
  }
  {
    const r = make();
    r.push([ref(1, 0, page), { type: MSG.EOF }]);
    expectLinkError(() => r.push([data("late")]), "unexpected-message");
  }
  {
    const r = make();
    r.push([ref(1, 0, page), { type: MSG.EOF }]);
    const out = r.push([{ type: MSG.PAGE_DATA, refId: 1, page }]); // PAGE_DATA may follow EOF
    assert.equal(out.end, true);
  }
  for (const m of [
    { type: MSG.RETURN, bytes: Buffer.from("x") },
    { type: MSG.ACK, refId: 1 },
    { type: MSG.READY },
  ] as Message[])
    expectLinkError(() => make().push([m]), "unexpected-message");
});

test("held output is bounded: send breaking the window is window-exceeded, before the bytes are kept", () => {
  const r = new RefReassembler({ resolveRef: () => null, windowBytes: 64 * 1024 });
  r.push([ref(1, 0, Buffer.alloc(PAGE_BYTES))]);
  const chunk = Buffer.alloc(256 * 1024);
  let pushed = 0;
  assert.throws(
    () => {
      for (;;) {
        r.push([{ type: MSG.DATA, bytes: chunk }]);
        pushed += chunk.length;
      }
    },
    (error: unknown) => error instanceof LinkError && error.code === "window-exceeded",
  );
  assert.ok(pushed <= 64 * 1024 + WINDOW_SLACK_BYTES);
  assert.ok(r.heldBytes <= 64 * 1024 + WINDOW_SLACK_BYTES);
});

test("RefLedger: refIds from 1, window counted from the oldest unACKed REF, NACK lookups, ACK forgets", () => {
  const ledger = new RefLedger<{ gpa: number }>(3 * PAGE_BYTES);
  ledger.data(100);
  assert.equal(ledger.usedBytes, 0, "no REF outstanding: DATA does not count");
  assert.equal(ledger.ref({ gpa: 0x1000 }, 8), 1);
  ledger.data(50);
  assert.equal(ledger.ref({ gpa: 0x2000 }, 14), 2);
  assert.equal(ledger.usedBytes, 8 + PAGE_BYTES + 50 + 14 + PAGE_BYTES);
  assert.equal(ledger.full, false);
  assert.equal(ledger.ref({ gpa: 0x3000 }, 8), 3);
  assert.equal(ledger.full, true);
  assert.deepEqual(ledger.nacked(2), { gpa: 0x2000 });
  ledger.ack(1);
  assert.equal(ledger.usedBytes, 14 + PAGE_BYTES + 8 + PAGE_BYTES);
  assert.equal(ledger.outstanding, 2);
  expectLinkError(() => ledger.nacked(1), "unknown-ref");
  expectLinkError(() => ledger.nacked(4), "unknown-ref");
  expectLinkError(() => ledger.ack(4), "unknown-ref");
  ledger.ack(3);
  assert.equal(ledger.usedBytes, 0);
  assert.equal(ledger.outstanding, 0);
  ledger.ack(3); // repeated ACK is harmless
});

test("send and receive together through the decoder, at random chunkings, with a guest rewriting blocks", () => {
  for (let round = 0; round < 30; round++) {
    const { disk, resolve } = fakeDisk(16);
    // The source QEMU stream: DATA and PAGE records; some pages are cache pages of disk blocks.
    const qemu: Buffer[] = [];
    const sendFrames: Buffer[] = [];
    const ledger = new RefLedger<Buffer>(1 << 20);
    for (let i = 0; i < 40; i++) {
      if (Math.random() < 0.5) {
        const bytes = randomBytes(1 + Math.floor(Math.random() * 300));
        qemu.push(bytes);
        ledger.data(bytes.length);
        sendFrames.push(encodeMessage({ type: MSG.DATA, bytes }));
        continue;
      }
      const blockNumber = Math.floor(Math.random() * 16);
      const page = Buffer.from(disk[blockNumber] as Buffer);
      const pageHeader = headerOf(i);
      const refId = ledger.ref(page, pageHeader.length);
      // Now and then the guest rewrites the block (disk and page differ): REFs of it fail and are NACKed.
      if (Math.random() < 0.33) {
        (disk[blockNumber] as Buffer).fill(round);
        page.fill(round ^ 0xff);
      }
      qemu.push(pageHeader, page);
      sendFrames.push(encodeMessage({ type: MSG.REF, refId, blockNumber, hash: sha256(page), pageHeader }));
    }
    sendFrames.push(encodeMessage({ type: MSG.EOF }));
    // send's ledger keeps each REF's page (standing in for guest memory) to answer NACKs with.
    const wire = Buffer.concat(sendFrames);
    const decoder = new LinkDecoder();
    const r = new RefReassembler({ resolveRef: resolve, windowBytes: 1 << 20 });
    const out: Buffer[] = [];
    let ended = false;
    const answer = (toSend: Array<Nack | Ack>): Message[] =>
      toSend.flatMap((m): Message[] => {
        if (m.type === MSG.ACK) {
          ledger.ack(m.refId);
          return [];
        }
        return [{ type: MSG.PAGE_DATA, refId: m.refId, page: ledger.nacked(m.refId) }];
      });
    let o = 0;
    while (o < wire.length) {
      const n = 1 + Math.floor(Math.random() * 700);
      const result = r.push(decoder.push(wire.subarray(o, o + n)));
      o += n;
      out.push(...result.toQemu);
      ended ||= result.end;
      // PAGE_DATA goes back through the encoder and decoder as well.
      const replies = answer(result.toSend).map(encodeMessage);
      if (replies.length > 0) {
        const again = r.push(new LinkDecoder().push(Buffer.concat(replies)));
        out.push(...again.toQemu);
        ended ||= again.end;
        answer(again.toSend);
      }
    }
    decoder.end();
    assert.equal(ended, true, `round ${round}`);
    assert.ok(Buffer.concat(out).equals(Buffer.concat(qemu)), `round ${round}: stream rebuilt exactly`);
    assert.equal(ledger.outstanding, 0, "every REF ACKed");
  }
});
