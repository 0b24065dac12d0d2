/**
 * Stand-ins for the two QEMUs around a relay, on real sockets: a destination that listens and answers, a source
 * that connects and sends a stream-like payload. They stand in only for QEMU's socket behaviour (connect, send,
 * half-close, a return path); tests of what QEMU does with the bytes boot real QEMUs (test/integration).
 */
import { randomBytes } from "node:crypto";
import { once } from "node:events";
import { mkdtempSync, rmSync } from "node:fs";
import { connect, createServer, type Server, type Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { TestContext } from "node:test";

export const MiB = 1024 * 1024;

export function tempDir(t: TestContext): string {
  const dir = mkdtempSync(join(tmpdir(), "vmprune-test-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

export interface FakeDestination {
  server: Server;
  sockets: Socket[];
  /** What each accepted connection received until its EOF, in accept order. */
  received: Promise<Buffer>[];
}

/**
 * A destination listening on a unix socket: answers "PONG" once it has 1 MiB of a connection's bytes (a return
 * path while the source still sends), and ends its side after the source's EOF.
 */
export async function fakeDestination(t: TestContext, path: string): Promise<FakeDestination> {
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
  await new Promise<void>((resolve) => server.listen(path, resolve));
  t.after(() => {
    for (const socket of sockets) socket.destroy();
    server.close();
  });
  return { server, sockets, received };
}

/**
 * Connects to a unix socket, writes `payload` (honouring backpressure), half-closes; resolves with the replies
 * once the socket has closed, with `error` set if it did not end cleanly (a refused connection is cut).
 */
export async function sourceSends(
  path: string,
  payload: Buffer,
): Promise<{ replies: Buffer; error?: string }> {
  const socket = connect({ path, allowHalfOpen: true });
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
  for (let at = 0; at < payload.length && !socket.destroyed; at += MiB)
    if (!socket.write(payload.subarray(at, at + MiB)))
      await new Promise<void>((resolve) => {
        socket.once("drain", resolve);
        socket.once("close", resolve);
      });
  if (!socket.destroyed) socket.end();
  await closed;
  return { replies: Buffer.concat(replies), ...(error ? { error } : {}) };
}

/** A migration stream's opening (QEVM, version 3) then random bytes: send's parser passes the rest through. */
export function fakeStream(bytes: number): Buffer {
  const head = Buffer.from([0x51, 0x45, 0x56, 0x4d, 0, 0, 0, 3]);
  return Buffer.concat([head, randomBytes(bytes - head.length)]);
}
