/**
 * The switchover guard against real QEMUs, during a real (slow) migration of a booted guest to `exec:cat`:
 * - QEMU 10.0: far from the end (QEMU has more left than the link carries within the limit plus what the source
 *   can feed in 0.3 s) the relay may read far ahead and QEMU is held (avail-switchover-bandwidth 1000 B/s); near
 *   it, `avail-switchover-bandwidth` is the link's rate less the relay's read-ahead per downtime limit (half what
 *   the link carries within the limit, capped), never more than QEMU's own rate, follows a changed
 *   downtime-limit, and goes back to 0 at the end. Until a window is link-bound, the rate is what the link
 *   carried (send the slower side), and the same rules apply to it. While QEMU could not reach its pass end
 *   within the glide horizon even at its fastest, the read-ahead is larger by what the link carries meanwhile,
 *   and QEMU counts on that much less.
 * - QEMU 10.0, a guest that keeps dirtying memory and a faster migration: the hold lasts through pass ends (a
 *   hold of 1 B/s made QEMU's threshold 0, and QEMU then stopped the guest at the end of the first pass with
 *   everything dirtied meanwhile unsent).
 * - QEMU 7.2 (no such parameter): `downtime-limit` is lowered to limit × link rate / QEMU's measured rate while
 *   the migration is active, follows a limit the operator sets meanwhile, and is put back when the guard stops.
 * The migration is cancelled afterwards; the source keeps running and passes `verify`.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";
import { LabPair } from "../../src/lab/lab-vm.ts";
import type { QemuVersion } from "../../src/lab/qemu-binaries.ts";
import { workload } from "../../src/lab/workloads.ts";
import {
  HOLD_AVAIL_BYTES_PER_SECOND,
  READ_AHEAD_SHARE,
  SwitchoverGuard,
} from "../../src/migrate/switchover-guard.ts";
import { QmpClient } from "../../src/qemu/qmp.ts";

/** Slow enough that the migration stays active for the whole test (the guest has ~60 MiB of non-zero pages). */
const MAX_BANDWIDTH = 4_000_000;

async function parameters(qmp: QmpClient): Promise<Record<string, number>> {
  return (await qmp.executeUntyped("query-migrate-parameters")) as Record<string, number>;
}

/** Polls until `check` holds (QMP state the guard sets on its 100 ms ticks), or fails with the last value. */
async function until<T>(
  read: () => Promise<T>,
  check: (v: T) => boolean,
  what: string,
  timeoutMs = 5000,
): Promise<T> {
  let last: T | undefined;
  for (let i = 0; i < timeoutMs / 100; i++) {
    last = await read();
    if (check(last)) return last;
    await sleep(100);
  }
  assert.fail(`${what}: last ${JSON.stringify(last)}`);
}

/** Polls until QEMU's avail-switchover-bandwidth is `expected` (B/s), or fails with the last parameters. */
function untilAvail(qmp: QmpClient, expected: number, what: string): Promise<Record<string, number>> {
  return until(
    () => parameters(qmp),
    (p) => p["avail-switchover-bandwidth"] === expected,
    what,
  );
}

async function withMigratingGuest(
  qemu: QemuVersion,
  body: (pair: LabPair, tool: QmpClient) => Promise<void>,
  guest: { workload: string; maxBandwidth: number } = {
    workload: workload.anon("48M"),
    maxBandwidth: MAX_BANDWIDTH,
  },
): Promise<void> {
  const pair = await LabPair.boot({ kernel: "6.1", qemu, memoryMiB: 256 });
  try {
    await pair.src.agent.run(guest.workload, 120_000);
    const tool = await QmpClient.connect(pair.src.toolQmpPath);
    try {
      await pair.src.monitor.execute("migrate-set-parameters", { "max-bandwidth": guest.maxBandwidth });
      await pair.src.monitor.execute("migrate", { uri: "exec:cat > /dev/null" });
      await until(
        () => pair.src.monitor.execute("query-migrate"),
        (i) => i.status === "active" && (i.ram?.mbps ?? 0) > 0,
        "the migration is active and measured",
      );
      await body(pair, tool);
    } finally {
      await pair.src.monitor.execute("migrate_cancel").catch(() => undefined);
      tool.close();
    }
    await until(
      () => pair.src.monitor.execute("query-status"),
      (s) => s.status === "running",
      "the source runs again after the cancel",
    );
    assert.match(await LabPair.verify(pair.src), /^OK [1-9]\d* checks/);
  } finally {
    await pair.stop();
  }
}

