/**
 * `vmprune migrate`'s reports as rows of the HTML report (report/report-model.ts): what `migrate` measured
 * (both QEMUs' STOP/RESUME events, the relay's bytes and its throughput, QEMU's page counters, send's pruning).
 */
import { pageTrafficOf } from "../report/page-traffic.ts";
import type { MigrationReportModel, ReportRow } from "../report/report-model.ts";
import { DEFAULT_SAMPLE_INTERVAL_MS } from "../report/throughput-sampler.ts";
import type { MigrateReport } from "./migrate.ts";

/**
 * One migration as a report row. Without the destination's RESUME (it did not resume, or was started paused)
 * the time to resume falls back to QEMU's total time and the pause is unknown.
 */
export function migrateReportRow(name: string, report: MigrateReport): ReportRow {
  const { pause } = report;
  return {
    name,
    toResumeMs: pause ? pause.resumeMs : report.totalTimeMs,
    guestPauseMs: pause ? pause.resumeMs - pause.stopMs : null,
    linkBytes: report.wireBytes,
    pageBytes: pageTrafficOf(report.info, report.prune),
    throughput: report.linkThroughput ?? [],
    ...(pause ? { pause: { fromMs: pause.stopMs, toMs: pause.resumeMs } } : {}),
  };
}

/** How a migration is named in the report: its mode and what it dropped. */
export function migrateRowName(report: MigrateReport): string {
  if (report.mode === "baseline") return "baseline (passthrough)";
  return `vmprune --drop ${report.prune?.drop.join(",") ?? "?"}`;
}

/**
 * A report of `vmprune migrate` runs of one guest on this host, the first (a `--baseline` run, when given) the
 * one the others are compared with.
 */
export function migrateReportModel(
  runs: readonly { name: string; report: MigrateReport }[],
  context: readonly string[],
): MigrationReportModel {
  const first = runs[0];
  return {
    title: "vmprune migrate",
    context,
    rows: runs.map((r) => migrateReportRow(r.name, r.report)),
    ...(first && first.report.mode === "baseline" && runs.length > 1 ? { baseline: first.name } : {}),
    throughputNote: `the relay's bytes towards the destination every ${DEFAULT_SAMPLE_INTERVAL_MS} ms, from \`migrate\``,
    notes: [
      "Link bytes: what vmprune's relay wrote towards the destination (all channels). The baseline runs the " +
        "same relay without pruning, so it pays the same relay cost.",
      "Time to resume: `migrate` on the source to the destination's RESUME event; guest pause: the source's " +
        "STOP to the destination's RESUME (both QEMUs' own event timestamps, one host clock).",
    ],
  };
}

/**
 * A report `vmprune migrate --json` wrote earlier (to draw beside this run), checked for what the HTML report
 * reads from it.
 */
export function parseMigrateReport(text: string, source: string): MigrateReport {
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch (error) {
    throw new Error(`${source} is not JSON (${error instanceof Error ? error.message : String(error)})`);
  }
  const fields: [string, string][] = [
    ["mode", "string"],
    ["totalTimeMs", "number"],
    ["wireBytes", "number"],
    ["info", "object"],
  ];
  const missing =
    typeof parsed !== "object" || parsed === null
      ? fields.map(([name]) => name)
      : fields
          .filter(([name, type]) => typeof (parsed as Record<string, unknown>)[name] !== type)
          .map(([n]) => n);
  if (missing.length > 0)
    throw new Error(
      `${source} is not a report of \`vmprune migrate --json\` (no ${missing.join(", ")}): give the file its --json wrote`,
    );
  return parsed as MigrateReport;
}
