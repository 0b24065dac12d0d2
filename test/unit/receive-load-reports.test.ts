/**
 * receive's load reports (link/protocol.ts "Load reports"), from a real `startReceive` in front of a stand-in
 * destination, to a send that speaks the link by hand: LOADs come every LOAD_REPORT_INTERVAL_MS while the stream
 * flows, only to a send that listed the capability, and stop at send's EOF.
 */
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { once } from "node:events";
import { connect, type Socket } from "node:net";
import { type TestContext, test } from "node:test";
import { LinkDecoder } from "../../src/link/decoder.ts";
import { clientHandshake } from "../../src/link/handshake.ts";
import {
  CAPABILITY,
  encodeMessage,
  LOAD_REPORT_INTERVAL_MS,
  type Load,
  MAX_BUSY_PERMILLE,
  MSG,
} from "../../src/link/protocol.ts";
import { startReceive } from "../../src/migrate/link-receive.ts";
import { fakeDestination, fakeStream } from "../support/fake-peers.ts";

const psk = randomBytes(32);
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** A link to a fresh receive, handshaken with `capabilities`; every LOAD it gets, with when it came. */
async function linkToReceive(
  t: TestContext,
  capabilities: string[],
): Promise<{ link: Socket; loads: { load: Load; atMs: number }[] }> {
  const destination = await fakeDestination(t);
  const receive = await startReceive({
    listen: { host: "127.0.0.1", port: 0 },
    to: destination.endpoint,
    psk,
    security: { mode: "plaintext" },
  });
  t.after(() => receive.relay.close());
  const link = connect({ ...receive.address, allowHalfOpen: true });
  link.on("error", () => {});
  t.after(() => link.destroy());
  await once(link, "connect");
  await clientHandshake(link, { psk, capabilities });
  const loads: { load: Load; atMs: number }[] = [];
  const decoder = new LinkDecoder();
  link.on("data", (chunk: Buffer) => {
    for (const m of decoder.push(chunk))
      if (m.type === MSG.LOAD) loads.push({ load: m, atMs: performance.now() });
  });
  link.resume();
  return { link, loads };
}

/** The stream for `ms`: a DATA frame of 64 KiB every 20 ms. */
async function streamFor(link: Socket, ms: number): Promise<void> {
  const bytes = fakeStream(64 * 1024);
  for (const end = performance.now() + ms; performance.now() < end; await sleep(20))
    link.write(encodeMessage({ type: MSG.DATA, bytes }));
}

test("a send that takes load reports gets a LOAD every interval while the stream flows, none after its EOF", async (t) => {
  const { link, loads } = await linkToReceive(t, [CAPABILITY.REF_SHA256, CAPABILITY.LOAD_REPORT]);
  await streamFor(link, 10 * LOAD_REPORT_INTERVAL_MS);
  const during = loads.length;
  t.diagnostic(
    `${during} LOADs in ${10 * LOAD_REPORT_INTERVAL_MS} ms: ${JSON.stringify(loads.map((l) => l.load.busyPermille))}`,
  );
  assert.ok(during >= 3, `LOADs came while the stream flowed (${during})`);
  for (const { load } of loads) {
    assert.ok(load.busyPermille >= 0 && load.busyPermille <= MAX_BUSY_PERMILLE);
    assert.ok(Number.isInteger(load.destinationQueuedBytes) && load.destinationQueuedBytes >= 0);
  }
  link.write(encodeMessage({ type: MSG.EOF }));
  await sleep(5 * LOAD_REPORT_INTERVAL_MS);
  assert.ok(loads.length <= during + 1, `no LOAD long after send's EOF (${loads.length - during} more)`);
});

test("a send that did not list load-report gets no LOAD (an older send would take it for a protocol error)", async (t) => {
  const { link, loads } = await linkToReceive(t, [CAPABILITY.REF_SHA256]);
  await streamFor(link, 5 * LOAD_REPORT_INTERVAL_MS);
  assert.equal(loads.length, 0);
});
