/**
 * The end of a link whose destination QEMU closes uncleanly after its own end (issue 11, leg 3: a QEMU 7.2
 * destination ends a multifd channel, send still relays that channel's last bytes, and QEMU then closes the socket
 * with them unread, which is a reset). receive has passed the destination's end on to send as EOF (link
 * "Stream rules" 6) before the reset: the reset must not destroy the link with that EOF still queued, or send
 * reports "receive closed the link before its EOF" and fails a migration that QEMU completed.
 *
 * Real `startReceive`, a stand-in destination, and a send that speaks the link by hand over loopback TCP. The
 * send stops reading the link for a while, so receive's link holds the destination's return bytes and the EOF
 * behind them when the destination resets (the state a busy send, or TLS's own buffering, leaves it in).
 */
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { once } from "node:events";
import { connect, createServer, type Socket } from "node:net";
import { type TestContext, test } from "node:test";
import { LinkDecoder } from "../../src/link/decoder.ts";
import { clientHandshake } from "../../src/link/handshake.ts";
import { encodeMessage, MSG } from "../../src/link/protocol.ts";
import { startReceive } from "../../src/migrate/link-receive.ts";

const psk = randomBytes(32);
const MiB = 1024 * 1024;
/**
 * Return-path bytes the destination sends: more than the kernel buffers of a link nobody reads hold (so the EOF
 * waits behind some in receive), less than receive's bound on what it holds for the link (relay.ts
 * DEFAULT_MAX_BUFFERED_BYTES, 8 MiB), so receive reads them all and then the destination's end.
 */
const RETURN_BYTES = 7 * MiB;
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));
/** How long after its end the destination resets (see endThenResetDestination). */
const RESET_AFTER_MS = 1000;

/**
 * A destination that sends RETURN_BYTES back and, once they are out and it has read 1 MiB of the stream, ends its
 * side (FIN) and stops reading; once more bytes for it have arrived unread, it resets the connection.
 */
async function endThenResetDestination(t: TestContext): Promise<{ port: number; reset: Promise<void> }> {
  let resetDone!: () => void;
  const reset = new Promise<void>((resolve) => {
    resetDone = resolve;
  });
  const server = createServer({ allowHalfOpen: true }, (socket) => {
    socket.on("error", () => {});
    t.after(() => socket.destroy());
    let got = 0;
    let returned = false;
    const onData = (chunk: Buffer) => {
      got += chunk.length;
      if (got < MiB || !returned) return;
      socket.off("data", onData);
      socket.pause();
      socket.end();
      // The link goes on sending; what arrives now stays unread, and a reset then is how QEMU's close looks.
      // Not before receive has read the return bytes and the end: a reset discards what it has not read. 300 ms
      // was once too short in the full suite, beside guests booting (send got 64 KiB of the return path and no
      // EOF), so a whole second.
      void sleep(RESET_AFTER_MS).then(() => {
        socket.resetAndDestroy();
        resetDone();
      });
    };
    socket.on("data", onData);
    socket.write(randomBytes(RETURN_BYTES), () => {
      returned = true;
    });
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  t.after(() => server.close());
  const address = server.address();
  assert.ok(address && typeof address === "object");
  return { port: address.port, reset };
}

test("a destination that resets after its end: receive's EOF still reaches send, and the link ends cleanly", async (t) => {
  const destination = await endThenResetDestination(t);
  const receive = await startReceive({
    listen: { host: "127.0.0.1", port: 0 },
    to: { host: "127.0.0.1", port: destination.port },
    psk,
    security: { mode: "plaintext" },
    ...(process.env.DEBUG_RELAY ? { log: (line: string) => console.error(line) } : {}),
  });
  t.after(() => receive.relay.close());
  const link: Socket = connect({ ...receive.address, allowHalfOpen: true });
  let linkError: string | undefined;
  link.on("error", (error) => {
    linkError = error.message;
  });
  t.after(() => link.destroy());
  await once(link, "connect");
  await clientHandshake(link, { psk, capabilities: [] });
  link.pause();

  // The stream, 64 KiB every 5 ms, until the destination has reset (bounded: at most 4 s).
  const data = encodeMessage({ type: MSG.DATA, bytes: randomBytes(64 * 1024) });
  let reset = false;
  void destination.reset.then(() => {
    reset = true;
  });
  for (
    const end = performance.now() + 3000 + RESET_AFTER_MS;
    !reset && performance.now() < end;
    await sleep(5)
  )
    if (!link.destroyed) link.write(data);
  assert.ok(reset, "the destination reset its connection");
  await sleep(200);

  // Now send reads what receive sent: the return path, then EOF, then the link's end.
  const decoder = new LinkDecoder();
  let returned = 0;
  let eof = false;
  link.on("data", (chunk: Buffer) => {
    for (const m of decoder.push(chunk)) {
      if (m.type === MSG.RETURN) returned += m.bytes.length;
      else if (m.type === MSG.EOF) eof = true;
    }
  });
  const ended = once(link, "end").then(() => "end");
  const closed = once(link, "close").then(() => "close");
  link.resume();
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<string>((resolve) => {
    timer = setTimeout(() => resolve("timeout"), 8_000);
  });
  const how = await Promise.race([ended, closed, timeout]);
  clearTimeout(timer);
  t.diagnostic(`${returned} return bytes, EOF ${eof}, link ${how}${linkError ? ` (${linkError})` : ""}`);
  assert.equal(returned, RETURN_BYTES, "every return-path byte reached send");
  assert.ok(eof, "receive's EOF reached send");
  assert.equal(how, "end", `the link ended cleanly${linkError ? `, not with ${linkError}` : ""}`);
});
