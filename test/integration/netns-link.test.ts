/**
 * The emulated link of the link benchmark (src/lab/shaped-link.ts): two network namespaces joined by a veth pair
 * shaped to 1 Gbit/s. Its measured rate is about the shaped one; a plain-QEMU live migration of a quiet 256 MiB
 * guest crosses it (source QEMU in the src namespace, destination in the dst namespace) and the guest passes
 * `verify` on the destination; afterwards neither namespace nor the veth pair exists any more.
 */
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { test } from "node:test";
import { run } from "../../src/lab/exec.ts";
import { LabPair } from "../../src/lab/lab-vm.ts";
import { listNamespaces, sweepStaleNamespaces } from "../../src/lab/netns.ts";
import { DST_IFNAME, ShapedLink, SRC_IFNAME } from "../../src/lab/shaped-link.ts";
import { workload } from "../../src/lab/workloads.ts";

test("shaped 1 Gbit/s link between two namespaces: measured rate, a plain migration across it, nothing left", async (t) => {
  await sweepStaleNamespaces();
  const link = await ShapedLink.create({ rateMbit: 1000 });
  const names = [link.src.name, link.dst.name];
  let pair: LabPair | undefined;
  try {
    t.diagnostic(await link.qdiscs());
    const rate = await link.measureRate(100_000_000);
    t.diagnostic(`100 MB in ${rate.ms.toFixed(0)} ms: ${rate.gbitPerSecond.toFixed(3)} Gbit/s`);
    assert.ok(
      rate.gbitPerSecond >= 0.5 && rate.gbitPerSecond <= 1.2,
      `measured ${rate.gbitPerSecond} Gbit/s over a 1 Gbit/s link`,
    );

    pair = await LabPair.boot({
      kernel: "6.1",
      qemu: "10.0",
      memoryMiB: 256,
      netns: { src: link.src.name, dst: link.dst.name },
    });
    await pair.src.agent.run(workload.anon("32M"), 120_000);
    await pair.src.agent.run(workload.tmpfs("8M"), 120_000);
    assert.match(await LabPair.verify(pair.src), /^OK [1-9]\d* checks/);

    const before = await link.txBytes();
    const result = await pair.migratePlain({
      incomingUri: `tcp:${link.dstIp}:0`,
      parameters: { "max-bandwidth": 1_250_000_000 },
    });
    const after = await link.txBytes();
    const transferred = result.info.ram?.transferred ?? 0;
    const totalMs = result.info["total-time"] ?? result.wallMs;
    const crossed = after.toDst - before.toDst;
    t.diagnostic(
      `migration over ${result.uri}: ${transferred} B ram.transferred, ${crossed} B on the link, ` +
        `${totalMs} ms total, ${result.info.downtime} ms down, ${((transferred * 8) / (totalMs / 1000) / 1e9).toFixed(3)} Gbit/s`,
    );
    assert.ok(result.uri.includes(link.dstIp), `the source migrated to ${result.uri}`);
    // The stream really crossed the link (frames carry it plus headers), and no faster than the link allows.
    assert.ok(crossed >= transferred, `${crossed} B on the link for ${transferred} B of stream`);
    assert.ok(
      (transferred * 8) / (totalMs / 1000) <= 1.2e9,
      `${transferred} B in ${totalMs} ms is faster than a 1 Gbit/s link`,
    );
    const dst = pair.dst;
    assert.ok(dst, "a destination after the migration");
    assert.match(await LabPair.verify(dst), /^OK [1-9]\d* checks/);
  } finally {
    await pair?.stop();
    await link.destroy();
  }

  const left = await listNamespaces();
  for (const name of names) {
    assert.ok(!left.includes(name), `namespace ${name} was deleted`);
    assert.ok(!existsSync(`/run/netns/${name}`), `/run/netns/${name} is gone`);
  }
  // The veth ends only ever existed inside the two namespaces; none may have surfaced here either.
  const links = await run("ip", ["-o", "link", "show"]);
  for (const ifname of [SRC_IFNAME, DST_IFNAME]) assert.ok(!links.includes(`${ifname}`), `${ifname} is gone`);
});
