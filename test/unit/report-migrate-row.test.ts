/**
 * `vmprune migrate --report`: a migration's report as a row (times from the STOP/RESUME events, pages from QEMU's
 * counters and send's pruning), an earlier run as the baseline, and --compare files checked before migrating.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import type { MigrateReport } from "../../src/migrate/migrate.ts";
import { migrateReportModel, migrateRowName, parseMigrateReport } from "../../src/migrate/report-row.ts";

function report(mode: MigrateReport["mode"], pause: MigrateReport["pause"]): MigrateReport {
  return {
    mode,
    status: "completed",
    error: null,
    totalTimeMs: 2500,
    downtimeMs: 40,
    sourceBytes: 500e6,
    wireBytes: mode === "baseline" ? 500e6 : 200e6,
    iterations: 3,
    records: null,
    prune: null,
    receive: null,
    destinationStatus: pause ? "running" : "not resumed",
    pause,
    linkThroughput: [{ tMs: 100, bytesPerSec: 1e9 }],
    info: {
      status: "completed",
      ram: { normal: 1000, duplicate: 10 } as NonNullable<MigrateReport["info"]["ram"]>,
    },
  };
}

test("migrateReportModel: times from the events, the earlier baseline first and compared with", () => {
  const baseline = report("baseline", { stopMs: 2400, resumeMs: 2650 });
  const unresumed = report("pruned", null);
  const model = migrateReportModel(
    [
      { name: `earlier ${migrateRowName(baseline)}`, report: baseline },
      { name: "vmprune --drop free", report: unresumed },
    ],
    ["context"],
  );
  assert.equal(model.baseline, "earlier baseline (passthrough)");
  const [b, p] = model.rows;
  assert.equal(b?.toResumeMs, 2650);
  assert.equal(b?.guestPauseMs, 250);
  assert.deepEqual(b?.pause, { fromMs: 2400, toMs: 2650 });
  assert.deepEqual(b?.pageBytes, { "sent whole": 1000 * 4096, "zero page": 10 * 4096 });
  assert.equal(b?.throughput.length, 1);
  // No RESUME: QEMU's total time stands in, the pause is unknown.
  assert.equal(p?.toResumeMs, 2500);
  assert.equal(p?.guestPauseMs, null);
  assert.equal(p?.pause, undefined);
  // One run alone has nothing to be compared with.
  assert.equal(migrateReportModel([{ name: "x", report: baseline }], []).baseline, undefined);
});

test("parseMigrateReport: a --json report (with its origin) is read; anything else says what it lacks", () => {
  const text = JSON.stringify({ vmprune: { version: "0.1.0" }, ...report("baseline", null) });
  assert.equal(parseMigrateReport(text, "b.json").mode, "baseline");
  assert.throws(() => parseMigrateReport("{", "b.json"), /b\.json is not JSON/);
  assert.throws(
    () => parseMigrateReport(JSON.stringify({ mode: "baseline", rows: [] }), "bench.json"),
    /bench\.json is not a report of `vmprune migrate --json` \(no totalTimeMs, wireBytes, info\)/,
  );
});
