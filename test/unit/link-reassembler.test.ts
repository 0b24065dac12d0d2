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

/**
 * Asynchronous resolution: a disk read through NBD answers later, out of order. A collector gathers what push()
 * returns and what the reassembler emits later, in the order the relay would write it.
 */
function collector() {
  const toQemu: Buffer[] = [];
  const toSend: Array<Nack | Ack> = [];
  let end = false;
  let emits = 0;
  const take = (out: ReassemblerOutput) => {
    toQemu.push(...out.toQemu);
    toSend.push(...out.toSend);
    end ||= out.end;
  };
  return {
    toQemu,
    toSend,
    get end() {
      return end;
    },
    get emits() {
      return emits;
    },
    take,
    emit: (out: ReassemblerOutput) => {
      emits++;
      take(out);
    },
  };
}

/** Waits (real timers) until `done()` holds; the test's own timeout bounds it. */
async function until(done: () => boolean): Promise<void> {
  while (!done()) await new Promise((resolve) => setTimeout(resolve, 2));
}

/** The fake disk's resolver, answering after a random delay of up to `maxDelayMs` (so out of order). */
function slowDisk(blocks: number, maxDelayMs: number) {
  const { disk, resolve } = fakeDisk(blocks);
  let inFlight = 0;
  let peak = 0;
  const slow: RefResolver = (blockNumber, hash) => {
    const answer = resolve(blockNumber, Buffer.from(hash));
    inFlight++;
    peak = Math.max(peak, inFlight);
    return new Promise((done) =>
      setTimeout(() => {
        inFlight--;
        done(answer);
      }, Math.random() * maxDelayMs),
    );
  };
  return {
    disk,
    slow,
    get peak() {
      return peak;
    },
  };
}

test("async resolution: reads answering slowly and out of order come out in link order, one NACK per mismatch", async () => {
  const { disk, slow } = slowDisk(8, 20);
  const c = collector();
  const r = new RefReassembler({ resolveRef: slow, windowBytes: 1 << 20, emit: c.emit });
  const messages: Message[] = [data("QEVM")];
  const expected: Buffer[] = [Buffer.from("QEVM")];
  const stale = new Map<number, Buffer>(); // refId -> what guest memory holds (the disk block differs)
  for (let refId = 1; refId <= 200; refId++) {
    const block = refId % 8;
    let page = disk[block] as Buffer;
    if (refId % 17 === 0) {
      page = randomBytes(PAGE_BYTES);
      stale.set(refId, page);
    }
    messages.push(ref(refId, block, page), data(`<${refId}>`));
    expected.push(headerOf(refId), page, Buffer.from(`<${refId}>`));
  }
  messages.push({ type: MSG.EOF });
  // Pushed in batches, as socket reads would deliver them.
  for (let i = 0; i < messages.length; i += 37) c.take(r.push(messages.slice(i, i + 37)));
  assert.ok(r.pendingReads > 100, "many reads in flight at once");
  assert.equal(c.end, false, "EOF waits for the reads before it");
  // Answer each NACK with PAGE_DATA as send would, as the NACKs come.
  let answered = 0;
  while (!c.end) {
    await until(() => c.end || c.toSend.filter((m) => m.type === MSG.NACK).length > answered);
    const nacks = c.toSend.filter((m): m is Nack => m.type === MSG.NACK).slice(answered);
    answered += nacks.length;
    for (const nack of nacks) {
      assert.equal(nack.reason, NACK_REASON.UNVERIFIED);
      c.take(r.push([{ type: MSG.PAGE_DATA, refId: nack.refId, page: stale.get(nack.refId) as Buffer }]));
    }
  }
  assert.ok(
    Buffer.concat(c.toQemu).equals(Buffer.concat(expected)),
    "the QEMU stream, byte for byte, in order",
  );
  assert.deepEqual(
    c.toSend
      .filter((m) => m.type === MSG.NACK)
      .map((m) => m.refId)
      .sort((a, b) => a - b),
    [...stale.keys()],
  );
  const acks = c.toSend.filter((m) => m.type === MSG.ACK).map((m) => m.refId);
  assert.deepEqual(
    acks,
    [...acks].sort((a, b) => a - b),
    "ACKs only grow",
  );
  assert.equal(acks.at(-1), 200);
  assert.ok(c.emits > 0);
  const stats = r.stats;
  assert.equal(stats.refsResolved, 200 - stale.size);
  assert.equal(stats.refsNacked, stale.size);
  assert.ok(stats.peakPendingReads > 100);
  assert.equal(r.pendingReads, 0);
  assert.equal(r.ended, true);
});

