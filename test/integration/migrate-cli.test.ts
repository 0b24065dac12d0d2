/**
 * `vmprune migrate` as an operator runs it, against lab VMs' second QMP sockets: a destination that is not waiting
 * for a migration is refused with a clear message; `--baseline` relays every byte; `--drop free` drops free pages,
 * reports them, and the guest runs and verifies on the destination.
 */
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { join } from "node:path";
import { test } from "node:test";
import { promisify } from "node:util";
import { LabPair } from "../../src/lab/lab-vm.ts";
import { REPO_ROOT } from "../../src/lab/paths.ts";
import { runMixedWorkload } from "../../src/lab/workloads.ts";
import type { MigrateReport } from "../../src/migrate/migrate.ts";

const execFileAsync = promisify(execFile);

function vmprune(args: string[]) {
  return execFileAsync("node", ["--import", "tsx", join(REPO_ROOT, "src/cli/main.ts"), ...args], {
    cwd: REPO_ROOT,
    timeout: 300_000,
  });
}

test("vmprune migrate: --baseline, --drop free and --drop free,cache migrations that verify; a destination not waiting is refused", async (t) => {
  const pair = await LabPair.boot({ kernel: "6.1", qemu: "10.0", memoryMiB: 512 });
  t.after(() => pair.stop());
  await runMixedWorkload(pair.src.agent);
  const bandwidth = String(8 * 1024 ** 3);

  const reports: MigrateReport[] = [];
  const disk = join(pair.diskDir, "data.img");
  for (const mode of [["--baseline"], ["--drop", "free"], ["--drop", "free,cache", "--disk", disk]]) {
    const dst = await pair.startDestination();
    const { stdout } = await vmprune([
      "migrate",
      "--src-qmp",
      pair.src.toolQmpPath,
      "--dst-qmp",
      dst.toolQmpPath,
      "--max-bandwidth",
      bandwidth,
      "--json",
      ...mode,
    ]);
    const report = JSON.parse(stdout) as MigrateReport;
    t.diagnostic(
      `${mode.join(" ")}: ${report.status} in ${report.totalTimeMs} ms (downtime ${report.downtimeMs} ms), ` +
        `${report.sourceBytes} B from QEMU, ${report.wireBytes} B on the wire, dropped ${report.prune?.pages.pruned ?? 0}`,
    );
    assert.equal(report.status, "completed");
    assert.equal(report.error, null);
    assert.equal(report.destinationStatus, "running");
    assert.match(await LabPair.verify(dst), /^OK/m);
    reports.push(report);
    if (reports.length === 1)
      // The destination now runs the guest: as a destination again it is refused, with the way out.
      await assert.rejects(
        vmprune([
          "migrate",
          "--src-qmp",
          pair.src.toolQmpPath,
          "--dst-qmp",
          dst.toolQmpPath,
          "--drop",
          "free",
        ]),
        /is 'running', not waiting for a migration: start it with -incoming defer/,
      );
    await pair.promoteDestination();
  }
  const [baseline, pruned, withCache] = reports;
  assert.equal(baseline?.mode, "baseline");
  assert.equal(baseline?.prune, null);
  assert.equal(pruned?.mode, "pruned");
  assert.ok((pruned?.prune?.pages.pruned ?? 0) > 10_000, "free pages dropped");
  assert.ok(
    (pruned?.wireBytes ?? 0) < (baseline?.wireBytes ?? 0) * 0.8,
    "the pruned migration put at least 20% fewer bytes on the wire",
  );
  // With the cache: vmprune receive ran beside the destination and rebuilt the references from the disk.
  assert.ok((withCache?.prune?.refs ?? 0) > 10_000, "cache pages went as references");
  assert.equal(withCache?.receive?.refsResolved, withCache?.prune?.refs);
  assert.ok(
    (withCache?.wireBytes ?? 0) < (pruned?.wireBytes ?? 0) * 0.9,
    "fewer bytes than free pages alone",
  );
});
