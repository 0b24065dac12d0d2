/**
 * The migration relay (src/stream/relay.ts) between real TCP sockets on 127.0.0.1: a fake destination server and
 * source clients stand in for the two QEMUs. Each test checks one rule from the top of relay.ts.
 */
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { once } from "node:events";
import { readFile, rm } from "node:fs/promises";
import { connect, createServer, type Server, type ServerOpts, type Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Writable } from "node:stream";
import { type TestContext, test } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";
import {
  type ChannelCodec,
  type CodecOutlet,
  HeldTime,
  hold,
  type MainChannelProcessor,
  MULTIFD_MAGIC,
  RESUME_BELOW_SHARE,
  Relay,
  type RelayOptions,
} from "../../src/stream/relay.ts";
import { localServer } from "../support/fake-peers.ts";

const MiB = 1024 * 1024;
/** Per test, so that a regression fails instead of hanging the suite. */
const timeout = 15_000;
const HOST = "127.0.0.1";

interface FakeDestination {
  port: number;
  server: Server;
  /** Accepted connections, in accept order. */
  sockets: Socket[];
}

/** A destination server; `onConnection` gets each accepted socket with its accept index. */
async function fakeDestination(
  t: TestContext,
  onConnection: (socket: Socket, index: number) => void = () => {},
  options: ServerOpts = {},
): Promise<FakeDestination> {
  const { endpoint, server, sockets } = await localServer(t, onConnection, options);
  return { port: endpoint.port, server, sockets };
}

async function startRelay(t: TestContext, port: number, options: Partial<RelayOptions> = {}): Promise<Relay> {
  const relay = await Relay.start({ listen: { host: HOST, port: 0 }, to: { host: HOST, port }, ...options });
  t.after(() => relay.close());
  return relay;
}

/** A source client connected to the relay (errors are expected in some tests and checked explicitly). */
async function source(t: TestContext, relay: Relay): Promise<Socket> {
  const socket = connect({ host: HOST, port: relay.address.port, allowHalfOpen: true });
  socket.on("error", () => {});
  t.after(() => {
    socket.destroy();
  });
  await once(socket, "connect");
  return socket;
}

/** Everything a socket receives until its EOF. */
function readAll(socket: Socket): Promise<Buffer> {
  const chunks: Buffer[] = [];
  socket.on("data", (chunk: Buffer) => chunks.push(chunk));
  return once(socket, "end").then(() => Buffer.concat(chunks));
}

/** Writes `data`, honouring backpressure. */
async function send(socket: Socket, data: Buffer, piece = MiB): Promise<void> {
  for (let at = 0; at < data.length; at += piece) {
    if (!socket.write(data.subarray(at, at + piece))) await once(socket, "drain");
  }
}

async function waitFor(what: string, condition: () => boolean, timeoutMs = 5000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadline) assert.fail(`timed out waiting for ${what}`);
    await sleep(5);
  }
}

/** Resolves when the socket has closed (unlike events.once, not rejected by an 'error' before it). */
function closed(socket: Socket): Promise<void> {
  return socket.closed ? Promise.resolve() : new Promise((resolve) => socket.once("close", () => resolve()));
}

/** A port nothing listens on. */
async function closedPort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, HOST, resolve));
  const address = server.address();
  assert.ok(address && typeof address === "object");
  await new Promise<void>((resolve) => server.close(() => resolve()));
  return address.port;
}

/** A processor that upper-cases ASCII letters (into a new Buffer) and appends "|TAIL" at the end. */
function upperCase(): MainChannelProcessor {
  return {
    push: (chunk) => [Buffer.from(chunk.map((byte) => (byte >= 0x61 && byte <= 0x7a ? byte - 0x20 : byte)))],
    end: () => [Buffer.from("|TAIL")],
  };
}

