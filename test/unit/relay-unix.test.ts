/**
 * The relay (src/stream/relay.ts) and send/receive (src/migrate/) on unix sockets on both sides, with a fake
 * destination server standing in for the destination QEMU's `-incoming unix:`; and receive going on serving after
 * it refused a peer (relay rule 9).
 */
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { once } from "node:events";
import { existsSync } from "node:fs";
import { connect } from "node:net";
import { join } from "node:path";
import { test } from "node:test";
import { startReceive } from "../../src/migrate/link-receive.ts";
import { startSend } from "../../src/migrate/send.ts";
import { MULTIFD_MAGIC, Relay } from "../../src/stream/relay.ts";
import { fakeDestination, fakeStream, MiB, signal, sourceSends, tempDir } from "../support/fake-peers.ts";

const timeout = 30_000;

test("relay: unix socket in, unix socket out: bytes intact both ways, half-closes, channel order, file removed", {
  timeout,
}, async (t) => {
  const dir = tempDir(t);
  const listenPath = join(dir, "src.sock");
  const destination = await fakeDestination(t, join(dir, "dst.sock"));
  const relay = await Relay.start({ listen: { path: listenPath }, to: { path: join(dir, "dst.sock") } });
  t.after(() => relay.close());
  assert.deepEqual(relay.endpoint, { path: listenPath });
  assert.throws(() => relay.address, /listens on unix socket .*src\.sock, which has no TCP address/);

  const main = fakeStream(8 * MiB);
  const multifd = Buffer.concat([Buffer.alloc(4), randomBytes(2 * MiB)]);
  multifd.writeUInt32BE(MULTIFD_MAGIC, 0);
  // The main channel stays open until the multifd one connected, as QEMU's does: a relay whose only channel
  // closed is done and stops listening.
  const multifdConnected = signal();
  const mainSent = sourceSends(listenPath, main, { endAfter: multifdConnected.promise });
  // The second connection is accepted after the first: the relay keeps that order upstream (rule 1).
  await new Promise((resolve) => setTimeout(resolve, 50));
  const multifdSent = sourceSends(listenPath, multifd, { connected: multifdConnected.fire });

  assert.deepEqual(await mainSent, { replies: Buffer.from("PONG") }, "the return path reached the source");
  assert.deepEqual(await multifdSent, { replies: Buffer.from("PONG") });
  const [toMain, toMultifd] = destination.received;
  assert.ok(toMain && toMultifd);
  assert.ok((await toMain).equals(main), "main channel intact");
  assert.ok((await toMultifd).equals(multifd), "multifd channel intact, in accept order");

  const report = await relay.done;
  assert.equal(report.error, undefined);
  assert.deepEqual(
    report.channels.map((c) => [c.kind, c.bytesToDestination, c.bytesToSource, c.closedBy]),
    [
      ["main", main.length, 4, "source"],
      ["multifd", multifd.length, 4, "source"],
    ],
  );
  assert.equal(existsSync(listenPath), false, "the listening socket file is removed when the relay is done");
});

test("receive refuses a peer sending plain QEMU bytes, then serves the real send (unix sockets throughout)", {
  timeout,
}, async (t) => {
  const dir = tempDir(t);
  const psk = randomBytes(32);
  const destination = await fakeDestination(t, join(dir, "qemu.sock"));
  const receivePath = join(dir, "receive.sock");
  const receive = await startReceive({
    listen: { path: receivePath },
    to: { path: join(dir, "qemu.sock") },
    psk,
  });
  t.after(() => receive.relay.close());

  // A source QEMU pointed at receive by mistake: refused before receive connects to the destination.
  const garbage = connect({ path: receivePath });
  garbage.on("error", () => {});
  await once(garbage, "connect");
  garbage.write(fakeStream(64 * 1024));
  await once(garbage, "close");
  // A send with the wrong key: refused as well.
  const wrongKey = await startSend({
    listen: { path: join(dir, "wrong.sock") },
    to: { path: receivePath },
    link: { psk: randomBytes(32) },
  });
  t.after(() => wrongKey.relay.close());
  const cut = await sourceSends(join(dir, "wrong.sock"), fakeStream(MiB));
  assert.equal(cut.replies.length, 0, "nothing came back to a source whose link was refused");
  const wrongReport = await wrongKey.done;
  // The link is TLS-PSK by default: another key already fails the TLS handshake.
  assert.match(wrongReport.relay.error ?? "", /TLS handshake failed.*different link keys/);
  assert.equal(destination.sockets.length, 0, "no refused peer reached the destination");
  assert.ok(existsSync(receivePath), "receive still listens");

  const sendPath = join(dir, "send.sock");
  const send = await startSend({ listen: { path: sendPath }, to: { path: receivePath }, link: { psk } });
  t.after(() => send.relay.close());
  const stream = fakeStream(6 * MiB);
  const sent = await sourceSends(sendPath, stream);
  assert.deepEqual(
    sent,
    { replies: Buffer.from("PONG") },
    "the destination's return path reached the source through the link",
  );
  const [toQemu] = destination.received;
  assert.ok(toQemu);
  assert.ok((await toQemu).equals(stream), "the real send's stream reached the destination intact");

  const sendReport = await send.done;
  const received = await receive.done;
  assert.equal(sendReport.relay.error, undefined, sendReport.relay.error);
  assert.equal(received.relay.error, undefined, "a refused peer is not an error of the migration");
  assert.deepEqual(
    received.relay.channels.map((c) => [c.index, c.kind, c.bytesToDestination]),
    [[0, "main", stream.length]],
    "the real send is channel #0: refused peers take no channel",
  );
  const refused = received.relay.refused ?? [];
  assert.equal(refused.length, 2, JSON.stringify(refused));
  for (const r of refused) assert.equal(r.peer, "a unix-socket peer");
  assert.equal(existsSync(receivePath), false, "receive's socket file is removed when it is done");
});