test("async resolution: pending reads count against the window like held bytes", () => {
  const never: RefResolver = () => new Promise<Buffer | null>(() => {});
  const r = new RefReassembler({ resolveRef: never, windowBytes: 64 * 1024, emit: () => {} });
  let pushed = 0;
  assert.throws(
    () => {
      for (let refId = 1; ; refId++) {
        r.push([ref(refId, 0, Buffer.alloc(PAGE_BYTES)), data("x".repeat(1000))]);
        pushed += 8 + PAGE_BYTES + 1000;
      }
    },
    (error: unknown) => error instanceof LinkError && error.code === "window-exceeded",
  );
  assert.ok(pushed <= 64 * 1024 + WINDOW_SLACK_BYTES);
  assert.ok(r.heldBytes <= 64 * 1024 + WINDOW_SLACK_BYTES);
  r.close();
});

test("async resolution: a read that never answers is NACKed (READ_FAILED) at the timeout; its late answer is ignored", async () => {
  const { disk, resolve } = fakeDisk(2);
  let release: (page: Buffer | null) => void = () => {};
  const hung: RefResolver = (block, hash) =>
    block === 1
      ? new Promise<Buffer | null>((done) => {
          release = done;
        })
      : Promise.resolve(resolve(block, hash));
  const c = collector();
  const r = new RefReassembler({
    resolveRef: hung,
    windowBytes: 1 << 20,
    emit: c.emit,
    resolveTimeoutMs: 30,
  });
  c.take(r.push([ref(1, 1, disk[1] as Buffer), data("a"), ref(2, 0, disk[0] as Buffer), { type: MSG.EOF }]));
  assert.deepEqual(c.toQemu, []);
  await until(() => c.toSend.length > 0);
  assert.deepEqual(c.toSend, [{ type: MSG.NACK, refId: 1, reason: NACK_REASON.READ_FAILED }]);
  assert.equal(r.stats.readTimeouts, 1);
  release(Buffer.from(disk[1] as Buffer)); // too late: ignored, PAGE_DATA decides
  await new Promise((resolve) => setTimeout(resolve, 5));
  assert.deepEqual(c.toQemu, []);
  const fresh = randomBytes(PAGE_BYTES);
  c.take(r.push([{ type: MSG.PAGE_DATA, refId: 1, page: fresh }]));
  assert.ok(
    Buffer.concat(c.toQemu).equals(
      Buffer.concat([headerOf(1), fresh, Buffer.from("a"), headerOf(2), disk[0] as Buffer]),
    ),
  );
  assert.equal(c.end, true);
  assert.deepEqual(c.toSend.at(-1), { type: MSG.ACK, refId: 2 });
  assert.equal(r.stats.refsResolved, 1);
  assert.equal(r.stats.readFailures, 1);
});

test("async resolution: a rejected read is READ_FAILED; the end of send's side waits for reads, or fails the link", async () => {
  const { disk } = fakeDisk(1);
  const later: Array<() => void> = [];
  const resolver: RefResolver = (block) =>
    new Promise<Buffer | null>((done, fail) => {
      later.push(() => (block === 0 ? done(Buffer.from(disk[0] as Buffer)) : fail(new Error("EIO"))));
    });
  {
    // send ends its side after EOF while a read is in flight: the stream still ends, through emit.
    const c = collector();
    const r = new RefReassembler({ resolveRef: resolver, windowBytes: 1 << 20, emit: c.emit });
    c.take(r.push([ref(1, 0, disk[0] as Buffer), { type: MSG.EOF }]));
    assert.equal(r.eofSeen, true);
    r.inputEnded();
    later.shift()?.();
    await until(() => c.end);
    assert.equal(r.ended, true);
  }
  {
    // The read then fails: no PAGE_DATA can come any more, so the link fails instead of waiting forever.
    const c = collector();
    const failures: LinkError[] = [];
    const r = new RefReassembler({
      resolveRef: resolver,
      windowBytes: 1 << 20,
      emit: c.emit,
      fail: (error) => failures.push(error),
    });
    c.take(r.push([ref(1, 5, disk[0] as Buffer), { type: MSG.EOF }]));
    r.inputEnded();
    later.shift()?.();
    await until(() => failures.length > 0);
    assert.equal(r.stats.readFailures, 1);
    assert.equal(failures[0]?.code, "closed");
    assert.match(failures[0]?.message ?? "", /NACKed after send closed the link/);
  }
  {
    // Ending before EOF, or with a NACK unanswered, is a link failure at once.
    const r = new RefReassembler({ resolveRef: () => null, windowBytes: 1 << 20 });
    expectLinkError(() => r.inputEnded(), "closed");
    const s = new RefReassembler({ resolveRef: () => null, windowBytes: 1 << 20 });
    s.push([ref(1, 0, disk[0] as Buffer), { type: MSG.EOF }]);
    expectLinkError(() => s.inputEnded(), "closed");
  }
  {
    // close() abandons reads in flight: their answers emit nothing.
    const c = collector();
    const r = new RefReassembler({ resolveRef: resolver, windowBytes: 1 << 20, emit: c.emit });
    r.push([ref(1, 0, disk[0] as Buffer)]);
    r.close();
    later.shift()?.();
    await new Promise((resolve) => setTimeout(resolve, 5));
    assert.equal(c.emits, 0);
    assert.equal(r.pendingReads, 0);
  }
});

