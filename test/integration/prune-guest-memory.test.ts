/**
 * `vmprune send --drop free --guest-memory FILE` (no QMP socket) for a guest whose memory backend is not named
 * "ram0", QEMU 10.0, kernel 6.1, 1 vCPU, 512 MiB: send learns from the stream's block list which RAMBlock the
 * file holds, prunes free pages, and both pruning oracles hold (differing pages are free; the destination guest
 * verifies). Then the same guest again with a block name the stream does not have: pruning is refused before
 * any page is judged, naming the blocks, and the guest migrates unpruned and verifies.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { LabPair } from "../../src/lab/lab-vm.ts";
import { migrateThroughPruningSend } from "../../src/lab/prune-oracle.ts";
import { runMixedWorkload, workload } from "../../src/lab/workloads.ts";

/** Neither the lab's "ram0" nor QEMU's "pc.ram": what a libvirt guest's `<memoryBacking>` or an operator may use. */
const BACKEND_ID = "guest-mem";

test("QEMU 10.0, kernel 6.1, RAM backend 'guest-mem': send --guest-memory finds the block in the stream, prunes, the guest verifies; a wrong --ram-block is refused at once", async (t) => {
  const pair = await LabPair.boot({
    kernel: "6.1",
    qemu: "10.0",
    memoryMiB: 512,
    vcpus: 1,
    ramBackendId: BACKEND_ID,
  });
  t.after(() => pair.stop());
  await runMixedWorkload(pair.src.agent);

  const m = await migrateThroughPruningSend(pair, {
    sendArgs: ["--drop", "free", "--guest-memory", pair.src.ramPath],
  });
  const prune = m.sent.report?.prune;
  t.diagnostic(
    `pruned ${prune?.pages.pruned} of ${prune?.pages.seen} pages (${JSON.stringify(prune?.pages.byCategory)}), ` +
      `saved ${prune?.bytesSaved} B in ${prune?.batches} batches; ${m.differing} pages differ; ` +
      `unknown warning: ${prune?.unknownWarning ?? "none"}`,
  );
  assert.equal(m.result.status, "completed");
  assert.ok(prune, `send printed a pruning report (stderr: ${m.sent.stderr})`);
  assert.equal(prune.degraded, null, m.sent.stderr);
  assert.equal(prune.mode, "prune");
  assert.match(m.sent.stderr, new RegExp(`holds RAM block '${BACKEND_ID}'`), "send says which block it took");
  assert.ok(prune.pages.pruned > 10_000, `many free pages dropped (${prune.pages.pruned})`);
  // Only the firmware's and ROMs' few pages are outside the file: far below the warning's 1%.
  assert.ok(prune.pages.byCategory.unknown < prune.pages.seen / 100, JSON.stringify(prune.pages.byCategory));
  assert.equal(prune.unknownWarning, null);
  assert.deepEqual(m.differingNotFree, [], "only free pages may differ");
  assert.ok(m.differing > 1000, `dropped pages that held old data now differ (${m.differing})`);
  await m.dst.monitor.execute("cont");
  assert.match(await LabPair.verify(m.dst), /^OK/m, "the pruned guest verifies on the destination");

  // The destination goes on as the source; now send is told a block this stream does not have.
  await pair.promoteDestination();
  await pair.src.agent.run(workload.churn("64M", 1), 60_000);
  const refused = await migrateThroughPruningSend(pair, {
    sendArgs: ["--drop", "free", "--guest-memory", pair.src.ramPath, "--ram-block", "ram0"],
  });
  const off = refused.sent.report?.prune;
  t.diagnostic(`wrong --ram-block: ${off?.mode}: ${off?.degraded}`);
  assert.equal(refused.result.status, "completed");
  assert.ok(off, `send printed a pruning report (stderr: ${refused.sent.stderr})`);
  assert.equal(off.mode, "passthrough");
  assert.equal(off.batches, 0, "refused before any page was judged");
  assert.equal(off.pages.pruned, 0);
  assert.match(
    off.degraded ?? "",
    new RegExp(`RAM block 'ram0', but this migration sends '${BACKEND_ID}' \\(512 MiB\\)`),
  );
  assert.match(off.degraded ?? "", /--ram-block NAME/);
  assert.match(
    refused.sent.stderr,
    new RegExp(`'${BACKEND_ID}' \\(512 MiB\\).*passing the rest of the stream through`),
  );
  assert.equal(refused.differing, 0, "nothing pruned: the destination's RAM is the source's");
  await refused.dst.monitor.execute("cont");
  assert.match(await LabPair.verify(refused.dst), /^OK/m);
});