test("QEMU 10.0: held far from the end; near it, avail-switchover-bandwidth is the link rate less the read-ahead, at most QEMU's rate; restored", async () => {
  await withMigratingGuest("10.0", async (pair, tool) => {
    assert.equal((await parameters(pair.src.monitor))["avail-switchover-bandwidth"], 0, "QEMU's default");
    let rate: number | undefined;
    let carried: number | undefined;
    let inflow: number | undefined;
    const readAheads: number[] = [];
    // A small read-ahead cap, so that it binds at limits QEMU cannot reach with what it has left.
    const maxReadAhead = 256 << 10;
    const guard = await SwitchoverGuard.start({
      qmp: tool,
      link: () => ({
        bytesPerSecond: rate,
        carriedBytesPerSecond: carried,
        inflowPeakBytesPerSecond: inflow,
      }),
      readAhead: { maxBytes: maxReadAhead, set: (bytes) => readAheads.push(bytes) },
    });
    assert.equal(guard.mode, "avail-switchover-bandwidth");
    await sleep(400);
    assert.equal(
      (await parameters(pair.src.monitor))["avail-switchover-bandwidth"],
      0,
      "no link-bound window yet: QEMU decides on its own",
    );
    assert.deepEqual(readAheads, [], "and the relay keeps its default bound");
    // The link carried 2 MB/s in a window, but never with bytes waiting throughout (send was the slower side):
    // the guard counts on what it carried. Far from the end, the hold; near it, 2 MB/s less its read-ahead.
    carried = 2_000_000;
    inflow = 0;
    await untilAvail(
      pair.src.monitor,
      HOLD_AVAIL_BYTES_PER_SECOND,
      "QEMU held on what the link carried, with no link-bound window",
    );
    inflow = 1e15;
    const nearEndCarried = Math.floor(2_000_000 * 0.3 * READ_AHEAD_SHARE);
    await untilAvail(
      pair.src.monitor,
      Math.round(2_000_000 - nearEndCarried / 0.3),
      `what the link carried, 2 MB/s, less ${nearEndCarried} B / 0.3 s`,
    );
    assert.equal(readAheads.at(-1), nearEndCarried);
    // A link-bound window, once there is one, is the rate (below, 1 MB/s: less than the link carried here).
    // Far from the end: a 1 MB/s link carries 0.3 MB within 300 ms, and QEMU has far more left.
    rate = 1_000_000;
    inflow = 0;
    await untilAvail(
      pair.src.monitor,
      HOLD_AVAIL_BYTES_PER_SECOND,
      "QEMU held while it has far more left than the link carries within the limit",
    );
    assert.equal(readAheads.at(-1), maxReadAhead, "the relay reads far ahead");
    // Near the end (the source could feed the relay everything left within the horizon), QEMU's default 300 ms:
    // the link carries 0.3 MB within the limit; READ_AHEAD_SHARE of it is the relay's. (QEMU writes about 4 MB/s.)
    inflow = 1e15;
    const nearEnd = Math.floor(1_000_000 * 0.3 * READ_AHEAD_SHARE);
    await untilAvail(
      pair.src.monitor,
      Math.round(1_000_000 - nearEnd / 0.3),
      `1 MB/s less ${nearEnd} B / 0.3 s`,
    );
    assert.equal(readAheads.at(-1), nearEnd);
    // QEMU still needs a while to reach its pass end even at the fastest it ever fed the relay (here ~0.25 s):
    // the relay may hold what the link carries meanwhile (less the glide horizon) on top of the near-end bound,
    // and QEMU may count on that much less.
    const remaining = (await pair.src.monitor.execute("query-migrate")).ram?.remaining ?? 0;
    assert.ok(remaining > 1_000_000, `QEMU has ${remaining} B left`);
    inflow = remaining / 0.25;
    const glided = await until(
      async () => ({ p: await parameters(pair.src.monitor), readAhead: readAheads.at(-1) ?? 0 }),
      ({ p, readAhead }) =>
        readAhead > nearEnd && (p["avail-switchover-bandwidth"] ?? 0) < Math.round(1_000_000 - nearEnd / 0.3),
      "a read-ahead above the near-end bound, and QEMU counting on less",
    );
    assert.ok(glided.readAhead < maxReadAhead, `${glided.readAhead} B: below the cap`);
    const expected = Math.round(1_000_000 - glided.readAhead / 0.3);
    const glidedAvail = glided.p["avail-switchover-bandwidth"] ?? 0;
    assert.ok(
      Math.abs(glidedAvail - expected) <= 0.1 * expected,
      `avail ${glidedAvail} B/s is the link rate less the read-ahead per limit (${expected})`,
    );
    // Back to QEMU that could finish at once: the near-end bound alone.
    inflow = 1e15;
    await untilAvail(pair.src.monitor, Math.round(1_000_000 - nearEnd / 0.3), "near-end bound again");
    assert.equal(readAheads.at(-1), nearEnd);
    // The operator lengthens the limit: the guard follows it (more read-ahead, same share).
    await pair.src.monitor.execute("migrate-set-parameters", { "downtime-limit": 1000 });
    await until(
      async () => readAheads.at(-1),
      (bytes) => bytes === Math.floor(1_000_000 * READ_AHEAD_SHARE),
      "the read-ahead is the share of 1 s at 1 MB/s",
    );
    // A link faster than the source: the read-ahead reaches its cap, and QEMU's own rate (its last window, about
    // MAX_BANDWIDTH) is the true one.
    rate = 50_000_000;
    const raised = await until(
      () => parameters(pair.src.monitor),
      (p) => (p["avail-switchover-bandwidth"] ?? 0) > 1_000_000,
      "raised once the link is faster",
    );
    assert.equal(readAheads.at(-1), maxReadAhead, "the read-ahead capped");
    const given = raised["avail-switchover-bandwidth"] ?? 0;
    assert.ok(
      given <= 2 * MAX_BANDWIDTH,
      `no more than QEMU writes (about ${MAX_BANDWIDTH} B/s), not the link's 49.7 MB/s: ${given}`,
    );
    assert.equal((await pair.src.monitor.execute("query-migrate")).status, "active");
    const report = await guard.stop();
    assert.equal(report.linkBytesPerSecond, 50_000_000);
    assert.equal(report.linkRateSource, "link-bound");
    assert.equal(report.lowestGivenBytesPerSecond, HOLD_AVAIL_BYTES_PER_SECOND, "the hold");
    assert.equal(report.readAheadBytes, maxReadAhead);
    assert.equal(report.peakReadAheadBytes, maxReadAhead);
    assert.ok(report.glidingTicks >= 1, `${report.glidingTicks} ticks glided`);
    assert.ok(
      (report.walkPeakBytesPerSecond ?? 0) > 0,
      `QEMU's remaining was seen falling: walk peak ${report.walkPeakBytesPerSecond} B/s`,
    );
    assert.ok(report.updates >= 3, `${report.updates} updates: the hold, near the end, raised`);
    assert.equal(report.errors, 0);
    assert.equal((await parameters(pair.src.monitor))["avail-switchover-bandwidth"], 0, "restored");
    assert.equal(
      (await parameters(pair.src.monitor))["downtime-limit"],
      1000,
      "the operator's limit untouched",
    );
  });
});

