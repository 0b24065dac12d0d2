/**
 * How a relay channel ends when its destination goes away abruptly, on real sockets: a destination that fails
 * before its end is reported to the source by the codec (the link's ERROR frame) rather than by a bare close, and
 * bytes for a destination that has gone reset the source instead of vanishing.
 */
import assert from "node:assert/strict";
import { once } from "node:events";
import { connect, type Socket } from "node:net";
import { type TestContext, test } from "node:test";
import { type ChannelCodec, Relay } from "../../src/stream/relay.ts";
import type { TcpEndpoint } from "../../src/transport/endpoint.ts";
import { localServer, MiB } from "../support/fake-peers.ts";

const HOST = "127.0.0.1";

/** A destination that runs `onConnection` for each accepted socket. */
async function destination(t: TestContext, onConnection: (socket: Socket) => void): Promise<TcpEndpoint> {
  return (await localServer(t, onConnection)).endpoint;
}

/** The plain relay's codec, optionally with what it tells the source when the destination fails. */
function codec(options: { told?: string }): ChannelCodec {
  return {
    fromSource: (chunk) => ({ toUpstream: [chunk] }),
    sourceEnded: () => ({ endUpstream: true }),
    fromUpstream: (chunk) => ({ toSource: [chunk] }),
    upstreamEnded: () => ({ endSource: true }),
    ...(options.told
      ? { sideFailed: (side) => (side === "destination" ? [Buffer.from(options.told ?? "")] : undefined) }
      : {}),
  };
}

async function relayTo(t: TestContext, to: TcpEndpoint, channelCodec: ChannelCodec): Promise<Relay> {
  const relay = await Relay.start({
    listen: { host: HOST, port: 0 },
    to,
    createChannelCodec: () => channelCodec,
  });
  t.after(() => relay.close());
  return relay;
}

/** A source that connects, sends `first`, and records everything until its socket closes. */
function source(
  relay: Relay,
  first: Buffer,
): { socket: Socket; done: Promise<{ bytes: number; error?: string }> } {
  const socket = connect({ host: HOST, port: relay.address.port, allowHalfOpen: true });
  let bytes = 0;
  let error: string | undefined;
  socket.on("error", (e) => {
    error ??= (e as NodeJS.ErrnoException).code ?? e.message;
  });
  socket.on("data", (chunk: Buffer) => {
    bytes += chunk.length;
  });
  socket.once("connect", () => socket.write(first));
  // Not events.once: it would reject on the 'error' that a reset source sees.
  const done = new Promise<{ bytes: number; error?: string }>((resolve) =>
    socket.once("close", () => resolve({ bytes, ...(error ? { error } : {}) })),
  );
  return { socket, done };
}

test("a destination that resets before its end: the codec tells the source why, instead of a bare close", async (t) => {
  const to = await destination(t, (socket) => {
    socket.once("data", () => socket.resetAndDestroy());
  });
  const relay = await relayTo(t, to, codec({ told: "WHY" }));
  const { socket, done } = source(relay, Buffer.from("hello"));
  const replies: Buffer[] = [];
  socket.on("data", (chunk: Buffer) => replies.push(chunk));
  socket.once("end", () => socket.end());
  const got = await done;
  assert.equal(Buffer.concat(replies).toString(), "WHY");
  assert.equal(got.error, undefined, "told, then closed: not reset");
  const report = await relay.done;
  assert.match(report.error ?? "", /destination side of channel #0/);
});

test("bytes for a destination that closed after its end reset the source: they cannot arrive", async (t) => {
  const to = await destination(t, (socket) => {
    socket.once("data", () => {
      socket.end();
      setTimeout(() => socket.resetAndDestroy(), 50);
    });
  });
  const relay = await relayTo(t, to, codec({}));
  const { socket, done } = source(relay, Buffer.from("hello"));
  await once(socket, "end");
  // The destination's end has reached the source; once the destination is gone, the source sends more.
  await new Promise((resolve) => setTimeout(resolve, 200));
  // Like a QEMU still migrating: it keeps writing until its writes fail (bounded: at most 100 MiB).
  for (let i = 0; i < 100 && !socket.destroyed; i++) {
    socket.write(Buffer.alloc(MiB));
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
  const got = await done;
  assert.ok(got.error, "the source was reset");
  const report = await relay.done;
  // Either the write failed (EPIPE) or the destination had already gone: both name the destination side.
  assert.match(
    report.error ?? "",
    /destination side of channel #0|bytes for the destination after it had closed/,
  );
});
