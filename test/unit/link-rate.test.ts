/**
 * LinkRateMeter: the link's rate is the fastest the relay's upstream drained over a whole window during which
 * bytes waited at every sample; stretches without a backlog (the source was the slow side) never count. Beside
 * it, what the link carried: the fastest whole window, backlog or not.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { LinkRateMeter } from "../../src/migrate/link-rate.ts";

/** Feeds samples every `stepMs`: bytes sent at `bytesPerStep`, with `queued` bytes waiting. */
function feed(
  meter: LinkRateMeter,
  from: { atMs: number; sent: number },
  steps: number,
  stepMs: number,
  bytesPerStep: number,
  queued: number,
): { atMs: number; sent: number } {
  let { atMs, sent } = from;
  for (let i = 0; i < steps; i++) {
    atMs += stepMs;
    sent += bytesPerStep;
    meter.sample(atMs, { sentBytes: sent, queuedBytes: queued, receivedBytes: 0 });
  }
  return { atMs, sent };
}

test("no estimate until one whole window was link-bound", () => {
  const meter = new LinkRateMeter(500);
  let at = feed(meter, { atMs: 0, sent: 0 }, 4, 100, 12_000_000, 1 << 20); // 400 ms backlogged
  assert.equal(meter.bytesPerSecond, undefined, "400 ms of a 500 ms window");
  at = feed(meter, at, 2, 100, 12_000_000, 1 << 20);
  assert.ok(meter.bytesPerSecond !== undefined, "a whole window");
  assert.ok(Math.abs(meter.bytesPerSecond - 120_000_000) < 1, `120 MB/s, got ${meter.bytesPerSecond}`);
});

test("stretches without a backlog never count, however fast or slow they drained", () => {
  const meter = new LinkRateMeter(500);
  // The source was slow: the relay forwarded little, nothing waited. Not the link's rate.
  let at = feed(meter, { atMs: 0, sent: 0 }, 20, 100, 1_000_000, 0);
  assert.equal(meter.bytesPerSecond, undefined);
  // A backlog that comes and goes every other sample never spans a window.
  for (let i = 0; i < 20; i++) at = feed(meter, at, 1, 100, 12_000_000, i % 2 === 0 ? 4096 : 0);
  assert.equal(meter.bytesPerSecond, undefined);
  // A burst into empty buffers with no backlog (e.g. the kernel's send buffer filling) is not the rate either.
  at = feed(meter, at, 1, 100, 50_000_000, 0);
  assert.equal(meter.bytesPerSecond, undefined);
  // Then the link is the bottleneck for 800 ms.
  feed(meter, at, 8, 100, 12_000_000, 8 << 20);
  assert.ok(Math.abs((meter.bytesPerSecond ?? 0) - 120_000_000) < 1, `got ${meter.bytesPerSecond}`);
});

test("the estimate is the fastest link-bound window, and a slower later one does not lower it", () => {
  const meter = new LinkRateMeter(500);
  let at = feed(meter, { atMs: 0, sent: 0 }, 10, 100, 6_000_000, 1 << 20); // 60 MB/s (sharing the link)
  assert.ok(Math.abs((meter.bytesPerSecond ?? 0) - 60_000_000) < 1);
  at = feed(meter, at, 10, 100, 12_000_000, 1 << 20); // 120 MB/s
  assert.ok(Math.abs((meter.bytesPerSecond ?? 0) - 120_000_000) < 1);
  feed(meter, at, 10, 100, 3_000_000, 1 << 20);
  assert.ok(Math.abs((meter.bytesPerSecond ?? 0) - 120_000_000) < 1, "kept the fastest");
});

test("inflow peak: the fastest the source fed the relay between two samples, backlog or not", () => {
  const meter = new LinkRateMeter(500);
  assert.equal(meter.inflowPeakBytesPerSecond, undefined);
  meter.sample(0, { sentBytes: 0, queuedBytes: 0, receivedBytes: 0 });
  assert.equal(meter.inflowPeakBytesPerSecond, undefined, "one sample is no rate");
  meter.sample(100, { sentBytes: 0, queuedBytes: 0, receivedBytes: 38_000_000 });
  meter.sample(200, { sentBytes: 0, queuedBytes: 1, receivedBytes: 40_000_000 });
  assert.equal(meter.inflowPeakBytesPerSecond, 380_000_000);
});

test("carried: the fastest whole window, backlog or not, while the link-bound rate stays unknown", () => {
  const meter = new LinkRateMeter(500);
  // send is the slow side: its output comes in bursts, and the queue empties between them.
  let at = feed(meter, { atMs: 0, sent: 0 }, 4, 100, 2_000_000, 0);
  assert.equal(meter.carriedBytesPerSecond, undefined, "400 ms of a 500 ms window");
  for (let i = 0; i < 10; i++) at = feed(meter, at, 1, 100, 8_000_000, i % 2 === 0 ? 4096 : 0);
  assert.equal(meter.bytesPerSecond, undefined, "never link-bound for a whole window");
  assert.ok(
    Math.abs((meter.carriedBytesPerSecond ?? 0) - 80_000_000) < 1,
    `80 MB/s carried, got ${meter.carriedBytesPerSecond}`,
  );
  // A slower stretch does not lower it; a link-bound one is measured beside it.
  at = feed(meter, at, 10, 100, 1_000_000, 0);
  assert.ok(Math.abs((meter.carriedBytesPerSecond ?? 0) - 80_000_000) < 1, "kept the fastest");
  feed(meter, at, 6, 100, 11_000_000, 1 << 20);
  assert.ok(Math.abs((meter.bytesPerSecond ?? 0) - 110_000_000) < 1, `link-bound ${meter.bytesPerSecond}`);
  assert.ok(Math.abs((meter.carriedBytesPerSecond ?? 0) - 110_000_000) < 1, "carried follows it up");
});
