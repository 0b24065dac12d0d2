/**
 * QMP framing against a scripted peer on a unix socket (the real QEMU is exercised by the integration tests):
 * greeting and negotiation, replies matched by id even out of order, errors typed, events kept for late
 * waiters, and pending commands failing when the connection drops.
 */
import assert from "node:assert/strict";
import { rm } from "node:fs/promises";
import { createServer, type Server, type Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { QmpClient, QmpConnectionError, QmpError } from "../../src/qemu/qmp.ts";

type Handler = (socket: Socket, message: { execute: string; id: number; arguments?: unknown }) => void;

async function fakeQemu(handler: Handler): Promise<{ path: string; server: Server; sockets: Socket[] }> {
  const path = join(tmpdir(), `qmp-${process.pid}-${Math.random().toString(16).slice(2)}.sock`);
  await rm(path, { force: true });
  const sockets: Socket[] = [];
  const server = createServer((socket) => {
    sockets.push(socket);
    socket.write(
      '{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "test"}, "capabilities": ["oob"]}}\r\n',
    );
    let buffer = "";
    socket.on("data", (chunk) => {
      buffer += chunk.toString();
      for (let at = buffer.indexOf("\n"); at >= 0; at = buffer.indexOf("\n")) {
        const message = JSON.parse(buffer.slice(0, at));
        buffer = buffer.slice(at + 1);
        if (message.execute === "qmp_capabilities") socket.write(`{"return": {}, "id": ${message.id}}\r\n`);
        else handler(socket, message);
      }
    });
  });
  await new Promise<void>((resolve) => server.listen(path, resolve));
  return { path, server, sockets };
}

test("greeting, negotiation, out-of-order replies matched by id", async (t) => {
  const held: { socket: Socket; id: number }[] = [];
  const peer = await fakeQemu((socket, m) => {
    if (m.execute === "query-status") held.push({ socket, id: m.id });
    if (m.execute === "query-version") {
      // Answer in two TCP chunks, split inside the JSON, then release the held reply.
      const text = `{"return": {"qemu": {"major": 10, "minor": 0, "micro": 2}, "package": "x"}, "id": ${m.id}}\r\n`;
      socket.write(text.slice(0, 10));
      setTimeout(() => {
        socket.write(text.slice(10));
        for (const h of held)
          h.socket.write(`{"return": {"status": "running", "running": true}, "id": ${h.id}}\r\n`);
      }, 20);
    }
  });
  const qmp = await QmpClient.connect(peer.path);
  t.after(async () => {
    qmp.close();
    peer.server.close();
    await rm(peer.path, { force: true });
  });
  assert.equal(qmp.version?.qemu.major, 10);
  const status = qmp.execute("query-status");
  const version = qmp.execute("query-version");
  assert.deepEqual(await version, { qemu: { major: 10, minor: 0, micro: 2 }, package: "x" });
  assert.deepEqual(await status, { status: "running", running: true });
});

test("errors are typed with their class; events are kept for late waiters", async (t) => {
  const peer = await fakeQemu((socket, m) => {
    if (m.execute === "migrate") {
      socket.write(
        '{"event": "MIGRATION", "data": {"status": "setup"}, "timestamp": {"seconds": 1, "microseconds": 2}}\r\n',
      );
      socket.write(`{"error": {"class": "GenericError", "desc": "no such uri"}, "id": ${m.id}}\r\n`);
    }
  });
  const qmp = await QmpClient.connect(peer.path);
  t.after(async () => {
    qmp.close();
    peer.server.close();
    await rm(peer.path, { force: true });
  });
  await assert.rejects(
    qmp.execute("migrate", { uri: "bogus:" }),
    (e: unknown) => e instanceof QmpError && e.errorClass === "GenericError" && /no such uri/.test(e.message),
  );
  const event = await qmp.waitEvent("MIGRATION", (e) => e.data.status === "setup", 1_000);
  assert.equal(event.timestamp.seconds, 1);
  await assert.rejects(
    qmp.waitEvent("STOP", () => true, 50),
    /no STOP event/,
  );
});

test("a dropped connection fails pending commands and later ones", async (t) => {
  const peer = await fakeQemu((socket) => socket.destroy());
  const qmp = await QmpClient.connect(peer.path);
  t.after(async () => {
    peer.server.close();
    await rm(peer.path, { force: true });
  });
  await assert.rejects(qmp.execute("query-status"), QmpConnectionError);
  assert.equal(qmp.closed, true);
  await assert.rejects(qmp.execute("query-status"), QmpConnectionError);
});

test("a peer that sends non-JSON is a connection error, not a crash", async (t) => {
  const peer = await fakeQemu((socket) => socket.write("this is not json\r\n"));
  const qmp = await QmpClient.connect(peer.path);
  t.after(async () => {
    peer.server.close();
    await rm(peer.path, { force: true });
  });
  await assert.rejects(qmp.execute("query-status"), /not JSON/);
});

test("nothing listening: a clear connection error", async () => {
  await assert.rejects(
    QmpClient.connect("/nonexistent/qmp.sock", 500),
    /cannot connect to \/nonexistent\/qmp.sock/,
  );
});

test("a monitor that never greets (another client holds it): a clear error, and the socket is closed", async (t) => {
  const path = join(tmpdir(), `qmp-${process.pid}-silent.sock`);
  await rm(path, { force: true });
  let closed: Promise<void> = Promise.resolve();
  const server = createServer((socket) => {
    closed = new Promise((resolve) => socket.on("close", () => resolve()));
  });
  await new Promise<void>((resolve) => server.listen(path, resolve));
  t.after(async () => {
    server.close();
    await rm(path, { force: true });
  });
  await assert.rejects(QmpClient.connect(path, 300), /another client probably holds this monitor/);
  await closed; // the client hung up: a CLI that failed here does not stay alive on an open socket
});
