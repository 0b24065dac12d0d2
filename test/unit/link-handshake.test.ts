/**
 * The link handshake (src/link/handshake.ts) over real loopback TCP sockets: the real client against the real
 * server, and each against a scripted peer that gets one thing wrong. A failing side destroys its socket and sends
 * nothing after the failure; no DATA is ever handed on.
 */
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { once } from "node:events";
import { type AddressInfo, connect, createServer, type Socket } from "node:net";
import { type TestContext, test } from "node:test";
import { decodeFrame, LinkDecoder } from "../../src/link/decoder.ts";
import { LinkError } from "../../src/link/errors.ts";
import {
  clientHandshake,
  type HandshakeOptions,
  handshakeMac,
  serverHandshake,
} from "../../src/link/handshake.ts";
import {
  CAPABILITY,
  encodeMessage,
  FRAME_HEADER_BYTES,
  type Hello,
  type Message,
  MSG,
  PROTOCOL_MAJOR,
  PROTOCOL_MINOR,
  ROLE,
} from "../../src/link/protocol.ts";

const timeout = 10_000;
const psk = randomBytes(32);
const caps = [CAPABILITY.REF_SHA256];

/** A connected loopback pair: `client` (send's side) and `server` (receive's side, allowHalfOpen like receive). */
async function socketPair(t: TestContext): Promise<{ client: Socket; server: Socket }> {
  const server = createServer({ allowHalfOpen: true, pauseOnConnect: true });
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  const { port } = server.address() as AddressInfo;
  const accepted = once(server, "connection") as Promise<[Socket]>;
  const client = connect({ host: "127.0.0.1", port, allowHalfOpen: true });
  client.on("error", () => {});
  const [serverSide] = await accepted;
  serverSide.on("error", () => {});
  await once(client, "connect");
  t.after(() => {
    client.destroy();
    serverSide.destroy();
    server.close();
  });
  return { client, server: serverSide };
}

/** Everything `socket` receives until the peer's EOF (or the socket closes). */
function collect(socket: Socket): Promise<Buffer> {
  const chunks: Buffer[] = [];
  socket.on("data", (chunk: Buffer) => chunks.push(chunk));
  return new Promise((resolve) => {
    const done = () => resolve(Buffer.concat(chunks));
    socket.once("end", done);
    socket.once("close", done);
  });
}

async function rejectsWith(promise: Promise<unknown>, code: string): Promise<LinkError> {
  try {
    await promise;
  } catch (error) {
    assert.ok(error instanceof LinkError, `expected a LinkError, got ${String(error)}`);
    assert.equal(error.code, code, error.message);
    return error;
  }
  assert.fail(`expected a LinkError ${code}, the handshake succeeded`);
}

function hello(role: Hello["role"], overrides: Partial<Hello> = {}): Hello {
  return {
    type: MSG.HELLO,
    major: PROTOCOL_MAJOR,
    minor: 0,
    role,
    windowBytes: 0,
    nonce: randomBytes(32),
    capabilities: [...caps],
    ...overrides,
  };
}

/** Reads frames from a raw socket (for the scripted peers). */
function frames(socket: Socket): () => Promise<{ message: Message; payload: Buffer }> {
  const decoder = new LinkDecoder();
  const queue: { message: Message; payload: Buffer }[] = [];
  let wake: (() => void) | undefined;
  socket.on("data", (chunk: Buffer) => {
    decoder.write(chunk);
    for (let f = decoder.nextFrame(); f; f = decoder.nextFrame())
      queue.push({ message: decodeFrame(f), payload: Buffer.from(f.payload) });
    wake?.();
  });
  socket.resume();
  return async () => {
    while (queue.length === 0) await new Promise<void>((resolve) => (wake = resolve));
    const next = queue.shift();
    assert.ok(next);
    return next;
  };
}

