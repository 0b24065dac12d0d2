/**
 * `vmprune receive` as a service, with real QEMUs (10.0, kernel 6.12): one receive process, started with
 * `--allow-dir` and mutual x509 certificates (QEMU's layout), takes two live migrations at once, each `vmprune send --drop free --target NAME` feeding the
 * destination QEMU listening on `unix:DIR/NAME`. While they run, a client sending garbage and one that never
 * starts its handshake connect to the service: both are refused, and neither migration notices. Both oracles hold
 * for both guests (only free pages differ; the guests verify). Then `kill -9` of the service in the middle of a
 * third migration: the source QEMU's migration fails, and the source keeps running and verifies.
 */
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { once } from "node:events";
import { mkdir, rm } from "node:fs/promises";
import { connect } from "node:net";
import { join } from "node:path";
import { test } from "node:test";
import { LabPair } from "../../src/lab/lab-vm.ts";
import { prunedRamOracle } from "../../src/lab/prune-oracle.ts";
import { SendProcess } from "../../src/lab/send-process.ts";
import { RUN_ROOT } from "../../src/lab/vm.ts";
import { workload } from "../../src/lab/workloads.ts";
import type { ServedMigration } from "../../src/migrate/receive-service.ts";
import {
  LOOPBACK_PARAMETERS,
  MigrationFailed,
  prepareIncoming,
  runMigration,
  waitDestinationState,
} from "../../src/qemu/migration.ts";
import { makePki } from "../support/pki.ts";

const capabilities = { "return-path": true };

test("receive service: two live migrations at once into their named destinations, stray clients refused; kill -9 mid-migration leaves the source running", async (t) => {
  // Short: a unix socket path has at most 107 bytes.
  const dir = join(RUN_ROOT, `${process.pid}-svc-${randomBytes(3).toString("hex")}`);
  const incoming = join(dir, "in");
  await mkdir(incoming, { recursive: true });
  t.after(() => rm(dir, { recursive: true, force: true }));
  // The link is mutual x509 here, in QEMU's layout (send-unix.test.ts runs TLS-PSK with real QEMUs).
  await mkdir(join(dir, "pki"));
  const pki = makePki(join(dir, "pki"));

  const [a, b] = await Promise.all(
    ["a", "b"].map(() => LabPair.boot({ kernel: "6.12", qemu: "10.0", memoryMiB: 256 })),
  );
  assert.ok(a && b);
  t.after(() => Promise.all([a.stop(), b.stop()]));
  // Memory that was used and freed (free pages holding old bytes), and memory kept (verified afterwards).
  for (const pair of [a, b]) {
    await pair.src.agent.run(workload.churn("48M", 1), 120_000);
    await pair.src.agent.run(workload.anon("16M"), 120_000);
  }

  const servicePath = join(dir, "svc.sock");
  const service = await SendProcess.start({
    command: "receive",
    listen: `unix:${servicePath}`,
    extraArgs: ["--allow-dir", incoming, "--tls-creds", pki.server],
  });
  t.after(() => service.stop());

  /** A paused destination on unix:IN/NAME, and a send asking the service for NAME. */
  const prepare = async (pair: LabPair, name: string) => {
    const dst = await pair.startDestination({ paused: true });
    await prepareIncoming(dst.monitor, { incomingUri: `unix:${join(incoming, name)}`, capabilities });
    const send = await SendProcess.start({
      listen: `unix:${join(dir, `send-${name}`)}`,
      to: `unix:${servicePath}`,
      extraArgs: [
        ...["--tls-creds", pki.client, "--tls-hostname", "localhost"],
        ...["--target", name, "--drop", "free", "--qmp", pair.src.toolQmpPath],
      ],
    });
    t.after(() => send.stop());
    return { dst, send };
  };
  const [ma, mb] = await Promise.all([prepare(a, "a.sock"), prepare(b, "b.sock")]);

  // Strays: garbage, and a client that never speaks (cut by the service's 10 s handshake timeout).
  const garbage = connect({ path: servicePath });
  garbage.on("error", () => {});
  await once(garbage, "connect");
  garbage.write(randomBytes(64 * 1024));
  const silent = connect({ path: servicePath });
  silent.on("error", () => {});
  t.after(() => silent.destroy());
  const silentClosed = once(silent, "close");
  await once(silent, "connect");

  const results = await Promise.all(
    [
      [a, ma],
      [b, mb],
    ].map(async ([pair, m]) => {
      const p = pair as LabPair;
      const { dst, send } = m as typeof ma;
      const result = await runMigration(p.src.monitor, send.uri, {
        capabilities,
        parameters: LOOPBACK_PARAMETERS,
        timeoutMs: 300_000,
      });
      await waitDestinationState(dst.monitor, "paused", 60_000);
      return { result, sent: await send.wait(60_000) };
    }),
  );
  await silentClosed;
  for (const [i, { result, sent }] of results.entries()) {
    const pair = [a, b][i] as LabPair;
    assert.equal(result.status, "completed");
    assert.equal(sent.code, 0, sent.stderr);
    const prune = sent.report?.prune;
    t.diagnostic(
      `guest ${"ab"[i]}: pruned ${prune?.pages.pruned} of ${prune?.pages.seen} pages, link ${sent.report?.relay.channels[0]?.bytesToDestination} B`,
    );
    assert.ok((prune?.pages.pruned ?? 0) > 1000, "free pages were dropped");
    const dst = pair.dst;
    assert.ok(dst, "the destination exists");
    const oracle = await prunedRamOracle(pair.src, dst);
    assert.deepEqual(oracle.differingNotFree.slice(0, 10), [], "only free pages differ");
    await dst.monitor.execute("cont");
    assert.match(await LabPair.verify(dst), /^OK/m);
  }
  // The service printed one JSON line per migration, each into the destination its send named.
  const served = service.stdoutLines().map((line) => JSON.parse(line) as ServedMigration);
  assert.deepEqual(served.map((s) => s.destination).sort(), [
    `unix:${join(incoming, "a.sock")}`,
    `unix:${join(incoming, "b.sock")}`,
  ]);
  for (const s of served) assert.equal(s.relay.error, undefined, s.relay.error);
  const refusals = service.stderr.match(/refused .*/g) ?? [];
  t.diagnostic(`service refusals: ${refusals.join(" | ")}`);
  assert.equal(refusals.length, 2, "the garbage client and the silent one, nothing else");
  assert.match(service.stderr, /TLS handshake timeout/);
  assert.match(service.stderr, /send authenticated over TLSv1\.3/);

  // kill -9 of the service mid-migration: the source's migration fails, the source runs on and verifies.
  await a.promoteDestination();
  const third = await prepare(a, "a2.sock");
  const migration = runMigration(a.src.monitor, third.send.uri, {
    capabilities,
    parameters: { "max-bandwidth": 16 * 1024 * 1024 },
    timeoutMs: 300_000,
  }).then(
    () => "completed",
    (error: unknown) => (error instanceof MigrationFailed ? error.message : String(error)),
  );
  for (let i = 0; i < 600; i++) {
    const info = await a.src.monitor.execute("query-migrate");
    if ((info.ram?.transferred ?? 0) > 16 * 1024 * 1024) break;
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  service.kill("SIGKILL");
  const outcome = await migration;
  t.diagnostic(`after kill -9 of the service: ${outcome}`);
  assert.match(outcome, /failed/);
  assert.equal((await a.src.monitor.execute("query-status")).status, "running");
  assert.match(await LabPair.verify(a.src), /^OK/m, "the source keeps the guest, intact");
});
