/**
 * A live migration on unix sockets end to end, as libvirt lays it out (`--migrateuri unix:///PATH`): the source
 * QEMU 10.0 migrates to `unix:` where `vmprune send` listens (mode and owner set), send talks the link to
 * `vmprune receive` on another unix socket, and receive feeds the destination QEMU's `-incoming unix:`. Before
 * the real send, a client sending plain QEMU bytes reaches receive and is refused: receive must go on serving.
 * The source is frozen (-S, RAM holds firmware only), so the stream is small and both RAM files can be compared
 * page by page afterwards.
 */
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { once } from "node:events";
import { existsSync, lstatSync } from "node:fs";
import { mkdir, rm, writeFile } from "node:fs/promises";
import { connect } from "node:net";
import { join } from "node:path";
import { test } from "node:test";
import { LabPair } from "../../src/lab/lab-vm.ts";
import { compareRamFiles } from "../../src/lab/ram-compare.ts";
import { SendProcess } from "../../src/lab/send-process.ts";
import type { ReceiveReport } from "../../src/migrate/link-receive.ts";
import { prepareIncoming, runMigration } from "../../src/qemu/migration.ts";
import { RUN_ROOT } from "../../src/qemu/vm.ts";

test("QEMU 10.0: migration through send and receive on unix sockets; a refused client does not end receive", async (t) => {
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

  const sendSocket = join(dir, "send.sock");
  const send = await SendProcess.start({
    listen: `unix:${sendSocket}`,
    to: `unix:${receiveSocket}`,
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