test("QEMU 10.0: the hold lasts through pass ends while the guest dirties memory", async () => {
  await withMigratingGuest(
    "10.0",
    async (pair, tool) => {
      // A link too slow for anything: the guard holds QEMU near the end as far from it.
      const guard = await SwitchoverGuard.start({
        qmp: tool,
        link: () => ({ bytesPerSecond: 1, inflowPeakBytesPerSecond: 1 }),
        readAhead: { maxBytes: 64 << 20, set: () => undefined },
      });
      try {
        await untilAvail(pair.src.monitor, HOLD_AVAIL_BYTES_PER_SECOND, "held");
        // Every pass ends with QEMU's estimate at 0; each is one more dirty sync. Three of them, still active.
        const info = await until(
          () => pair.src.monitor.execute("query-migrate"),
          (i) => i.status !== "active" || (i.ram?.["dirty-sync-count"] ?? 0) >= 4,
          "three pass ends",
          60_000,
        );
        assert.equal(info.status, "active", `held through the pass ends (${JSON.stringify(info.ram)})`);
      } finally {
        await guard.stop();
      }
    },
    // The guest dirties memory faster than QEMU may send it (32 MB/s), so every pass ends with pages to send
    // (QEMU rightly switches over at a pass end with nothing dirty at all) and lasts a second or so.
    { workload: workload.dirty("64M", "64M"), maxBandwidth: 32_000_000 },
  );
});

