/**
 * receive as a service (src/migrate/receive-service.ts) on real sockets, with real `send`s (library) in front of
 * stand-in sources and destinations (test/support/fake-peers.ts): several migrations at once, each into the
 * destination its send names, channels in order; peers that fail (garbage, silence, a destination not allowed,
 * a busy service) refused alone, with reasons send can report. Real QEMUs on both sides:
 * test/integration/receive-service.test.ts.
 */
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { once } from "node:events";
import { mkdirSync, symlinkSync, writeFileSync } from "node:fs";
import { connect } from "node:net";
import { join } from "node:path";
import { type TestContext, test } from "node:test";
import { startReceive } from "../../src/migrate/link-receive.ts";
import { ReceiveService, type ServedMigration } from "../../src/migrate/receive-service.ts";
import { startSend } from "../../src/migrate/send.ts";
import { MULTIFD_MAGIC } from "../../src/stream/relay.ts";
import { fakeDestination, fakeStream, MiB, signal, sourceSends, tempDir } from "../support/fake-peers.ts";

const timeout = 30_000;
const psk = randomBytes(32);

async function startService(
  t: TestContext,
  dir: string,
  options: { maxMigrations?: number; maxHandshakes?: number } = {},
): Promise<{ service: ReceiveService; path: string; allowDir: string; served: ServedMigration[] }> {
  const allowDir = join(dir, "incoming");
  mkdirSync(allowDir);
  const path = join(dir, "service.sock");
  const served: ServedMigration[] = [];
  const service = await ReceiveService.start({
    listen: { path },
    psk,
    allowed: { dir: allowDir, addresses: [{ host: "127.0.0.1", port: 1 }] },
    handshakeTimeoutMs: 500,
    ...(process.env.DEBUG_SERVICE ? { log: (line: string) => console.error(line) } : {}),
    onMigration: (report) => served.push(report),
    ...options,
  });
  t.after(() => service.close({ abort: true }));
  return { service, path, allowDir, served };
}

/** A send (library) listening on DIR/NAME.sock, linked to the service, asking for `target`. */
async function sendTo(t: TestContext, dir: string, name: string, service: string, target: string) {
  const send = await startSend({
    listen: { path: join(dir, `${name}.sock`) },
    to: { path: service },
    link: { psk, target },
  });
  t.after(() => send.relay.close());
  return { send, source: join(dir, `${name}.sock`) };
}

/** A connection that never says anything; `closed` settles when the service has cut it. */
async function silentClient(t: TestContext, path: string): Promise<{ closed: Promise<unknown> }> {
  const socket = connect({ path });
  socket.on("error", () => {});
  t.after(() => socket.destroy());
  const closed = once(socket, "close");
  await once(socket, "connect");
  return { closed };
}

test("two migrations at once, each into the destination its send names, channels in order; garbage and silence meanwhile are refused alone", {
  timeout,
}, async (t) => {
  const dir = tempDir(t);
  const { service, path, allowDir, served } = await startService(t, dir);
  const a = await fakeDestination(t, join(allowDir, "vm-a.sock"));
  const b = await fakeDestination(t, join(allowDir, "vm-b.sock"));

  const silent = await silentClient(t, path);
  const garbage = connect({ path });
  garbage.on("error", () => {});
  await once(garbage, "connect");
  garbage.write(fakeStream(64 * 1024));

  const sendA = await sendTo(t, dir, "send-a", path, "vm-a.sock");
  const sendB = await sendTo(t, dir, "send-b", path, "vm-b.sock");
  const mainA = fakeStream(6 * MiB);
  const mainB = fakeStream(5 * MiB);
  const multifdA = Buffer.concat([Buffer.alloc(4), randomBytes(2 * MiB)]);
  multifdA.writeUInt32BE(MULTIFD_MAGIC, 0);
  // A's main channel stays open until its multifd one connected, as QEMU's does (a send whose only channel
  // closed is done).
  const multifdConnected = signal();
  const sentA = sourceSends(sendA.source, mainA, { endAfter: multifdConnected.promise });
  const sentB = sourceSends(sendB.source, mainB);
  await new Promise((resolve) => setTimeout(resolve, 50));
  const sentMultifdA = sourceSends(sendA.source, multifdA, { connected: multifdConnected.fire });

  for (const sent of await Promise.all([sentA, sentB, sentMultifdA]))
    assert.deepEqual(sent, { replies: Buffer.from("PONG") }, "each return path reached its source");
  assert.equal(a.received.length, 2);
  assert.equal(b.received.length, 1);
  assert.ok((await a.received[0])?.equals(mainA), "A's main channel reached A, first");
  assert.ok((await a.received[1])?.equals(multifdA), "A's multifd channel reached A, second");
  assert.ok((await b.received[0])?.equals(mainB), "B's stream reached B, and only B");
  for (const s of [sendA, sendB]) assert.equal((await s.send.done).relay.error, undefined);
  await silent.closed;

  const report = await service.close();
  assert.equal(report.migrations.length, 2);
  assert.deepEqual(served.map((m) => m.destination).sort(), [
    `unix:${join(allowDir, "vm-a.sock")}`,
    `unix:${join(allowDir, "vm-b.sock")}`,
  ]);
  const intoA = served.find((m) => m.destination.endsWith("vm-a.sock"));
  assert.deepEqual(
    intoA?.relay.channels.map((c) => [c.index, c.bytesToDestination]),
    [
      [0, mainA.length],
      [1, multifdA.length],
    ],
  );
  for (const m of served) assert.equal(m.relay.error, undefined, m.relay.error);
  assert.equal(report.refused.length, 2, JSON.stringify(report.refused));
  assert.ok(
    report.refused.some((r) => /TLS handshake/.test(r.reason)),
    JSON.stringify(report.refused),
  );
});