test("20 MiB arrive intact; the return path flows while the source is still sending", {
  timeout,
}, async (t) => {
  const payload = randomBytes(20 * MiB);
  const pong = Buffer.from("PONG 00000001");
  let received: Promise<Buffer> | undefined;
  const destination = await fakeDestination(t, (socket) => {
    received = readAll(socket);
    let got = 0;
    socket.on("data", (chunk: Buffer) => {
      if (got < MiB && got + chunk.length >= MiB) socket.write(pong);
      got += chunk.length;
    });
    socket.on("end", () => socket.end());
  });
  const relay = await startRelay(t, destination.port);
  const src = await source(t, relay);
  let back = Buffer.alloc(0);
  src.on("data", (chunk: Buffer) => {
    back = Buffer.concat([back, chunk]);
  });

  await send(src, payload.subarray(0, 10 * MiB));
  // The second half is held back until the reply is in: a relay that held the return path until the source
  // finished (or until the source paused reading) would time out here.
  await waitFor("the reply on the return path", () => back.length >= pong.length);
  assert.deepEqual(back, pong);
  await send(src, payload.subarray(10 * MiB));
  src.end();

  await waitFor("the destination's connection", () => received !== undefined);
  assert.ok((await received)?.equals(payload), "the destination received exactly the source's bytes");
  const report = await relay.done;
  assert.equal(report.error, undefined);
  assert.equal(report.channels.length, 1);
  const { sourceHeldMs, destinationHeldMs, ...counts } = report.channels[0] ?? {};
  assert.deepEqual(counts, {
    index: 0,
    kind: "main",
    bytesToDestination: payload.length,
    bytesToSource: pong.length,
    bytesFromSource: payload.length,
    closedBy: "source",
  });
  // The destination reads as fast as it can: at most brief holds, never the test's length.
  assert.ok(typeof sourceHeldMs === "number" && sourceHeldMs >= 0 && sourceHeldMs < 2000, `${sourceHeldMs}`);
  assert.equal(destinationHeldMs, 0, "the return path never held the destination");
});

test("half-close: the destination's final message after the source's EOF reaches the source", {
  timeout,
}, async (t) => {
  const shut = Buffer.from([0, 1, 0, 4, 0, 0, 0, 0]); // RP SHUT, error 0 (§6)
  const events: string[] = [];
  const destination = await fakeDestination(t, (socket) => {
    const received = readAll(socket);
    void received.then(async (data) => {
      events.push(`destination got EOF after ${data.toString()}`);
      await sleep(50); // the relay must keep the source side open meanwhile
      socket.end(shut);
    });
  });
  const relay = await startRelay(t, destination.port);
  const src = await source(t, relay);
  const back = readAll(src);
  src.end("QEVM...EOF");
  assert.deepEqual(await back, shut, "SHUT reached the source before its EOF");
  events.push("source got SHUT and EOF");
  await closed(src);

  const report = await relay.done;
  assert.deepEqual(events, ["destination got EOF after QEVM...EOF", "source got SHUT and EOF"]);
  assert.equal(report.error, undefined);
  assert.deepEqual(report.channels[0], {
    index: 0,
    kind: "main",
    bytesToDestination: 10,
    bytesToSource: 8,
    bytesFromSource: 10,
    closedBy: "source",
    sourceHeldMs: 0,
    destinationHeldMs: 0,
  });
  // One relay = one migration: it no longer listens.
  const late = connect({ host: HOST, port: relay.address.port });
  const [error] = (await once(late, "error")) as [NodeJS.ErrnoException];
  assert.equal(error.code, "ECONNREFUSED");
});

