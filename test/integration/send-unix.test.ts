/**
 * A live migration on unix sockets end to end, as libvirt lays it out (`--migrateuri unix:///PATH`): the source
 * QEMU 10.0 migrates to `unix:` where `vmprune send` listens (mode and owner set), send talks the link to
 * `vmprune receive` on another unix socket, and receive feeds the destination QEMU's `-incoming unix:`. Before
 * the real send, a client sending plain QEMU bytes reaches receive and is refused: receive must go on serving.
 * The source is frozen (-S, RAM holds firmware only), so the stream is small and both RAM files can be compared
 * page by page afterwards. The link is TLS-PSK (the default with a key file): a tap between send and receive sees
 * a TLS handshake first, and never QEMU's stream magic "QEVM" in the bytes that cross.
 */
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { once } from "node:events";
import { existsSync, lstatSync } from "node:fs";
import { mkdir, rm, writeFile } from "node:fs/promises";
import { connect, createServer, type Server, type Socket } from "node:net";
import { join } from "node:path";
import { test } from "node:test";
import { LabPair } from "../../src/lab/lab-vm.ts";
import { compareRamFiles } from "../../src/lab/ram-compare.ts";
import { SendProcess } from "../../src/lab/send-process.ts";
import { RUN_ROOT } from "../../src/lab/vm.ts";
import type { ReceiveReport } from "../../src/migrate/link-receive.ts";
import { prepareIncoming, runMigration } from "../../src/qemu/migration.ts";

/** What a tap saw cross from send to receive: bytes, the first few, and whether QEMU's magic appeared. */
interface TapView {
  bytes: number;
  head: Buffer;
  sawQevm: boolean;
  connections: number;
}

/**
 * A unix-socket tap: forwards each connection to `to` both ways (half-closes too) and scans the send → receive
 * bytes for "QEVM" as they pass (with the last 3 bytes carried over, so a magic split across chunks is found).
 */
async function linkTap(path: string, to: string): Promise<{ server: Server; view: TapView }> {
  const view: TapView = { bytes: 0, head: Buffer.alloc(0), sawQevm: false, connections: 0 };
  const magic = Buffer.from("QEVM", "latin1");
  const server = createServer({ allowHalfOpen: true }, (fromSend: Socket) => {
    view.connections++;
    const toReceive = connect({ path: to, allowHalfOpen: true });
    let tail = Buffer.alloc(0);
    fromSend.on("data", (chunk: Buffer) => {
      view.bytes += chunk.length;
      if (view.head.length < 16) view.head = Buffer.concat([view.head, chunk]).subarray(0, 16);
      const window = Buffer.concat([tail, chunk]);
      if (window.includes(magic)) view.sawQevm = true;
      tail = window.subarray(Math.max(0, window.length - 3));
      toReceive.write(chunk);
    });
    toReceive.on("data", (chunk: Buffer) => fromSend.write(chunk));
    fromSend.on("end", () => toReceive.end());
    toReceive.on("end", () => fromSend.end());
    fromSend.on("error", () => toReceive.destroy());
    toReceive.on("error", () => fromSend.destroy());
    fromSend.on("close", () => toReceive.destroy());
    toReceive.on("close", () => fromSend.destroy());
  });
  await new Promise<void>((resolve) => server.listen(path, resolve));
  return { server, view };
}