test("same PSK: both sides authenticate, negotiate the common capabilities, and stream bytes flow after", {
  timeout,
}, async (t) => {
  const { client, server } = await socketPair(t);
  const claim = { migration: randomBytes(16), channel: 1, target: "dst.sock" };
  const serverOptions: HandshakeOptions = {
    psk,
    capabilities: [CAPABILITY.REF_SHA256, "x-only-receive"],
    windowBytes: 1 << 20,
  };
  const [c, s] = await Promise.all([
    clientHandshake(client, { psk, capabilities: ["x-only-send", CAPABILITY.REF_SHA256], claim }),
    serverHandshake(server, serverOptions),
  ]);
  assert.deepEqual(s.peerClaim, claim, "receive learns which migration, channel and destination");
  assert.equal(c.peerClaim, undefined);
  assert.deepEqual(c.capabilities, [CAPABILITY.REF_SHA256]);
  assert.deepEqual(s.capabilities, [CAPABILITY.REF_SHA256]);
  assert.equal(c.windowBytes, 1 << 20, "send learns receive's window");
  assert.equal(s.windowBytes, 1 << 20);
  assert.deepEqual(c.peerVersion, { major: PROTOCOL_MAJOR, minor: PROTOCOL_MINOR });

  // After the handshake the sockets belong to the caller: DATA goes through.
  const decoder = new LinkDecoder();
  const got: Message[] = [];
  server.on("data", (chunk: Buffer) => got.push(...decoder.push(chunk)));
  server.resume();
  client.end(encodeMessage({ type: MSG.DATA, bytes: Buffer.from("QEVM") }));
  await once(server, "end");
  assert.deepEqual(
    got.map((m) => m.type),
    [MSG.DATA],
  );
});

test("bytes that arrive with READY are given back to the socket, not lost", { timeout }, async (t) => {
  const { client, server } = await socketPair(t);
  const serverDone = serverHandshake(server, { psk, capabilities: caps });
  const next = frames(client);
  const helloSend = encodeMessage(hello(ROLE.SEND));
  client.write(helloSend);
  const { payload: helloReceive } = await next();
  const mac = handshakeMac(psk, ROLE.SEND, helloSend.subarray(FRAME_HEADER_BYTES), helloReceive);
  client.write(encodeMessage({ type: MSG.AUTH, mac }));
  assert.equal((await next()).message.type, MSG.AUTH);
  // READY and the first DATA frame in one write.
  const data = encodeMessage({ type: MSG.DATA, bytes: Buffer.from("QEVM\0\0\0\x03") });
  client.write(Buffer.concat([encodeMessage({ type: MSG.READY }), data]));
  await serverDone;
  const decoder = new LinkDecoder();
  const got: Message[] = [];
  server.on("data", (chunk: Buffer) => got.push(...decoder.push(chunk)));
  server.resume();
  client.end();
  await once(server, "end");
  assert.equal(got.length, 1);
  assert.equal(got[0]?.type === MSG.DATA && got[0].bytes.toString("latin1"), "QEVM\0\0\0\x03");
});

test("different PSKs: both sides refuse; receive sends nothing after its HELLO and takes no DATA", {
  timeout,
}, async (t) => {
  const { client, server } = await socketPair(t);
  const fromServer = collect(client);
  const [c, s] = await Promise.allSettled([
    clientHandshake(client, { psk: randomBytes(32), capabilities: caps }),
    serverHandshake(server, { psk, capabilities: caps }),
  ]);
  assert.ok(c.status === "rejected" && s.status === "rejected");
  assert.equal((s.reason as LinkError).code, "auth-failed");
  assert.equal((c.reason as LinkError).code, "closed");
  assert.ok(server.destroyed && client.destroyed);
  const got = new LinkDecoder().push(await fromServer);
  assert.deepEqual(
    got.map((m) => m.type),
    [MSG.HELLO],
    "receive proved nothing and sent nothing else",
  );
});

test("a wrong-key peer that streams DATA right after its AUTH: refused, no DATA decoded", {
  timeout,
}, async (t) => {
  const { client, server } = await socketPair(t);
  const serverDone = serverHandshake(server, { psk, capabilities: caps });
  const next = frames(client);
  const helloSend = encodeMessage(hello(ROLE.SEND));
  client.write(helloSend);
  const { payload: helloReceive } = await next();
  const mac = handshakeMac(randomBytes(32), ROLE.SEND, helloSend.subarray(FRAME_HEADER_BYTES), helloReceive);
  client.write(
    Buffer.concat([
      encodeMessage({ type: MSG.AUTH, mac }),
      encodeMessage({ type: MSG.READY }),
      encodeMessage({ type: MSG.DATA, bytes: Buffer.from("guest bytes") }),
    ]),
  );
  await rejectsWith(serverDone, "auth-failed");
  assert.ok(server.destroyed);
  assert.equal(server.listenerCount("data"), 0, "nothing left reading the socket");
});

test("a peer that skips AUTH and sends DATA is refused", { timeout }, async (t) => {
  const { client, server } = await socketPair(t);
  const serverDone = serverHandshake(server, { psk, capabilities: caps });
  const next = frames(client);
  client.write(encodeMessage(hello(ROLE.SEND)));
  await next();
  client.write(encodeMessage({ type: MSG.DATA, bytes: Buffer.from("guest bytes") }));
  await rejectsWith(serverDone, "unexpected-message");
});

