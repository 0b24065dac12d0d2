/**
 * bytesToKernel (src/transport/socket.ts), on a real TCP socket over loopback: with 32 MiB queued towards a peer
 * that reads nothing, then reads 8 MiB, it moves by what the kernel took meanwhile, at least what the peer read,
 * though most of the queue is still one writev in flight (which `bytesWritten - writableLength`, counted off only
 * when a whole writev completes, does not show). The link rate meters of the relay and of link-busy read it.
 */
import assert from "node:assert/strict";
import { once } from "node:events";
import { createServer, type Socket } from "node:net";
import { test } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";
import { bytesToKernel, connect } from "../../src/transport/socket.ts";

const MiB = 1024 * 1024;

test("bytesToKernel follows what the kernel took, not Node's writev steps", async (t) => {
  const accepted: Socket[] = [];
  const server = createServer({ pauseOnConnect: true }, (socket) => {
    accepted.push(socket);
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  t.after(() => {
    for (const s of accepted) s.destroy();
    server.close();
  });
  const address = server.address();
  assert.ok(address && typeof address === "object");
  const writer = connect({ host: "127.0.0.1", port: address.port });
  t.after(() => writer.destroy());
  await once(writer, "connect");
  const chunk = Buffer.alloc(64 * 1024, 0x33);
  for (let i = 0; i < (32 * MiB) / chunk.length; i++) writer.write(chunk);
  await sleep(100);
  const peer = accepted[0];
  assert.ok(peer, "accepted");
  const before = bytesToKernel(writer);
  assert.ok(before >= 0 && before < 32 * MiB, `${before} B: the kernel took part of the queue`);

  // The peer reads 8 MiB, then stops again.
  let read = 0;
  await new Promise<void>((resolve) => {
    peer.on("data", (data: Buffer) => {
      read += data.length;
      if (read >= 8 * MiB) {
        peer.pause();
        resolve();
      }
    });
    peer.resume();
  });
  await sleep(100);
  const after = bytesToKernel(writer);
  assert.ok(after >= read, `${after} B left this process: at least the ${read} B the peer read`);
  assert.ok(after - before >= read / 2, `moved by ${after - before} B while the peer read ${read} B`);
  assert.ok(writer.writableLength > 0, "with bytes still queued in this process");
});