test("accept order: the destination accepts connections in the order the relay accepted them", {
  timeout,
}, async (t) => {
  const first: (Buffer | undefined)[] = [];
  const destination = await fakeDestination(t, (socket, index) => {
    first[index] = undefined;
    socket.once("data", (chunk: Buffer) => {
      first[index] = chunk;
    });
    socket.on("end", () => socket.end());
  });
  const relay = await startRelay(t, destination.port);
  const main = await source(t, relay);
  const multifdInit = Buffer.alloc(64);
  multifdInit.writeUInt32BE(MULTIFD_MAGIC, 0);
  multifdInit.writeUInt32BE(1, 4);
  const other = Buffer.from("preempt!");
  const [multifd, preempt] = await Promise.all([source(t, relay), source(t, relay)]);
  multifd.write(multifdInit);
  preempt.write(other);
  // The main channel speaks last: a relay that connected upstream on a connection's first bytes (or peeked
  // before connecting) would hand the destination a multifd connection first.
  await waitFor("the later channels' bytes", () => first.filter((b) => b !== undefined).length === 2);
  main.write("QEVM");
  await waitFor("the main channel's bytes", () => first.filter((b) => b !== undefined).length === 3);
  for (const socket of [main, multifd, preempt]) socket.end();

  const report = await relay.done;
  assert.equal(report.error, undefined);
  assert.deepEqual(
    report.channels.map((c) => c.kind),
    report.channels[1]?.kind === "multifd" ? ["main", "multifd", "other"] : ["main", "other", "multifd"],
  );
  // The destination's k-th connection carries the relay's k-th accepted connection.
  const expected = report.channels.map((c) =>
    c.kind === "main" ? Buffer.from("QEVM") : c.kind === "multifd" ? multifdInit : other,
  );
  assert.deepEqual(first, expected);
});

test("backpressure: a destination that does not read stalls the source; the relay buffers a bounded amount", {
  timeout,
}, async (t) => {
  const maxBufferedBytes = MiB;
  const total = 200 * MiB;
  const block = Buffer.alloc(4 * MiB, 0x5a);
  let delivered = 0;
  const destination = await fakeDestination(
    t,
    (socket) => {
      socket.on("data", (chunk: Buffer) => {
        delivered += chunk.length;
      });
      socket.on("end", () => socket.end());
    },
    { pauseOnConnect: true }, // reads nothing until resumed
  );
  const relay = await startRelay(t, destination.port, { maxBufferedBytes });
  const src = await source(t, relay);
  let finished = false;
  let writeBlocked = false;
  const sending = (async () => {
    for (let sent = 0; sent < total; sent += block.length) {
      if (!src.write(block)) {
        writeBlocked = true;
        await once(src, "drain");
      }
    }
    src.end();
    finished = true;
  })();

  await sleep(1000);
  const stats = relay.bufferStats();
  assert.equal(finished, false, "the source could not push 200 MiB into a destination that does not read");
  assert.ok(writeBlocked && src.writableLength > 0, "the source's writes are blocked");
  const bound = maxBufferedBytes + 512 * 1024; // plus a read chunk or two in flight
  assert.ok(stats.bufferedBytes <= bound, `relay buffers ${stats.bufferedBytes} bytes`);
  assert.ok(stats.peakDirectionBytes <= bound, `relay buffered up to ${stats.peakDirectionBytes} bytes`);
  assert.ok(stats.peakDirectionBytes >= maxBufferedBytes, "the relay did fill its buffer before pausing");

  destination.sockets[0]?.resume();
  await sending;
  await waitFor("all bytes at the destination", () => delivered === total, 10000);
  const report = await relay.done;
  assert.equal(report.error, undefined);
  assert.equal(report.channels[0]?.bytesToDestination, total);
  // The source sat unread for most of the second the destination did not read, and the report says so.
  const heldMs = report.channels[0]?.sourceHeldMs ?? 0;
  assert.ok(heldMs >= 500, `held ${heldMs} ms, though the destination read nothing for 1000 ms`);
});