test("destinations the operator did not allow are refused with the reason send reports; nothing reaches a destination", {
  timeout,
}, async (t) => {
  const dir = tempDir(t);
  const { service, path, allowDir } = await startService(t, dir);
  const real = await fakeDestination(t, join(allowDir, "vm.sock"));
  writeFileSync(join(allowDir, "file.sock"), "");
  symlinkSync(join(allowDir, "vm.sock"), join(allowDir, "link.sock"));

  const cases: [string, RegExp][] = [
    ["missing.sock", /no socket .*missing\.sock: is the destination QEMU listening there/],
    ["file.sock", /file\.sock is not a socket/],
    ["link.sock", /link\.sock is not a socket \(a symlink/],
    [
      "10.0.0.1:4444",
      /destination "10\.0\.0\.1:4444" is not allowed; allowed here: sockets in .*; 127\.0\.0\.1:1/,
    ],
    ["", /send named no destination \(give send --target NAME/],
  ];
  for (const [i, [target, reason]] of cases.entries()) {
    const { send, source } = await sendTo(t, dir, `send-${i}`, path, target);
    const sent = await sourceSends(source, fakeStream(MiB));
    assert.equal(sent.replies.length, 0, target);
    const report = await send.done;
    assert.match(report.relay.error ?? "", reason, `target ${JSON.stringify(target)}`);
    assert.match(report.relay.error ?? "", /receive aborted the migration/);
  }
  assert.equal(real.sockets.length, 0, "no refused migration reached a destination");
  const report = await service.close();
  assert.equal(report.migrations.length, 0);
  assert.equal(report.refused.length, cases.length);
});

test("limits: a second migration beyond --max-migrations and a connection beyond the handshake limit are refused; the running one goes on", {
  timeout,
}, async (t) => {
  const dir = tempDir(t);
  const { service, path, allowDir } = await startService(t, dir, { maxMigrations: 1, maxHandshakes: 1 });
  const a = await fakeDestination(t, join(allowDir, "vm-a.sock"));
  await fakeDestination(t, join(allowDir, "vm-b.sock"));

  // One migration, held open: its source has sent a little and not yet ended.
  const sendA = await sendTo(t, dir, "send-a", path, "vm-a.sock");
  const holder = connect({ path: sendA.source, allowHalfOpen: true });
  holder.on("error", () => {});
  t.after(() => holder.destroy());
  await once(holder, "connect");
  holder.resume(); // its return path (and the end) must be read for it to close
  const head = fakeStream(MiB);
  holder.write(head);
  while (service.status().migrations.length === 0) await new Promise((r) => setTimeout(r, 20));

  const sendB = await sendTo(t, dir, "send-b", path, "vm-b.sock");
  await sourceSends(sendB.source, fakeStream(MiB));
  assert.match((await sendB.send.done).relay.error ?? "", /busy: 1 migrations running \(at most 1\)/);

  // Two silent connections: the second is over the handshake limit and cut at once.
  const first = await silentClient(t, path);
  while (service.status().handshaking === 0) await new Promise((r) => setTimeout(r, 10));
  await (await silentClient(t, path)).closed;
  assert.ok(
    service.status().handshaking === 1,
    "the connection over the limit was cut while the first still waited in its handshake",
  );
  await first.closed;

  holder.end();
  await once(holder, "close");
  assert.equal((await sendA.send.done).relay.error, undefined);
  assert.equal(a.received.length, 1);
  const report = await service.close();
  assert.equal(report.migrations.length, 1);
  assert.ok(
    report.refused.some((r) => /handshakes/.test(r.reason)),
    JSON.stringify(report.refused),
  );
});

test("a receive for one destination (--to) refuses a send that names another, with the reason", {
  timeout,
}, async (t) => {
  const dir = tempDir(t);
  const destination = await fakeDestination(t, join(dir, "qemu.sock"));
  const receive = await startReceive({
    listen: { path: join(dir, "receive.sock") },
    to: { path: join(dir, "qemu.sock") },
    psk,
  });
  t.after(() => receive.relay.close());
  const { send, source } = await sendTo(t, dir, "send", join(dir, "receive.sock"), "vm-a.sock");
  await sourceSends(source, fakeStream(MiB));
  assert.match(
    (await send.done).relay.error ?? "",
    /this receive feeds one destination \(--to\); send asked for "vm-a\.sock"/,
  );
  assert.equal(destination.sockets.length, 0);
});