test("wrong magic, or a QEMU stream: receive refuses without sending a byte", { timeout }, async (t) => {
  for (const bytes of [
    (() => {
      const b = encodeMessage(hello(ROLE.SEND));
      b.write("VMPRLINK", FRAME_HEADER_BYTES, "latin1");
      return b;
    })(),
    Buffer.from("5145564d00000003", "hex"),
  ]) {
    const { client, server } = await socketPair(t);
    const fromServer = collect(client);
    const serverDone = serverHandshake(server, { psk, capabilities: caps });
    client.write(bytes);
    const error = await rejectsWith(serverDone, bytes.length > 8 ? "bad-magic" : "unknown-type");
    assert.equal(error.offset, 0);
    assert.equal((await fromServer).length, 0);
  }
});

test("receive with wrong magic in its HELLO: send refuses and sends no AUTH", { timeout }, async (t) => {
  const { client, server } = await socketPair(t);
  const fromClient = collect(server);
  server.resume();
  const clientDone = clientHandshake(client, { psk, capabilities: caps });
  await once(server, "data");
  const b = encodeMessage(hello(ROLE.RECEIVE));
  b.write("xxxxxxxx", FRAME_HEADER_BYTES, "latin1");
  server.write(b);
  await rejectsWith(clientDone, "bad-magic");
  const got = new LinkDecoder().push(await fromClient);
  assert.deepEqual(
    got.map((m) => m.type),
    [MSG.HELLO],
  );
});

test("major version mismatch is refused by either side, before any AUTH", { timeout }, async (t) => {
  {
    // A send of a future major against this receive.
    const { client, server } = await socketPair(t);
    const fromServer = collect(client);
    const [c, s] = await Promise.allSettled([
      clientHandshake(client, { psk, capabilities: caps, helloOverride: { major: PROTOCOL_MAJOR + 1 } }),
      serverHandshake(server, { psk, capabilities: caps }),
    ]);
    assert.equal(s.status === "rejected" && (s.reason as LinkError).code, "unsupported-version");
    assert.match((s as PromiseRejectedResult).reason.message, /major versions must match/);
    assert.equal(c.status === "rejected" && (c.reason as LinkError).code, "closed");
    assert.equal((await fromServer).length, 0, "receive sent nothing");
  }
  {
    // A receive of a future major answering this send.
    const { client, server } = await socketPair(t);
    const fromClient = collect(server);
    const [c, s] = await Promise.allSettled([
      clientHandshake(client, { psk, capabilities: caps }),
      serverHandshake(server, { psk, capabilities: caps, helloOverride: { major: PROTOCOL_MAJOR + 1 } }),
    ]);
    assert.equal(c.status === "rejected" && (c.reason as LinkError).code, "unsupported-version");
    assert.equal(s.status, "rejected");
    const got = new LinkDecoder().push(await fromClient);
    assert.deepEqual(
      got.map((m) => m.type),
      [MSG.HELLO],
      "send sent no AUTH",
    );
  }
  {
    // A different minor is fine.
    const { client, server } = await socketPair(t);
    const [c] = await Promise.all([
      clientHandshake(client, { psk, capabilities: caps, helloOverride: { minor: 7 } }),
      serverHandshake(server, { psk, capabilities: caps }),
    ]);
    assert.deepEqual(c.capabilities, caps);
  }
});

test("two sends (or two receives) do not pair up", { timeout }, async (t) => {
  const { client, server } = await socketPair(t);
  const [c, s] = await Promise.allSettled([
    clientHandshake(client, { psk, capabilities: caps }),
    serverHandshake(server, { psk, capabilities: caps, helloOverride: { role: ROLE.SEND } }),
  ]);
  assert.equal(c.status === "rejected" && (c.reason as LinkError).code, "unexpected-message");
  assert.equal(s.status, "rejected");
});

test("a silent peer: the handshake times out and the socket is destroyed", { timeout }, async (t) => {
  {
    const { client, server } = await socketPair(t);
    server.resume(); // reads, never answers
    const started = performance.now();
    await rejectsWith(clientHandshake(client, { psk, capabilities: caps, timeoutMs: 200 }), "timeout");
    assert.ok(performance.now() - started >= 190);
    assert.ok(client.destroyed);
  }
  {
    const { server } = await socketPair(t);
    await rejectsWith(serverHandshake(server, { psk, capabilities: caps, timeoutMs: 200 }), "timeout");
    assert.ok(server.destroyed);
  }
});

test("a short PSK is refused before anything is sent", { timeout }, async (t) => {
  const { client, server } = await socketPair(t);
  const fromClient = collect(server);
  server.resume();
  await rejectsWith(clientHandshake(client, { psk: Buffer.from("short"), capabilities: caps }), "bad-key");
  assert.equal((await fromClient).length, 0);
});