test("held time: counted from the first writer that holds a reader until the last lets it go, once", async () => {
  // Writers whose one write completes only when the test says so.
  const complete: (() => void)[] = [];
  const writer = () => {
    const w = new Writable({
      highWaterMark: 1,
      write(_chunk, _encoding, callback) {
        complete.push(callback);
      },
    });
    w.write(Buffer.alloc(16));
    return w;
  };
  const reader = {
    destroyed: false,
    pause() {
      return this as unknown as Socket;
    },
    resume() {
      return this as unknown as Socket;
    },
  };
  const held = new HeldTime();
  const holds = new Set<Writable>();
  hold(reader, writer(), holds, { held });
  hold(reader, writer(), holds, { held });
  await sleep(100);
  assert.ok(held.ms >= 90, `a hold still running counts: ${held.ms} ms`);
  complete.shift()?.(); // the first writer drains; the second still holds the reader
  await sleep(60);
  assert.equal(holds.size, 1);
  assert.ok(held.ms >= 150, `still held: ${held.ms} ms`);
  complete.shift()?.();
  await waitFor("the reader let go", () => holds.size === 0);
  const total = held.ms;
  // Two writers over the same stretch: counted once, not twice.
  assert.ok(total >= 150 && total < 400, `held ${total} ms`);
  await sleep(50);
  assert.equal(held.ms, total, "no time counts once the reader is free");
});

test("held time: a codec's own hold (the link's window) adds to the relay's, overlapping stretches once", async () => {
  const held = new HeldTime();
  // The codec holds alone for ~60 ms.
  held.begin();
  await sleep(60);
  held.end();
  const alone = held.ms;
  assert.ok(alone >= 50 && alone < 300, `the codec's hold alone counts: ${alone} ms`);
  // The relay and the codec hold over the same ~80 ms; the relay lets go first, the codec ~40 ms later.
  held.begin();
  held.begin();
  await sleep(80);
  held.end();
  assert.ok(held.ms - alone >= 70, `still held by the codec: ${held.ms - alone} ms`);
  await sleep(40);
  held.end();
  const total = held.ms;
  assert.ok(total - alone >= 110 && total - alone < 400, `the overlap counted once: ${total - alone} ms`);
  held.end(); // one end too many changes nothing
  await sleep(30);
  assert.equal(held.ms, total, "nothing counts once both let go");
});

test("a source paused for its destination resumes once that holds less than the low mark, before it is empty", async () => {
  // A destination whose writes complete only when the test says: 8 MiB queued, then drained 1 MiB at a time.
  const done: (() => void)[] = [];
  const destination = new Writable({
    highWaterMark: 1,
    write(_chunk, _encoding, callback) {
      done.push(callback);
    },
  });
  for (let i = 0; i < 8; i++) destination.write(Buffer.alloc(MiB));
  let paused = false;
  const source = {
    destroyed: false,
    pause() {
      paused = true;
      return this as unknown as Socket;
    },
    resume() {
      paused = false;
      return this as unknown as Socket;
    },
  };
  hold(source, destination, new Set(), { resumeBelow: () => 8 * MiB * RESUME_BELOW_SHARE });
  assert.equal(paused, true);
  const resumedAt: number[] = [];
  while (done.length > 0) {
    done.shift()?.();
    await sleep(20); // several of the hold's checks
    if (!paused && resumedAt.length === 0) resumedAt.push(destination.writableLength);
  }
  assert.deepEqual(
    resumedAt,
    [3 * MiB],
    "resumed with 3 MiB still queued: the first time below half of 8 MiB",
  );
});

test("no probe: the relay opens no connection to the destination before a source connects", {
  timeout,
}, async (t) => {
  const destination = await fakeDestination(t, (socket) => socket.on("end", () => socket.end()));
  const relay = await startRelay(t, destination.port);
  await sleep(300);
  assert.equal(destination.sockets.length, 0);
  const src = await source(t, relay);
  await waitFor("the relayed connection", () => destination.sockets.length === 1);
  src.end();
  const report = await relay.done;
  assert.equal(destination.sockets.length, 1);
  assert.equal(report.channels.length, 1);
});