test("QEMU 7.2: downtime-limit scaled by link rate / QEMU's fastest rate while active, follows the operator, restored", async () => {
  await withMigratingGuest("7.2", async (pair, tool) => {
    assert.equal(
      (await parameters(pair.src.monitor))["avail-switchover-bandwidth"],
      undefined,
      "7.2 has none",
    );
    // QEMU writes at about MAX_BANDWIDTH; a link a quarter as fast means a quarter of the limit.
    let inflowPeak: number | undefined;
    const guard = await SwitchoverGuard.start({
      qmp: tool,
      link: () => ({ bytesPerSecond: MAX_BANDWIDTH / 4, inflowPeakBytesPerSecond: inflowPeak }),
    });
    assert.equal(guard.mode, "downtime-limit");
    const lowered = await until(
      () => parameters(pair.src.monitor),
      (p) => (p["downtime-limit"] ?? 300) < 300,
      "downtime-limit lowered",
    );
    const limit = lowered["downtime-limit"] ?? 0;
    assert.ok(limit >= 30 && limit <= 150, `about 300 / 4 ms, got ${limit}`);
    // The operator sets another limit meanwhile: the guard scales that one, and restores it.
    await pair.src.monitor.execute("migrate-set-parameters", { "downtime-limit": 1000 });
    await until(
      () => parameters(pair.src.monitor),
      (p) => (p["downtime-limit"] ?? 0) >= 100 && (p["downtime-limit"] ?? 0) <= 500,
      "the operator's 1000 ms scaled",
    );
    // Once the relay was fed 4x faster than QEMU's last window (a free stretch), that rate counts: 1000 / 16.
    inflowPeak = 4 * MAX_BANDWIDTH;
    await until(
      () => parameters(pair.src.monitor),
      (p) => (p["downtime-limit"] ?? 0) >= 40 && (p["downtime-limit"] ?? 0) <= 90,
      "scaled by the fastest QEMU has been",
    );
    const report = await guard.stop();
    assert.equal(report.mode, "downtime-limit");
    assert.ok((report.lowestDowntimeLimitMs ?? 300) < 300);
    assert.equal(
      (await parameters(pair.src.monitor))["downtime-limit"],
      1000,
      "the operator's limit restored",
    );
  });
});
