/**
 * `vmprune migrate` as an operator runs it, against lab VMs' second QMP sockets: a destination that is not waiting
 * for a migration is refused with a clear message; `--baseline` relays every byte; `--drop free` drops free pages,
 * reports them, and the guest runs and verifies on the destination; `--drop free,cache` also rebuilds cache pages
 * through receive, and its `--report` page (against the baseline's JSON, `--compare`) is looked at in headless
 * Chromium (test/support/report-screenshot.ts).
 */
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { promisify } from "node:util";
import { LabPair } from "../../src/lab/lab-vm.ts";
import { REPO_ROOT } from "../../src/lab/paths.ts";
import { MIXED_512M, runMixedWorkload, workload } from "../../src/lab/workloads.ts";
import type { MigrateReport } from "../../src/migrate/migrate.ts";
import { checkReportScreenshot, requireChromium } from "../support/report-screenshot.ts";

const execFileAsync = promisify(execFile);

function vmprune(args: string[]) {
  return execFileAsync("node", ["--import", "tsx", join(REPO_ROOT, "src/cli/main.ts"), ...args], {
    cwd: REPO_ROOT,
    timeout: 300_000,
  });
}

test("vmprune migrate: --baseline, --drop free and --drop free,cache migrations that verify; a destination not waiting is refused; the --report page shows its plots", async (t) => {
  // Before booting anything: without Chromium the report cannot be looked at.
  await requireChromium();
  const work = await mkdtemp(join(tmpdir(), "vmprune-report-"));
  t.after(() => rm(work, { recursive: true, force: true }));
  const baselinePath = join(work, "baseline.json");
  const html = join(work, "report.html");
  const pair = await LabPair.boot({ kernel: "6.1", qemu: "10.0", memoryMiB: 512 });
  t.after(() => pair.stop());
  await runMixedWorkload(pair.src.agent);
  const bandwidth = String(8 * 1024 ** 3);

  const reports: MigrateReport[] = [];
  const disk = join(pair.diskDir, "data.img");
  const withReport = ["--report", html, "--compare", baselinePath];
  for (const mode of [
    ["--baseline"],
    ["--drop", "free"],
    // --refs-when always: on loopback the link mostly has room, and link-busy would send cache pages whole.
    ["--drop", "free,cache", "--disk", disk, "--refs-when", "always", ...withReport],
  ]) {
    // A pruned migration leaves the guest's free pages zeroed (they arrive as zero pages): churn again first, so
    // that every run starts with old data in free memory, as the demo does.
    if (reports.length > 0)
      await pair.src.agent.run(workload.churn(MIXED_512M.churn, MIXED_512M.churnLoops), 300_000);
    const dst = await pair.startDestination();
    const { stdout, stderr } = await vmprune([
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
    if (reports.length === 0) await writeFile(baselinePath, stdout);
    if (mode.includes("--report")) assert.match(stderr, /HTML report written to /);
    if (mode.includes("free,cache")) {
      // send and receive are two parts of this one process: their link needs no TLS, and says why.
      assert.match(
        stderr,
        /the link is not encrypted: a unix socket in a private directory within this process/,
      );
      assert.doesNotMatch(stderr, /WARNING: the link is NOT encrypted/);
    }
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
  // The page of the last run against the first: its pause and throughput were measured, three plots drawn.
  assert.ok(
    withCache?.pause && withCache.pause.resumeMs > withCache.pause.stopMs,
    "the guest's pause was measured",
  );
  assert.ok((withCache?.linkThroughput?.length ?? 0) >= 3, "the link's throughput was sampled");
  const page = await readFile(html, "utf8");
  assert.equal(page.match(/<svg\b/g)?.length, 3, "three plots");
  assert.match(page, /earlier baseline \(passthrough\)/);
  assert.match(page, /vmprune --drop free,cache/);
  await checkReportScreenshot(t, html, work);
});