test("QEMU 10.0: migration through send and receive on unix sockets over TLS-PSK; a refused client does not end receive", async (t) => {
  // Short: a unix socket path has at most 107 bytes.
  const dir = join(RUN_ROOT, `${process.pid}-ux-${randomBytes(3).toString("hex")}`);
  await mkdir(dir, { recursive: true });
  t.after(() => rm(dir, { recursive: true, force: true }));
  const key = join(dir, "link.key");
  await writeFile(key, randomBytes(32));

  const pair = await LabPair.boot({ kernel: "6.1", qemu: "10.0", memoryMiB: 128, frozen: true });
  t.after(() => pair.stop());
  const dst = await pair.startDestination();
  const capabilities = { "return-path": true };
  const qemuSocket = join(dir, "qemu.sock");
  await prepareIncoming(dst.monitor, { incomingUri: `unix:${qemuSocket}`, capabilities });

  const receiveSocket = join(dir, "receive.sock");
  const receive = await SendProcess.start({
    command: "receive",
    listen: `unix:${receiveSocket}`,
    to: `unix:${qemuSocket}`,
    extraArgs: ["--link-key", key, "--socket-mode", "0600"],
  });
  t.after(() => receive.stop());
  assert.deepEqual(receive.endpoint, { path: receiveSocket });
  assert.equal(lstatSync(receiveSocket).mode & 0o777, 0o600);

  // A client that sends what a QEMU would: refused at the handshake, before receive connects to QEMU.
  const stray = connect({ path: receiveSocket });
  stray.on("error", () => {});
  await once(stray, "connect");
  stray.write(Buffer.concat([Buffer.from("QEVM\0\0\0\x03", "latin1"), randomBytes(4096)]));
  await once(stray, "close");
  assert.ok(existsSync(receiveSocket), "receive still listens after refusing the stray client");

  const tapSocket = join(dir, "tap.sock");
  const tap = await linkTap(tapSocket, receiveSocket);
  t.after(() => tap.server.close());

  const sendSocket = join(dir, "send.sock");
  const send = await SendProcess.start({
    listen: `unix:${sendSocket}`,
    to: `unix:${tapSocket}`,
    extraArgs: ["--link-key", key, "--socket-mode", "0660", "--socket-owner", "root:root"],
  });
  t.after(() => send.stop());
  assert.equal(send.uri, `unix:${sendSocket}`);
  const stats = lstatSync(sendSocket);
  assert.equal(stats.mode & 0o777, 0o660);
  assert.deepEqual([stats.uid, stats.gid], [0, 0]);

  const result = await runMigration(pair.src.monitor, send.uri, { capabilities, timeoutMs: 120_000 });
  assert.equal(result.status, "completed");
  const sent = await send.wait(60_000);
  const received = await receive.wait(60_000);
  t.diagnostic(`send: ${sent.stderr.trim().split("\n").slice(-3).join(" | ")}`);
  t.diagnostic(`receive: ${received.stderr.trim().split("\n").slice(-3).join(" | ")}`);
  assert.equal(sent.code, 0, `send succeeded: ${sent.stderr}`);
  assert.equal(received.code, 0, `receive succeeded: ${received.stderr}`);
  const sendReport = sent.report;
  assert.ok(sendReport);
  assert.equal(sendReport.relay.error, undefined);
  const receiveReport = JSON.parse(received.stdout) as ReceiveReport;
  assert.equal(receiveReport.relay.error, undefined, "the refused client is not an error of the migration");
  assert.equal(receiveReport.relay.refused?.length, 1, JSON.stringify(receiveReport.relay.refused));
  const [main] = receiveReport.relay.channels;
  assert.ok(main);
  assert.equal(receiveReport.relay.channels.length, 1, "one channel: the real send's, as #0");
  assert.ok(main.bytesToDestination > 0);
  assert.ok(main.bytesToSource > 0, "QEMU's return path went back over the link");
  assert.equal(sendReport.stream?.ram.records.page, result.info.ram?.normal, "send parsed every page record");

  // The link was TLS 1.3 (PSK): the tap saw a TLS handshake record first and no QEMU stream magic at all,
  // although send read a QEMU stream (version 3, starting with QEVM) from the source.
  t.diagnostic(`tap: ${tap.view.bytes} bytes send → receive, head ${tap.view.head.toString("hex")}`);
  assert.equal(tap.view.connections, 1);
  assert.equal(sendReport.stream?.version, 3, "send read a QEMU migration stream");
  assert.ok(tap.view.bytes >= main.bytesToDestination, "everything receive fed QEMU crossed the tap");
  assert.equal(tap.view.head[0], 0x16, "the link starts with a TLS handshake record");
  assert.equal(tap.view.sawQevm, false, "no plaintext QEMU stream magic crossed the link");
  assert.match(sent.stderr, /authenticated over TLSv1\.3 TLS_AES_128_GCM_SHA256/);
  assert.match(received.stderr, /send authenticated over TLSv1\.3 TLS_AES_128_GCM_SHA256/);

  // The destination loaded the whole stream: its migration completed, and its RAM is the source's.
  const incoming = await dst.monitor.execute("query-migrate");
  assert.equal(incoming.status, "completed");
  // The source never ran (-S): the destination takes over its state, not yet started, instead of running it.
  assert.equal((await dst.monitor.execute("query-status")).status, "prelaunch");
  const diff = await compareRamFiles(pair.src.ramPath, dst.ramPath);
  assert.deepEqual(diff.differing, [], "destination RAM equals the (frozen) source's, page by page");
  for (const path of [sendSocket, receiveSocket])
    assert.equal(existsSync(path), false, `${path} removed when its relay was done`);
});
