/**
 * `vmprune send --drop free,cache` to `vmprune receive` over vmprune's link, on real guests whose page cache holds
 * files of the shared ext4 data disk: clean cache pages cross as references and are rebuilt by receive from the
 * disk. Oracle 1 (only free pages may differ between source and destination RAM: rebuilt cache pages must be
 * bit-exact) and oracle 2 (verify, file checksums) hold; when receive's disk does not hold what send saw
 * (blocks changed in between, forced here with a differing copy), receive NACKs and send answers with the page
 * from guest memory; a guest rewriting a file with fsync during the migration; and receive killed mid-migration:
 * the source keeps running and verifies, the destination never runs.
 */
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { copyFile, open, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { test } from "node:test";
import { dataFilePaths } from "../../src/lab/data-disk.ts";
import { LabPair } from "../../src/lab/lab-vm.ts";
import { migrateThroughLink } from "../../src/lab/link-oracle.ts";
import { againWhileQemuLoses } from "../../src/lab/prune-oracle.ts";
import { SendProcess } from "../../src/lab/send-process.ts";
import {
  CACHE_HEAVY_512M,
  MIXED_512M,
  type MixedWorkloadSizes,
  runMixedWorkload,
} from "../../src/lab/workloads.ts";
import { MigrationFailed, prepareIncoming, runMigration } from "../../src/qemu/migration.ts";

/**
 * sha256 of the data files the workload already read or mapped (so checking them adds no page cache) and of the
 * scratch files, as the guest reads them: from its page cache.
 */
async function dataChecksums(vm: LabPair["src"], sizes: MixedWorkloadSizes = MIXED_512M): Promise<string> {
  const files = dataFilePaths().slice(0, sizes.cacheFiles + sizes.mappedFiles);
  const command = `sha256sum ${files.join(" ")} /data/scratch/*.bin 2>/dev/null | sort`;
  const out = (await vm.agent.run(command, 120_000)).trim();
  assert.ok(out.split("\n").length >= files.length, `checksums of the data files: ${out.slice(0, 200)}`);
  return out;
}

for (const [qemu, kernel, workload, sizes] of [
  ["7.2", "6.1", "mixed", MIXED_512M],
  ["10.0", "6.12", "page-cache-heavy", CACHE_HEAVY_512M],
] as const)
  test(`QEMU ${qemu}, kernel ${kernel}, ${workload} guest: cache pages rebuilt from the shared disk; only free pages differ; files and verify match`, async (t) => {
    const pair = await LabPair.boot({ kernel, qemu, memoryMiB: 512 });
    t.after(() => pair.stop());
    await runMixedWorkload(pair.src.agent, sizes);
    const before = await dataChecksums(pair.src, sizes);
    // On 7.2, a run in which QEMU lost pages of its own is run again (againWhileQemuLoses): its destination may
    // crash from them. The RAM oracle holds on every run.
    const m = await againWhileQemuLoses(
      pair,
      () => migrateThroughLink(pair),
      (m, attempt) => {
        const p = m.send.prune;
        t.diagnostic(
          `attempt ${attempt}: refs ${p?.refs} (not on disk ${p?.cacheMisses}), dropped ${p?.pages.pruned}; receive ${JSON.stringify(m.receive.refs)}; ` +
            `locator ${JSON.stringify(m.send.cacheRefs)}; index ${JSON.stringify(m.send.diskIndex)}; link ${m.send.relay.channels[0]?.bytesToDestination} B, QEMU ${m.result.info.ram?.transferred} B; ${m.differing} differ, ${m.qemuUnsent.length} of them QEMU's own loss`,
        );
        assert.equal(m.result.status, "completed");
        assert.ok((p?.refs ?? 0) > sizes.cacheFiles * 3_000, "cache pages went as references");
        assert.equal(m.receive.refs.refsResolved, p?.refs, "receive rebuilt every reference from the disk");
        assert.equal(m.receive.refs.refsNacked, 0);
        // Placed by the guest kernel's own metadata (page → inode → extent), without reading the whole disk.
        assert.equal(m.send.diskIndex, null, "no content index was built");
        assert.equal(m.send.cacheRefs?.located, p?.refs, "every reference was placed by the locator");
        assert.deepEqual(m.differingNotFree, [], "rebuilt cache pages are bit-exact: only free pages differ");
      },
    );
    await m.dst.monitor.execute("cont");
    assert.match(await LabPair.verify(m.dst), /^OK/m);
    assert.equal(await dataChecksums(m.dst, sizes), before);
  });

// QEMU 10.0: the guest writes during the live migration, and QEMU 7.2 under TCG then leaves pages stale on its own
// (see ram-oracle.test.ts), which a RAM comparison cannot tell from a pruning error.
test("QEMU 10.0, kernel 6.12: receive's disk differs (NACKs answered from guest memory) while the guest rewrites a file with fsync", async (t) => {
  const pair = await LabPair.boot({ kernel: "6.12", qemu: "10.0", memoryMiB: 512 });
  t.after(() => pair.stop());
  await runMixedWorkload(pair.src.agent);
  const agent = pair.src.agent;
  // A file the guest keeps rewriting (fsync'd) during the migration; its last content's checksum is kept beside it.
  await agent.run(
    "dd if=/dev/urandom of=/data/scratch/rw.bin bs=4k count=2048 conv=fsync 2>/dev/null",
    60_000,
  );
  const before = await dataChecksums(pair.src);
  // receive's copy of the disk: one byte changed in every 32nd 4 KiB block, as if they had been rewritten.
  const copy = join(pair.diskDir, "receive.img");
  await copyFile(join(pair.diskDir, "data.img"), copy);
  const handle = await open(copy, "r+");
  const { size } = await handle.stat();
  for (let offset = 0; offset < size; offset += 32 * 4096)
    await handle.write(randomBytes(1), 0, 1, offset + 2048);
  await handle.close();
  const m = await migrateThroughLink(pair, {
    receiveDisk: copy,
    migration: { minPasses: 3 },
    during: () =>
      agent.run(
        "for i in 1 2 3; do dd if=/dev/urandom of=/data/scratch/rw.bin bs=4k count=2048 conv=notrunc,fsync 2>/dev/null; done; " +
          "sha256sum /data/scratch/rw.bin > /data/scratch/rw.sha; sync",
        120_000,
      ),
  });
  const r = m.receive.refs;
  t.diagnostic(`refs ${m.send.prune?.refs}; receive ${JSON.stringify(r)}; ${m.differing} differ`);
  assert.equal(m.result.status, "completed");
  assert.ok(r.refsNacked > 100, `receive NACKed references its disk could not confirm (${r.refsNacked})`);
  assert.equal(r.pagesReceived, r.refsNacked, "every NACK was answered with the page");
  assert.deepEqual(m.differingNotFree, [], "only free pages differ");
  await m.dst.monitor.execute("cont");
  assert.match(await LabPair.verify(m.dst), /^OK/m);
  assert.match(await m.dst.agent.run("sha256sum -c /data/scratch/rw.sha", 60_000), /OK/);
  const after = await dataChecksums(m.dst);
  const unchanged = (s: string) =>
    s
      .split("\n")
      .filter((l) => !l.includes("rw.bin"))
      .join("\n");
  assert.equal(unchanged(after), unchanged(before));
});

test("QEMU 10.0: vmprune receive killed mid-migration; the source keeps running and verifies; the destination never runs", async (t) => {
  const pair = await LabPair.boot({ kernel: "6.12", qemu: "10.0", memoryMiB: 512 });
  t.after(() => pair.stop());
  await runMixedWorkload(pair.src.agent);
  const key = join(pair.diskDir, "link.key");
  await writeFile(key, randomBytes(32));
  const disk = join(pair.diskDir, "data.img");
  const dst = await pair.startDestination();
  const dstUri = await prepareIncoming(dst.monitor, { incomingUri: "tcp:127.0.0.1:0" });
  const receive = await SendProcess.start({
    command: "receive",
    to: dstUri,
    extraArgs: ["--link-key", key, "--disk", disk],
  });
  t.after(() => receive.stop());
  const send = await SendProcess.start({
    to: `${receive.listen.host}:${receive.listen.port}`,
    extraArgs: [
      ...["--drop", "free,cache", "--qmp", pair.src.toolQmpPath, "--link-key", key, "--disk", disk],
      ...["--refs-when", "always"],
    ],
  });
  t.after(() => send.stop());
  let killedAt = 0;
  const failed = await runMigration(pair.src.monitor, send.uri, {
    capabilities: { "return-path": true },
    parameters: { "max-bandwidth": 48 * 1024 * 1024 },
    onProgress: (info) => {
      const sent = info.ram?.transferred ?? 0;
      if (!killedAt && sent > 32 * 1024 * 1024) {
        killedAt = sent;
        receive.kill("SIGKILL");
      }
    },
  }).then(
    () => null,
    (error: unknown) => error,
  );
  t.diagnostic(`receive killed after ${killedAt} bytes: ${String(failed)}`);
  assert.ok(killedAt > 0);
  assert.ok(failed instanceof MigrationFailed, "QEMU reports the migration failed");
  assert.equal((await pair.src.monitor.execute("query-status")).status, "running");
  assert.match(await LabPair.verify(pair.src), /^OK/m);
  if (dst.running) assert.notEqual((await dst.monitor.execute("query-status")).status, "running");
  const sent = await send.wait(30_000);
  assert.notEqual(sent.code, 0, "send reports the failure");
});