test("destination down: the source connection is reset and the report names the address", {
  timeout,
}, async (t) => {
  const port = await closedPort();
  const relay = await startRelay(t, port);
  const src = await source(t, relay);
  let sourceError: NodeJS.ErrnoException | undefined;
  src.on("error", (error) => {
    sourceError = error;
  });
  src.write("QEVM");
  await closed(src);
  assert.equal(sourceError?.code, "ECONNRESET", "the source saw a reset");
  const report = await relay.done;
  assert.match(report.error ?? "", new RegExp(`cannot connect to destination ${HOST}:${port}: ECONNREFUSED`));
  assert.equal(report.channels[0]?.closedBy, "relay: cannot connect to destination");
});

test("destination resets mid-transfer: the source connection is torn down too", { timeout }, async (t) => {
  const destination = await fakeDestination(t, (socket) => {
    let got = 0;
    socket.on("data", (chunk: Buffer) => {
      got += chunk.length;
      if (got >= MiB) socket.resetAndDestroy();
    });
  });
  const relay = await startRelay(t, destination.port);
  const src = await source(t, relay);
  let sourceError: NodeJS.ErrnoException | undefined;
  src.on("error", (error) => {
    sourceError = error;
  });
  const block = Buffer.alloc(MiB);
  const srcClosed = closed(src);
  // Keep sending (as QEMU would) until the relay tears the connection down.
  for (let i = 0; i < 100 && !src.destroyed; i++) {
    if (!src.write(block))
      await Promise.race([new Promise((resolve) => src.once("drain", resolve)), srcClosed]);
  }
  let sourceClosed = false;
  void srcClosed.then(() => {
    sourceClosed = true;
  });
  await waitFor("the source connection to close", () => sourceClosed);
  assert.ok(sourceError, "the source saw an error, not a clean EOF");
  const report = await relay.done;
  assert.match(report.channels[0]?.closedBy ?? "", /^destination error: (ECONNRESET|EPIPE)$/);
  assert.match(report.error ?? "", /destination side of channel #0/);
});

test("the processor applies to the main channel only; its end() bytes precede the destination's EOF", {
  timeout,
}, async (t) => {
  const received: Promise<Buffer>[] = [];
  const destination = await fakeDestination(t, (socket, index) => {
    received[index] = readAll(socket);
    socket.on("end", () => socket.end());
  });
  let created = 0;
  const relay = await startRelay(t, destination.port, {
    createMainProcessor: () => {
      created++;
      return upperCase();
    },
  });
  const main = await source(t, relay);
  const multifd = await source(t, relay);
  await waitFor("both upstream connections", () => destination.sockets.length === 2);
  const init = Buffer.concat([Buffer.from([0x11, 0x22, 0x33, 0x44]), Buffer.from("abc")]);
  main.end("qevm hello");
  multifd.end(init);

  assert.equal((await received[0])?.toString(), "QEVM HELLO|TAIL");
  assert.deepEqual(await received[1], init);
  const report = await relay.done;
  assert.equal(created, 1);
  assert.equal(report.error, undefined);
  assert.deepEqual(
    report.channels.map((c) => [c.kind, c.bytesFromSource, c.bytesToDestination]),
    [
      ["main", 10, 15],
      ["multifd", 7, 7],
    ],
  );
});

test("capture: the file holds the main channel's bytes as received, before the processor", {
  timeout,
}, async (t) => {
  const capturePath = join(tmpdir(), `relay-capture-${process.pid}-${Date.now()}.bin`);
  t.after(() => rm(capturePath, { force: true }));
  const payload = randomBytes(3 * MiB);
  let received: Promise<Buffer> | undefined;
  const destination = await fakeDestination(t, (socket) => {
    received = readAll(socket);
    socket.on("end", () => socket.end());
  });
  const relay = await startRelay(t, destination.port, { capturePath, createMainProcessor: upperCase });
  const src = await source(t, relay);
  await send(src, payload, 100_000);
  src.end();
  const report = await relay.done;
  assert.equal(report.error, undefined);
  assert.ok((await readFile(capturePath)).equals(payload), "capture equals the source's bytes");
  const processed = await received;
  assert.equal(processed?.length, payload.length + "|TAIL".length);
  assert.ok(
    !processed?.equals(Buffer.concat([payload, Buffer.from("|TAIL")])),
    "the destination got processed bytes",
  );
});

test("a processor that throws tears the main channel down and says why", { timeout }, async (t) => {
  const destination = await fakeDestination(t);
  const relay = await startRelay(t, destination.port, {
    createMainProcessor: () => ({
      push: () => {
        throw new Error("unparseable section");
      },
      end: () => [],
    }),
  });
  const src = await source(t, relay);
  src.write("QEVM");
  await closed(src);
  const report = await relay.done;
  assert.equal(report.channels[0]?.closedBy, "relay: processor failed");
  assert.match(report.error ?? "", /main channel processor failed: unparseable section/);
});

test("close() before any connection: done resolves, the port is released", { timeout }, async () => {
  const relay = await Relay.start({ listen: { host: HOST, port: 0 }, to: { host: HOST, port: 9 } });
  await relay.close();
  const report = await relay.done;
  assert.deepEqual(report.channels, []);
  const late = connect({ host: HOST, port: relay.address.port });
  const [error] = (await once(late, "error")) as [NodeJS.ErrnoException];
  assert.equal(error.code, "ECONNREFUSED");
});

/**
 * A codec whose output comes later, through the outlet (as receive's does when disk reads settle): each chunk is
 * passed on from a microtask after fromSource returned, in order; the end after the last chunk.
 */
function laterCodec(calls: { closed: number; emits: number }): ChannelCodec {
  let outlet: CodecOutlet | undefined;
  const later = (output: Parameters<CodecOutlet["emit"]>[0]) =>
    queueMicrotask(() => {
      calls.emits++;
      outlet?.emit(output);
    });
  return {
    attach: (o) => {
      outlet = o;
    },
    fromSource: (chunk) => {
      later({ toUpstream: [Buffer.from(chunk)] });
      return {};
    },
    sourceEnded: () => {
      later({ endUpstream: true });
      return {};
    },
    fromUpstream: (chunk) => ({ toSource: [chunk] }),
    upstreamEnded: () => ({ endSource: true }),
    closed: () => {
      calls.closed++;
    },
  };
}

test("a codec's later output (outlet.emit) is written in order, with the same backpressure; closed() is called", {
  timeout,
}, async (t) => {
  const maxBufferedBytes = MiB;
  const data = randomBytes(48 * MiB);
  const received: Buffer[] = [];
  const destination = await fakeDestination(
    t,
    (socket) => {
      socket.on("data", (chunk: Buffer) => received.push(chunk));
      socket.on("end", () => socket.end());
    },
    { pauseOnConnect: true }, // reads nothing until resumed
  );
  const calls = { closed: 0, emits: 0 };
  const relay = await startRelay(t, destination.port, {
    maxBufferedBytes,
    createChannelCodec: () => laterCodec(calls),
  });
  const src = await source(t, relay);
  let finished = false;
  const sending = send(src, data).then(() => {
    src.end();
    finished = true;
  });
  await sleep(1000);
  assert.equal(
    finished,
    false,
    "a destination that does not read stalls the source through emitted output too",
  );
  const stats = relay.bufferStats();
  assert.ok(
    stats.peakDirectionBytes >= maxBufferedBytes,
    "emitted output filled the buffer, then paused the source",
  );
  destination.sockets[0]?.resume();
  await sending;
  await waitFor("the destination's EOF", () => destination.sockets[0]?.readableEnded ?? false, 10000);
  assert.ok(Buffer.concat(received).equals(data), "every byte, in order");
  const report = await relay.done;
  assert.equal(report.error, undefined);
  assert.equal(calls.closed, 1);
  assert.ok(calls.emits > 1);
});
