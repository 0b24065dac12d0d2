/**
 * PassWalkMeter: the fastest the source QEMU's remaining fell between two samples of one pass; a pass end (the
 * remaining re-synced, dirty-sync-count up) and a remaining that grew never count.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { PassWalkMeter } from "../../src/migrate/pass-walk.ts";

test("the fastest fall within a pass, kept when a slower one follows", () => {
  const meter = new PassWalkMeter();
  meter.sample(0, 300_000_000, 1);
  assert.equal(meter.peakBytesPerSecond, undefined, "one sample is no rate");
  meter.sample(100, 290_000_000, 1); // 100 MB/s: dense pages, written as they go
  assert.equal(meter.peakBytesPerSecond, 100_000_000);
  meter.sample(200, 210_000_000, 1); // 800 MB/s: zero pages, a few bytes each on the wire
  assert.equal(meter.peakBytesPerSecond, 800_000_000);
  meter.sample(300, 205_000_000, 1);
  assert.equal(meter.peakBytesPerSecond, 800_000_000, "kept the fastest");
});

test("a pass end, a remaining that grew, or a missing figure is no fall", () => {
  const meter = new PassWalkMeter();
  meter.sample(0, 10_000_000, 1);
  meter.sample(100, 50_000_000, 2); // pass end: the bitmap re-synced, not a walk
  meter.sample(200, 60_000_000, 2); // the guest dirtied more than QEMU sent
  assert.equal(meter.peakBytesPerSecond, undefined);
  meter.sample(300, undefined, undefined); // a query-migrate without RAM figures ends the run
  meter.sample(400, 10_000_000, 2);
  assert.equal(meter.peakBytesPerSecond, undefined, "no fall across the gap");
  meter.sample(500, 5_000_000, 2);
  assert.equal(meter.peakBytesPerSecond, 50_000_000);
});
