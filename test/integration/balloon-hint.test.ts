/**
 * QEMU's own answer to free guest memory, as the prune benchmark (bench/prune.ts) compares against it: a lab guest
 * with a virtio-balloon device with free page hinting (QEMU 10.0, kernel 6.12). The guest binds its
 * virtio_balloon driver and negotiates VIRTIO_BALLOON_F_FREE_PAGE_HINT, QEMU answers query-balloon, and a live
 * migration of a guest after the mixed workload (source and destination with the same device) completes with the
 * destination running and passing `verify`.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { guestBalloon } from "../../src/lab/balloon.ts";
import { LabPair } from "../../src/lab/lab-vm.ts";
import { guestMeminfo, runMixedWorkload } from "../../src/lab/workloads.ts";

test("QEMU 10.0, kernel 6.12: the free-page-hint balloon is bound in the guest and migrates", async (t) => {
  const pair = await LabPair.boot({
    kernel: "6.12",
    qemu: "10.0",
    memoryMiB: 512,
    balloon: "free-page-hint",
  });
  t.after(() => pair.stop());
  const balloon = await guestBalloon(pair.src.agent);
  t.diagnostic(`guest balloon: ${JSON.stringify(balloon)}`);
  assert.ok(balloon, "the guest sees a virtio balloon device");
  assert.equal(balloon.driver, "virtio_balloon");
  assert.equal(balloon.freePageHint, true, "VIRTIO_BALLOON_F_FREE_PAGE_HINT negotiated");
  const actual = (await pair.src.monitor.executeUntyped("query-balloon")) as { actual: number };
  assert.equal(actual.actual, 512 * 1024 * 1024, "query-balloon: nothing inflated");

  await runMixedWorkload(pair.src.agent);
  const memFreeKiB = (await guestMeminfo(pair.src.agent)).MemFree ?? 0;
  const result = await pair.migratePlain();
  const ram = result.info.ram;
  t.diagnostic(
    `migration: ${result.info["total-time"]} ms, ${result.info.downtime} ms down, ${ram?.transferred} B, ` +
      `${ram?.normal} normal and ${ram?.duplicate} zero pages; guest had ${memFreeKiB >> 2} free pages`,
  );
  assert.equal(result.status, "completed");
  const dst = pair.dst;
  assert.ok(dst);
  assert.equal((await dst.monitor.execute("query-status")).status, "running");
  assert.match(await LabPair.verify(dst), /^OK [1-9]\d* checks/);
  // The device came along: the destination's QEMU and guest still have it.
  assert.equal(((await dst.monitor.executeUntyped("query-balloon")) as { actual: number }).actual, 512 << 20);
  assert.equal((await guestBalloon(dst.agent))?.driver, "virtio_balloon");
});
