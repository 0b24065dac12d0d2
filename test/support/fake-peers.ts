/**
 * Stand-ins for the two QEMUs around a relay, on real sockets: a destination that listens and answers, a source
 * that connects and sends a stream-like payload. They stand in only for QEMU's socket behaviour (connect, send,
 * half-close, a return path); tests of what QEMU does with the bytes boot real QEMUs (test/integration).
 */
import { randomBytes } from "node:crypto";
import { once } from "node:events";
import { mkdtempSync, rmSync } from "node:fs";
import { connect, createServer, type Server, type ServerOpts, type Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { TestContext } from "node:test";
import { type Endpoint, isUnixEndpoint, type TcpEndpoint } from "../../src/transport/endpoint.ts";

export const MiB = 1024 * 1024;

export function tempDir(t: TestContext): string {
  const dir = mkdtempSync(join(tmpdir(), "vmprune-test-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/**
 * A TCP server on 127.0.0.1 (any port) for one test, half-open by default: `onConnection` gets each accepted
 * socket (an error on it is the test's to check, never an uncaught one); the server and its sockets go when the
 * test ends.
 */
export async function localServer(
  t: TestContext,
  onConnection: (socket: Socket, index: number) => void,
  options: ServerOpts = {},
): Promise<{ endpoint: TcpEndpoint; server: Server; sockets: Socket[] }> {
  const sockets: Socket[] = [];
  const server = createServer({ allowHalfOpen: true, ...options }, (socket) => {
    socket.on("error", () => {});
    sockets.push(socket);
    onConnection(socket, sockets.length - 1);
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  t.after(() => {
    for (const socket of sockets) socket.destroy();
    server.close();
  });
  const address = server.address();
  if (!address || typeof address !== "object") throw new Error("the test server has no TCP address");
  return { endpoint: { host: "127.0.0.1", port: address.port }, server, sockets };
}

export interface FakeDestination {
  server: Server;
  sockets: Socket[];
  /** What each accepted connection received until its EOF, in accept order. */
  received: Promise<Buffer>[];
  /** Where it listens (a TCP port 0 resolved). */
  endpoint: Endpoint;
}

/** A unix socket path as an endpoint; an endpoint as it is. */
function endpointOf(at: string | Endpoint): Endpoint {
  return typeof at === "string" ? { path: at } : at;
}

/**
 * A destination listening on a unix socket path (or any endpoint; default TCP 127.0.0.1, any port): answers
 * "PONG" once it has 1 MiB of a connection's bytes (a return path while the source still sends), and ends its
 * side after the source's EOF.
 */
export async function fakeDestination(
  t: TestContext,
  at: string | Endpoint = { host: "127.0.0.1", port: 0 },
): Promise<FakeDestination> {
  const sockets: Socket[] = [];
  const received: Promise<Buffer>[] = [];
  const server = createServer({ allowHalfOpen: true }, (socket) => {
    socket.on("error", () => {});
    sockets.push(socket);
    const chunks: Buffer[] = [];
    let got = 0;
    socket.on("data", (chunk: Buffer) => {
      if (got < MiB && got + chunk.length >= MiB) socket.write("PONG");
      got += chunk.length;
      chunks.push(chunk);
    });
    received.push(
      once(socket, "end").then(() => {
        socket.end();
        return Buffer.concat(chunks);
      }),
    );
  });
  const listen = endpointOf(at);
  await new Promise<void>((resolve) =>
    isUnixEndpoint(listen)
      ? server.listen(listen.path, resolve)
      : server.listen(listen.port, listen.host, resolve),
  );
  t.after(() => {
    for (const socket of sockets) socket.destroy();
    server.close();
  });
  const address = server.address();
  const endpoint: Endpoint =
    !isUnixEndpoint(listen) && address && typeof address === "object"
      ? { host: listen.host, port: address.port }
      : listen;
  return { server, sockets, received, endpoint };
}

/** A promise and the call that settles it (Node 20 has no Promise.withResolvers). */
export function signal(): { promise: Promise<void>; fire: () => void } {
  let fire = () => {};
  const promise = new Promise<void>((resolve) => {
    fire = resolve;
  });
  return { promise, fire };
}

/**
 * Connects to a unix socket path (or any endpoint), writes `payload` (honouring backpressure), half-closes;
 * resolves with the replies once the socket has closed, with `error` set if it did not end cleanly (a refused
 * connection is cut). `connected` is called once connected; the half-close waits for `endAfter` (a source that
 * keeps its main channel open while its multifd channels connect, as QEMU does).
 */
export async function sourceSends(
  to: string | Endpoint,
  payload: Buffer,
  options: { connected?: () => void; endAfter?: Promise<unknown> } = {},
): Promise<{ replies: Buffer; error?: string }> {
  const endpoint = endpointOf(to);
  const socket = isUnixEndpoint(endpoint)
    ? connect({ path: endpoint.path, allowHalfOpen: true })
    : connect({ host: endpoint.host, port: endpoint.port, allowHalfOpen: true });
  let error: string | undefined;
  socket.on("error", (e) => {
    error ??= e.message;
  });
  const replies: Buffer[] = [];
  socket.on("data", (chunk: Buffer) => replies.push(chunk));
  socket.on("end", () => socket.destroy());
  const closed = new Promise<void>((resolve) => socket.once("close", () => resolve()));
  await new Promise<void>((resolve) => {
    socket.once("connect", resolve);
    socket.once("close", resolve);
  });
  options.connected?.();
  for (let at = 0; at < payload.length && !socket.destroyed; at += MiB)
    if (!socket.write(payload.subarray(at, at + MiB)))
      await new Promise<void>((resolve) => {
        socket.once("drain", resolve);
        socket.once("close", resolve);
      });
  await options.endAfter;
  if (!socket.destroyed) socket.end();
  await closed;
  return { replies: Buffer.concat(replies), ...(error ? { error } : {}) };
}

/** A migration stream's opening (QEVM, version 3) then random bytes: send's parser passes the rest through. */
export function fakeStream(bytes: number): Buffer {
  const head = Buffer.from([0x51, 0x45, 0x56, 0x4d, 0, 0, 0, 3]);
  return Buffer.concat([head, randomBytes(bytes - head.length)]);
}