test("async resolution without an emit is a programming error, not a silent stall", () => {
  const r = new RefReassembler({ resolveRef: () => Promise.resolve(null), windowBytes: 1 << 20 });
  assert.throws(() => r.push([ref(1, 0, Buffer.alloc(PAGE_BYTES))]), /no emit/);
});

test("async resolution: reads settling in the same turn are released together, with one ACK", async () => {
  const { disk, resolve } = fakeDisk(4);
  const c = collector();
  const r = new RefReassembler({
    resolveRef: (block, hash) => Promise.resolve(resolve(block, hash)),
    windowBytes: 1 << 20,
    emit: c.emit,
  });
  const messages: Message[] = [];
  for (let refId = 1; refId <= 50; refId++) messages.push(ref(refId, refId % 4, disk[refId % 4] as Buffer));
  c.take(r.push(messages));
  assert.deepEqual(c.toQemu, [], "nothing before the reads settle");
  await until(() => c.emits > 0);
  assert.equal(c.emits, 1);
  assert.deepEqual(c.toSend, [{ type: MSG.ACK, refId: 50 }]);
  assert.equal(Buffer.concat(c.toQemu).length, 50 * (8 + PAGE_BYTES));
});

test("REF_FS: resolved through resolveRefFs in link order beside REF; without it, a REF_FS fails the link", () => {
  const { disk, resolve } = fakeDisk(4);
  const fsPage = randomBytes(PAGE_BYTES);
  const uuid = Buffer.alloc(16, 0xab);
  const seen: { filesystem: string; blockNumber: number }[] = [];
  const r = new RefReassembler({
    resolveRef: resolve,
    resolveRefFs: (m) => {
      seen.push({ filesystem: m.filesystem.toString("hex"), blockNumber: m.blockNumber });
      return m.filesystem.equals(uuid) && sha256(fsPage).equals(m.hash) ? Buffer.from(fsPage) : null;
    },
    windowBytes: 1 << 20,
  });
  const page0 = disk[0] as Buffer;
  const refFs = (refId: number, hash: Buffer): Message => ({
    type: MSG.REF_FS,
    refId,
    filesystem: uuid,
    blockNumber: 16,
    hash,
    pageHeader: headerOf(refId),
  });
  const out = r.push([
    data("a"),
    ref(1, 0, page0),
    refFs(2, sha256(fsPage)),
    data("b"),
    refFs(3, sha256(page0)),
  ]);
  assert.deepEqual(seen, [
    { filesystem: uuid.toString("hex"), blockNumber: 16 },
    { filesystem: uuid.toString("hex"), blockNumber: 16 },
  ]);
  assert.ok(
    text(out).equals(
      Buffer.concat([Buffer.from("a"), headerOf(1), page0, headerOf(2), fsPage, Buffer.from("b")]),
    ),
  );
  assert.deepEqual(out.toSend, [
    { type: MSG.NACK, refId: 3, reason: NACK_REASON.UNVERIFIED },
    { type: MSG.ACK, refId: 2 },
  ]);
  const without = new RefReassembler({ resolveRef: resolve, windowBytes: 1 << 20 });
  expectLinkError(() => without.push([refFs(1, sha256(fsPage))]), "unexpected-message");
});

test("ZEROS: pages of zeros written in place; behind a NACKed REF they wait in order like DATA", () => {
  const { disk, resolve } = fakeDisk(2);
  const b1 = disk[1] as Buffer;
  const r = new RefReassembler({ resolveRef: resolve, windowBytes: 1 << 20 });
  const first = r.push([data("pkt"), { type: MSG.ZEROS, pages: 2 }, data("+")]);
  assert.ok(
    text(first).equals(Buffer.concat([Buffer.from("pkt"), Buffer.alloc(2 * PAGE_BYTES), Buffer.from("+")])),
  );
  // A REF that does not verify (another block's hash): NACKed; the ZEROS after it wait for its PAGE_DATA.
  const bad: Ref = { ...ref(1, 0, b1) };
  const held = r.push([bad, { type: MSG.ZEROS, pages: 1 }, data("end")]);
  assert.equal(held.toQemu.length, 0, "nothing passes an unsettled REF");
  assert.deepEqual(held.toSend, [{ type: MSG.NACK, refId: 1, reason: NACK_REASON.UNVERIFIED }]);
  const page = randomBytes(PAGE_BYTES);
  const released = r.push([{ type: MSG.PAGE_DATA, refId: 1, page }]);
  assert.ok(
    text(released).equals(Buffer.concat([headerOf(1), page, Buffer.alloc(PAGE_BYTES), Buffer.from("end")])),
    "the page, then the zeros, then the rest, in link order",
  );
});
