/**
 * The report's measurements: throughput from a byte counter read on a timer, and a migration's guest pages by how
 * they travelled from QEMU's counters and send's pruning report.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";
import type { PruneReport } from "../../src/prune/pruning-processor.ts";
import type { MigrationInfo } from "../../src/qemu/qmp.ts";
import { pageTrafficOf } from "../../src/report/page-traffic.ts";
import { ThroughputSampler, throughputOf } from "../../src/report/throughput-sampler.ts";

test("throughputOf: the rate between consecutive readings, stamped at the later one; a counter reset is skipped", () => {
  const samples = throughputOf(
    [
      { atMs: 1000, bytes: 0 },
      { atMs: 1200, bytes: 20_000_000 },
      { atMs: 1400, bytes: 30_000_000 },
      { atMs: 1600, bytes: 5_000 }, // the counter went backwards
      { atMs: 1600, bytes: 6_000 }, // no time passed
      { atMs: 1800, bytes: 1_006_000 },
    ],
    1000,
  );
  assert.deepEqual(samples, [
    { tMs: 200, bytesPerSec: 100_000_000 },
    { tMs: 400, bytesPerSec: 50_000_000 },
    { tMs: 800, bytesPerSec: 5_000_000 },
  ]);
});

test("ThroughputSampler: reads the counter on its timer and once more at stop; a failing counter stops it", async () => {
  let bytes = 0;
  const sampler = new ThroughputSampler(() => {
    bytes += 1_000_000;
    return bytes;
  }, 10);
  sampler.start();
  await sleep(80);
  const samples = sampler.stop();
  assert.ok(samples.length >= 3, `${samples.length} samples in 80 ms at 10 ms`);
  assert.ok(samples.every((s) => s.bytesPerSec > 0));
  assert.ok(samples.every((s, i) => i === 0 || s.tMs > (samples[i - 1]?.tMs ?? 0)));
  const readsAtStop = bytes;
  await sleep(30);
  assert.equal(bytes, readsAtStop, "no reading after stop");

  let calls = 0;
  const failing = new ThroughputSampler(() => {
    if (++calls > 2) throw new Error("tx_bytes is gone");
    return calls * 1000;
  }, 5);
  failing.start();
  await sleep(40);
  assert.equal(failing.stop().length, 1);
  assert.match(failing.failure ?? "", /the byte counter could not be read: tx_bytes is gone/);
  assert.equal(calls, 3);
});

const ram = (normal: number, duplicate: number) =>
  ({
    transferred: 0,
    remaining: 0,
    total: 0,
    duplicate,
    normal,
    "normal-bytes": normal * 4096,
    "dirty-sync-count": 3,
    mbps: 0,
  }) satisfies MigrationInfo["ram"];

function prune(mode: PruneReport["mode"], pruned: number, refs: number, multifdPruned?: number): PruneReport {
  return {
    mode,
    drop: ["free", "cache"],
    judge: "6.1",
    degraded: null,
    pages: { seen: 100_000, pruned, byCategory: {} as PruneReport["pages"]["byCategory"] },
    bytesSaved: 0,
    refs,
    cacheMisses: 0,
    cacheWhole: 0,
    batches: 1,
    judgeMs: 1,
    unknownWarning: null,
    refused: {},
    ...(multifdPruned !== undefined
      ? {
          multifd: {
            channels: [],
            pagesJudged: 0,
            pagesPruned: multifdPruned,
            pagesReferenced: 0,
            bytesSaved: 0,
          },
        }
      : {}),
  };
}

test("pageTrafficOf: QEMU's full pages split into sent, free pruned and cache referenced by send's report", () => {
  const MiB = 1024 * 1024;
  // Plain QEMU: what it counted, zero pages apart, xbzrle pages when it sent deltas.
  assert.deepEqual(pageTrafficOf({ ram: ram(256 * 100, 256 * 5) }, null), {
    "sent whole": 100 * MiB,
    "zero page": 5 * MiB,
  });
  assert.deepEqual(pageTrafficOf({ ram: ram(256, 0), "xbzrle-cache": { pages: 512 } }, null), {
    "sent whole": MiB,
    "zero page": 0,
    "xbzrle delta": 2 * MiB,
  });
  // vmprune: 300 pages pruned of which 100 references on the main channel, 50 free pages on multifd channels.
  assert.deepEqual(pageTrafficOf({ ram: ram(1000, 10) }, prune("prune", 300, 100, 50)), {
    "sent whole": (1000 - 250 - 100) * 4096,
    "free, pruned": 250 * 4096,
    "cache, referenced": 100 * 4096,
    "zero page": 10 * 4096,
  });
  // A dry run and a passthrough change nothing on the wire.
  for (const mode of ["dry-run", "passthrough"] as const)
    assert.deepEqual(pageTrafficOf({ ram: ram(1000, 10) }, prune(mode, 300, 100)), {
      "sent whole": 1000 * 4096,
      "zero page": 10 * 4096,
    });
});
