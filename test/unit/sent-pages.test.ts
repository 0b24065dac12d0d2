/**
 * The lab's sent-pages tap (src/lab/sent-pages.ts), which lets the RAM-compare oracle on QEMU 7.2 tell QEMU's own
 * lost pages from vmprune's: it must pass every byte on unchanged both ways, and know, per page, exactly what
 * QEMU last sent (a later record replaces an earlier one; a page QEMU never sent, or sent as XBZRLE, exonerates
 * nothing).
 */
import assert from "node:assert/strict";
import { once } from "node:events";
import { connect, createServer, type Socket } from "node:net";
import { test } from "node:test";
import { SentPagesTap } from "../../src/lab/sent-pages.ts";
import type { PageHeader, StreamRecord } from "../../src/stream/records.ts";
import { encodeRecord } from "../../src/stream/writer.ts";
import { ramStreamOpening } from "../support/stream-records.ts";

const BLOCK = "ram0";
const header = (page: number, flags: number): PageHeader => ({
  addr: page * 4096,
  flags,
  idstr: BLOCK,
  block: BLOCK,
});

function stream(): Buffer {
  const records: StreamRecord[] = ramStreamOpening([{ idstr: BLOCK, length: 8 * 4096 }]);
  records.push(
    { kind: "ram", type: "page", offset: 0, header: header(0, 0x08), data: Buffer.alloc(4096, 1) },
    { kind: "ram", type: "zero", offset: 0, header: header(1, 0x02), fill: 0 },
    { kind: "ram", type: "page", offset: 0, header: header(2, 0x08), data: Buffer.alloc(4096, 2) },
    { kind: "ram", type: "page", offset: 0, header: header(0, 0x08), data: Buffer.alloc(4096, 3) },
    {
      kind: "ram",
      type: "xbzrle",
      offset: 0,
      header: header(2, 0x40),
      encoding: 1,
      data: Buffer.from([3, 1, 2, 3]),
    },
    { kind: "ram", type: "eos", offset: 0, value: 0x10 },
    { kind: "footer", offset: 0, sectionId: 2 },
    { kind: "section", offset: 0, type: "END", sectionId: 2, idstr: null, instanceId: null, versionId: null },
    { kind: "ram", type: "eos", offset: 0, value: 0x10 },
    { kind: "footer", offset: 0, sectionId: 2 },
    { kind: "eof", offset: 0 },
  );
  return Buffer.concat(records.flatMap((r) => encodeRecord(r)));
}

test("the tap passes a main channel on byte for byte, answers come back, and it knows what was last sent per page", async (t) => {
  const bytes = stream();
  const received: Buffer[] = [];
  const sink = createServer((socket: Socket) => {
    socket.on("data", (chunk: Buffer) => received.push(chunk));
    socket.write("return path");
    socket.on("end", () => socket.end());
  });
  sink.listen(0, "127.0.0.1");
  await once(sink, "listening");
  t.after(() => sink.close());
  const address = sink.address();
  assert.ok(address && typeof address === "object");
  const tap = await SentPagesTap.start(`tcp:127.0.0.1:${address.port}`);
  t.after(() => tap.stop());

  const port = Number(tap.uri.split(":")[2]);
  const source = connect(port, "127.0.0.1");
  const answers: Buffer[] = [];
  source.on("data", (chunk: Buffer) => answers.push(chunk));
  // In small pieces, records straddling them, as a socket delivers them.
  for (let at = 0; at < bytes.length; at += 1000) source.write(bytes.subarray(at, at + 1000));
  source.end();
  await once(source, "close");

  assert.ok(Buffer.concat(received).equals(bytes), "the destination side got the stream unchanged");
  assert.equal(Buffer.concat(answers).toString(), "return path");
  const pages = tap.pages;
  assert.equal(pages.complete, true, String(pages.incompleteBecause));
  assert.equal(pages.deliveredAsSent(BLOCK, 0, Buffer.alloc(4096, 3)), true, "page 0: its last record");
  assert.equal(pages.deliveredAsSent(BLOCK, 0, Buffer.alloc(4096, 1)), false, "page 0: an earlier record");
  assert.equal(pages.deliveredAsSent(BLOCK, 0, Buffer.alloc(4096, 0)), false, "page 0 dropped to zeros");
  assert.equal(pages.deliveredAsSent(BLOCK, 4096, Buffer.alloc(4096, 0)), true, "page 1: a ZERO record");
  assert.equal(pages.lastSent(BLOCK, 2 * 4096).kind, "other", "page 2: last sent as XBZRLE");
  assert.equal(pages.deliveredAsSent(BLOCK, 2 * 4096, Buffer.alloc(4096, 2)), false);
  assert.equal(pages.lastSent(BLOCK, 3 * 4096).kind, "none", "page 3: never sent");
  assert.equal(pages.deliveredAsSent(BLOCK, 3 * 4096, Buffer.alloc(4096, 0)), false);
});

test("a record cut short, or a second (multifd) channel, leaves the record incomplete", async (t) => {
  const sink = createServer((socket: Socket) => socket.resume());
  sink.listen(0, "127.0.0.1");
  await once(sink, "listening");
  t.after(() => sink.close());
  const address = sink.address();
  assert.ok(address && typeof address === "object");
  const bytes = stream();

  const cut = await SentPagesTap.start(`tcp:127.0.0.1:${address.port}`);
  t.after(() => cut.stop());
  const a = connect(Number(cut.uri.split(":")[2]), "127.0.0.1");
  a.end(bytes.subarray(0, bytes.length - 30));
  await once(a, "close");
  assert.equal(cut.pages.complete, false);
  assert.match(String(cut.pages.incompleteBecause), /truncated/);

  const two = await SentPagesTap.start(`tcp:127.0.0.1:${address.port}`);
  t.after(() => two.stop());
  const port = Number(two.uri.split(":")[2]);
  // The multifd channel connects while the main one is open, as QEMU opens them.
  const main = connect(port, "127.0.0.1");
  main.write(bytes);
  const multifd = connect(port, "127.0.0.1");
  multifd.end(Buffer.from([0x11, 0x22, 0x33, 0x44, 0, 0, 0, 1]));
  await once(multifd, "close");
  main.end();
  await once(main, "close");
  assert.equal(two.pages.complete, false);
  assert.match(String(two.pages.incompleteBecause), /multifd/);
});
