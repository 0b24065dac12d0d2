/**
 * bytesToKernel (src/transport/socket.ts), on real sockets over loopback, plain TCP and the link's TLS 1.3: with
 * 32 MiB queued towards a peer that reads nothing, then reads 8 MiB, it moves by what the kernel took meanwhile, at
 * least what the peer read, though most of the queue is still one writev in flight (which `bytesWritten -
 * writableLength`, counted off only when a whole writev completes, does not show; nor do a TLS socket's own
 * handle's counters). The link rate meters of the relay and of link-busy read it.
 */
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { once } from "node:events";
import type { Socket } from "node:net";
import { test } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";
import { bytesToKernel, connect } from "../../src/transport/socket.ts";
import { type LinkSecurity, tlsClientOptions, tlsServer } from "../../src/transport/tls.ts";
import { localServer, MiB } from "../support/fake-peers.ts";

for (const mode of ["plain TCP", "TLS"] as const) {
  test(`bytesToKernel follows what the kernel took, not Node's writev steps (${mode})`, async (t) => {
    const security: LinkSecurity = { mode: "psk", key: randomBytes(32) };
    const secure = mode === "TLS" ? tlsServer(security) : undefined;
    const accepted: Promise<Socket>[] = [];
    const { endpoint } = await localServer(
      t,
      (raw) => accepted.push(secure ? secure(raw) : Promise.resolve(raw)),
      { pauseOnConnect: true },
    );
    const tls = secure ? tlsClientOptions(security, endpoint) : undefined;
    const writer = connect(endpoint, tls ? { tls } : {});
    t.after(() => writer.destroy());
    await once(writer, tls ? "secureConnect" : "connect");
    const peer = await accepted[0];
    assert.ok(peer, "accepted");
    peer.pause();
    const chunk = Buffer.alloc(64 * 1024, 0x33);
    for (let i = 0; i < (32 * MiB) / chunk.length; i++) writer.write(chunk);
    await sleep(100);
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
}
