/**
 * Pruning when things go wrong, on real guests:
 * - `vmprune send` killed mid-migration: QEMU reports the migration failed, the destination is never resumed,
 *   the source keeps running and passes `verify`, and a second pruned migration succeeds (both oracles).
 * - xbzrle on at the start: `send --drop free` refuses, naming the capability (invariant 3).
 * - xbzrle turned on after `send` started: the first XBZRLE delta after pages were zeroed fails the migration
 *   (rather than let the destination apply a delta to a zeroed page); the source keeps running and verifies.
 * - guest memory that is not a Linux guest's (random bytes): `send` degrades to a passthrough, says why, and the
 *   migration completes with the stream unchanged (invariant 4).
 */
import assert from "node:assert/strict";
import { randomBytes, randomFillSync } from "node:crypto";
import { mkdir, rm, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { test } from "node:test";
import { LabPair } from "../../src/lab/lab-vm.ts";
import { migrateThroughPruningSend } from "../../src/lab/prune-oracle.ts";
import { SendProcess } from "../../src/lab/send-process.ts";
import { RUN_ROOT } from "../../src/lab/vm.ts";
import { runMixedWorkload, workload } from "../../src/lab/workloads.ts";
import {
  LOOPBACK_PARAMETERS,
  MigrationFailed,
  prepareIncoming,
  runMigration,
  waitRunning,
} from "../../src/qemu/migration.ts";

const MiB = 1024 * 1024;

test("QEMU 7.2: send killed mid-migration; the source keeps running and verifies; a second migration succeeds", async (t) => {
  const pair = await LabPair.boot({ kernel: "6.1", qemu: "7.2", memoryMiB: 512 });
  t.after(() => pair.stop());
  await runMixedWorkload(pair.src.agent);
  const dst = await pair.startDestination();
  const dstUri = await prepareIncoming(dst.monitor, { incomingUri: "tcp:127.0.0.1:0" });
  const send = await SendProcess.start({
    to: dstUri,
    extraArgs: ["--drop", "free", "--qmp", pair.src.toolQmpPath],
  });
  t.after(() => send.stop());
  let killedAt = 0;
  const failed = await runMigration(pair.src.monitor, send.uri, {
    // Slow enough that the kill lands in the middle.
    parameters: { "max-bandwidth": 64 * MiB },
    onProgress: (info) => {
      const sent = info.ram?.transferred ?? 0;
      if (!killedAt && sent > 48 * MiB) {
        killedAt = sent;
        send.kill("SIGKILL");
      }
    },
  }).then(
    () => null,
    (error: unknown) => error,
  );
  t.diagnostic(`killed send after ${killedAt} bytes; migration: ${String(failed)}`);
  assert.ok(killedAt > 0, "send was killed while the migration ran");
  assert.ok(failed instanceof MigrationFailed, "QEMU reports the migration failed");
  assert.equal((await pair.src.monitor.execute("query-status")).status, "running");
  assert.match(await LabPair.verify(pair.src), /^OK/m);
  // The destination never runs the guest: it gave up on the stream (QEMU exits), or still waits for it.
  if (dst.running) assert.notEqual((await dst.monitor.execute("query-status")).status, "running");

  const again = await migrateThroughPruningSend(pair);
  assert.equal(again.result.status, "completed");
  assert.ok((again.sent.report?.prune?.pages.pruned ?? 0) > 10_000);
  assert.deepEqual(again.differingNotFree, []);
  await again.dst.monitor.execute("cont");
  assert.match(await LabPair.verify(again.dst), /^OK/m);
});

test("QEMU 10.0: xbzrle refused at the start, failed safely when turned on later; garbage guest memory degrades to passthrough", async (t) => {
  const pair = await LabPair.boot({ kernel: "6.12", qemu: "10.0", memoryMiB: 512 });
  t.after(() => pair.stop());
  await runMixedWorkload(pair.src.agent);
  await pair.src.agent.run(workload.dirty("8M", "16M"), 60_000);
  const src = pair.src.monitor;
  const setXbzrle = (state: boolean) =>
    src.execute("migrate-set-capabilities", { capabilities: [{ capability: "xbzrle", state }] });

  // 1. xbzrle on: send refuses before it listens.
  await setXbzrle(true);
  await assert.rejects(
    SendProcess.start({ to: "127.0.0.1:9", extraArgs: ["--drop", "free", "--qmp", pair.src.toolQmpPath] }),
    /xbzrle capability on/,
  );

  // 2. xbzrle turned on after send started: pages are zeroed in pass 1, deltas follow: the migration fails.
  await setXbzrle(false);
  {
    const dst = await pair.startDestination();
    const dstUri = await prepareIncoming(dst.monitor, {
      incomingUri: "tcp:127.0.0.1:0",
      capabilities: { xbzrle: true, "return-path": true },
    });
    const send = await SendProcess.start({
      to: dstUri,
      extraArgs: ["--drop", "free", "--qmp", pair.src.toolQmpPath],
    });
    t.after(() => send.stop());
    const failed = await runMigration(src, send.uri, {
      // With the return path the source waits for the destination's verdict; without it, a stream cut after the
      // source wrote its last byte would look "completed" to the source (QEMU's own semantics).
      capabilities: { xbzrle: true, "return-path": true },
      parameters: LOOPBACK_PARAMETERS,
      minPasses: 4,
    }).then(
      () => null,
      (error: unknown) => error,
    );
    const sent = await send.wait(60_000);
    t.diagnostic(
      `xbzrle turned on later: ${String(failed)}; send: ${sent.report?.relay.error ?? sent.stderr.slice(-300)}`,
    );
    assert.ok(failed instanceof MigrationFailed, "the migration failed");
    assert.match(sent.report?.relay.error ?? "", /XBZRLE delta after vmprune had zeroed/);
    assert.equal((await src.execute("query-status")).status, "running");
    assert.match(await LabPair.verify(pair.src), /^OK/m);
    await setXbzrle(false);
  }

  // 3. Random bytes instead of a Linux guest's memory: passthrough, with the reason, and the migration completes.
  const dir = join(RUN_ROOT, `${process.pid}-garbage-${randomBytes(3).toString("hex")}`);
  await mkdir(dir, { recursive: true });
  t.after(() => rm(dir, { recursive: true, force: true }));
  const garbage = join(dir, "random.ram");
  await writeFile(garbage, randomFillSync(Buffer.alloc(64 * MiB)));
  const dst = await pair.startDestination();
  const dstUri = await prepareIncoming(dst.monitor, { incomingUri: "tcp:127.0.0.1:0" });
  const send = await SendProcess.start({
    to: dstUri,
    extraArgs: ["--drop", "free", "--guest-memory", garbage],
  });
  t.after(() => send.stop());
  const result = await runMigration(src, send.uri, { parameters: LOOPBACK_PARAMETERS });
  await waitRunning(dst.monitor);
  const sent = await send.wait(60_000);
  const prune = sent.report?.prune;
  const main = sent.report?.relay.channels[0];
  t.diagnostic(`garbage memory: ${prune?.mode}: ${prune?.degraded}`);
  assert.equal(result.status, "completed");
  assert.equal(prune?.mode, "passthrough");
  assert.match(
    prune?.degraded ?? "",
    /guest introspection unavailable .*VMCOREINFO.*migrating without pruning/,
  );
  assert.equal(prune?.pages.pruned, 0);
  assert.equal(main?.bytesToDestination, main?.bytesFromSource);
  assert.match(await LabPair.verify(dst), /^OK/m);
});
