/**
 * bench:link's judging and table (bench/link.ts judgeRows, formatTable) on figures like a real run's: each
 * workload's goals (the floor, the papers' claims, the overhead), the time to resume over the floor, the
 * operator's wait beside the time to resume, and a table that fits 100 columns with its figures right-aligned.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import {
  formatTable,
  type GoalName,
  judgeRows,
  type LinkBenchResult,
  linkReportModel,
  type RunFigures,
  type WorkloadName,
} from "../../bench/link.ts";
import { htmlReport } from "../../src/report/html-report.ts";
import { REPORT_WIDTH } from "../../src/report/table.ts";
import { assertFiguresRightAligned, assertFits } from "./table-layout.ts";

const MIB = 1 << 20;

/** One run of a row: QEMU's figures, the guest's pause, and for vmprune rows send's preparation. */
function figures(f: {
  linkMiB: number;
  totalMs: number;
  downMs: number;
  pauseMs: number;
  prepMs?: number;
  pruned?: number;
  sourceHeldMs?: number;
  receiveHeldMs?: number;
  hostCpuMs?: number;
  destinationCpuMs?: number;
  destinationQemuCpuMs?: number;
}): RunFigures {
  const toResumeMs = f.totalMs - f.downMs + f.pauseMs;
  return {
    linkBytes: f.linkMiB * MIB,
    linkReturnBytes: 1_400_000,
    streamBytes: f.linkMiB * MIB * 0.98,
    totalTimeMs: f.totalMs,
    downtimeMs: f.downMs,
    guestPauseMs: f.pauseMs,
    toResumeMs,
    operatorWaitMs: (f.prepMs ?? 0) + toResumeMs,
    idealBytes: 96 * MIB,
    idealFreeOnlyBytes: 205 * MIB,
    freePages: 75_210,
    ...(f.prepMs !== undefined ? { prepMs: f.prepMs } : {}),
    ...(f.pruned !== undefined ? { prunedPages: f.pruned } : {}),
    ...(f.sourceHeldMs !== undefined ? { sourceHeldMs: f.sourceHeldMs } : {}),
    ...(f.receiveHeldMs !== undefined ? { receiveHeldMs: f.receiveHeldMs } : {}),
    ...(f.hostCpuMs !== undefined ? { hostCpuMs: f.hostCpuMs } : {}),
    ...(f.destinationCpuMs !== undefined ? { destinationCpuMs: f.destinationCpuMs } : {}),
    ...(f.destinationQemuCpuMs !== undefined ? { destinationQemuCpuMs: f.destinationQemuCpuMs } : {}),
  };
}

const RUNS = new Map<string, RunFigures[]>([
  [
    "plain",
    [
      figures({
        linkMiB: 548,
        totalMs: 4710,
        downMs: 212,
        pauseMs: 240,
        hostCpuMs: 1900,
        destinationCpuMs: 1150,
        destinationQemuCpuMs: 1150,
      }),
    ],
  ],
  ["free-page-hint", [figures({ linkMiB: 262, totalMs: 2420, downMs: 180, pauseMs: 205 })]],
  ["xbzrle", [figures({ linkMiB: 561, totalMs: 4980, downMs: 230, pauseMs: 251 })]],
  ["multifd", [figures({ linkMiB: 552, totalMs: 4650, downMs: 200, pauseMs: 230 })]],
  ["multifd+zstd", [figures({ linkMiB: 190, totalMs: 2750, downMs: 150, pauseMs: 168 })]],
  // Resumes within 25% of plain's 4.74 s, but only because its 0.42 s of preparation is not counted.
  [
    "vmprune free",
    [
      figures({
        linkMiB: 214,
        totalMs: 900,
        downMs: 60,
        pauseMs: 190,
        prepMs: 420,
        pruned: 76_812,
        sourceHeldMs: 610,
      }),
    ],
  ],
  [
    "vmprune free multifd",
    [figures({ linkMiB: 230, totalMs: 1100, downMs: 70, pauseMs: 200, prepMs: 400, pruned: 70_100 })],
  ],
  [
    "vmprune free+cache",
    [
      figures({
        linkMiB: 101,
        totalMs: 560,
        downMs: 40,
        pauseMs: 150,
        prepMs: 380,
        pruned: 95_906,
        sourceHeldMs: 240,
        receiveHeldMs: 130,
        hostCpuMs: 3300,
        destinationCpuMs: 1700,
        destinationQemuCpuMs: 980,
      }),
    ],
  ],
]);

/** The link's measured rate in the table test: 0.941 Gbit/s. */
const LINK_BYTES_PER_SECOND = 0.941e9 / 8;

test("goals by workload: the floor where there is much to prune, -75%/-92% on the papers' guest, +3% where nothing is", () => {
  const floorMs = ((96 * MIB) / LINK_BYTES_PER_SECOND) * 1000;
  const judge = (workload: WorkloadName) =>
    judgeRows([...RUNS.keys()], RUNS, workload, LINK_BYTES_PER_SECOND);
  const goal = (workload: WorkloadName, row: string, g: GoalName) =>
    judge(workload).rows.find((r) => r.row === row)?.goals[g];

  const mixed = judge("mixed");
  assert.ok(Math.abs(mixed.floorMs - floorMs) < 1e-6);
  const cache = mixed.rows.find((r) => r.row === "vmprune free+cache");
  assert.ok(
    Math.abs((cache?.toResumeVsFloor ?? 0) - 670 / floorMs) < 1e-9,
    "670 ms to resume over the floor",
  );
  assert.equal(goal("mixed", "vmprune free+cache", "resume<=1.2 floor"), "met", "670 ms <= 1.2 x 856 ms");
  assert.equal(goal("cache-heavy", "vmprune free+cache", "resume<=1.2 floor"), "met");
  assert.equal(goal("mixed", "vmprune free", "resume<=1.2 floor"), "-", "judged on free+cache only");
  assert.equal(goal("mixed", "vmprune free", "resume -75%"), "-", "not a goal of the mixed guest");
  assert.equal(goal("mixed", "plain", "pause<=plain"), "-");
  assert.equal(goal("mixed", "vmprune free", "pause<=plain"), "met", "190 <= 240 ms");
  assert.equal(goal("mixed", "xbzrle", "pause<=plain"), "not met", "251 > 240 ms");

  assert.equal(goal("idle-after-work", "vmprune free", "resume -75%"), "met", "1030 <= 25% of 4738 ms");
  assert.equal(goal("idle-after-work", "vmprune free", "link -92%"), "not met", "214 > 8% of 548 MiB");
  assert.equal(goal("idle-after-work", "multifd", "link -92%"), "-", "vmprune rows only");
  assert.equal(goal("idle-after-work", "vmprune free+cache", "resume<=1.2 floor"), "-");

  assert.equal(goal("anon", "vmprune free", "resume<=1.03 plain"), "met");
  assert.equal(goal("anon", "vmprune free", "resume -75%"), "-");
});

/** A LinkBenchResult of `runs` on the mixed workload, as benchLink returns it. */
function benchResult(runs: ReadonlyMap<string, RunFigures[]>): LinkBenchResult {
  const { rows, idealBytes, idealFreeOnlyBytes, floorMs } = judgeRows(
    [...runs.keys()],
    runs,
    "mixed",
    LINK_BYTES_PER_SECOND,
  );
  return {
    kernel: "6.1",
    qemu: "10.0",
    accel: "kvm",
    memoryMiB: 512,
    workload: "mixed",
    runs: 3,
    link: {
      srcNetns: "vmprune-41234-src-a1b2c3",
      dstNetns: "vmprune-41234-dst-a1b2c3",
      srcIp: "10.77.0.1",
      dstIp: "10.77.0.2",
      rateMbit: 1000,
      measuredBefore: { gbitPerSecond: 0.941, bytes: 100_000_000, ms: 850 },
      measuredAfter: { gbitPerSecond: 0.939, bytes: 100_000_000, ms: 852 },
    },
    multifdCompression: "zstd",
    maxBandwidthBytesPerSecond: 1_250_000_000,
    cores: 2,
    destinationRam: "on-demand",
    rows,
    ideal: { bytes: idealBytes, freeOnlyBytes: idealFreeOnlyBytes, atLinkRateMs: floorMs },
  };
}

test("the table fits 100 columns, figures right-aligned, and shows prep and operator wait", () => {
  const out = formatTable(benchResult(RUNS));
  process.stdout.write(`bench:link's table:\n${out}\n`);
  assertFits(out, REPORT_WIDTH);
  assert.ok(assertFiguresRightAligned(out) >= 60, "the table's figures were checked");
  assert.match(out, /^send prep \(s\) +- +- +- +- +- +0\.42 +0\.40 +0\.38 *$/m);
  // Which side set the pace: QEMU's stream waiting for the link, and receive's link for the destination QEMU.
  assert.match(out, /^QEMU waited \(s\) +- +- +- +- +- +0\.61 +- +0\.24 *$/m);
  assert.match(out, /^receive waited \(s\) +- +- +- +- +- +- +- +0\.13 *$/m);
  // What the host's cores did meanwhile, and the least time that took them.
  assert.match(out, /^host CPU \(core-s\) +1\.90 +- +- +- +- +- +- +3\.30 *$/m);
  assert.match(out, /^ {2}destination side +1\.15 +- +- +- +- +- +- +1\.70 *$/m);
  assert.match(out, /^ {4}destination QEMU +1\.15 +- +- +- +- +- +- +0\.98 *$/m);
  assert.ok(!out.includes("preallocated"), "on-demand destinations: nothing said");
  assert.match(
    formatTable({ ...benchResult(RUNS), destinationRam: "preallocated" }),
    /Destinations preallocated their RAM \(cleared before `migrate`, not during it\)\./,
  );
  assert.match(out, /^ {2}\/ cores \(s\) +0\.95 +- +- +- +- +- +- +1\.65 *$/m);
  assert.match(out, /^operator wait \(s\) +4\.74 +2\.44 +5\.00 +4\.68 +2\.77 +1\.45 +1\.63 +1\.05 *$/m);
  assert.match(
    out,
    /^to resume \(s\) +4\.74 +2\.44 +5\.00 +4\.68 +2\.77 +1\.03 +1\.23 +0\.67 +0\.86 *$/m,
    "the floor in the ideal's column",
  );
  assert.match(out, /^ +\/ floor( +\d+\.\d{3}){8} +1\.000 *$/m);
  assert.match(out, /^ {2}resume<=1\.2 floor +- +- +- +- +- +- +- +met *$/m);
  assert.doesNotMatch(out, /resume -75%/, "a goal no row of this workload has is left out");
});

test("--report: every row with its medians, the median pages by category, its first run's throughput and pause", async () => {
  const withSeries = (f: RunFigures, sentMiB: number, freeMiB: number, rate: number): RunFigures => ({
    ...f,
    pageBytes: {
      "sent whole": sentMiB * MIB,
      "zero page": 4 * MIB,
      ...(freeMiB ? { "free, pruned": freeMiB * MIB } : {}),
    },
    throughput: [200, 400, 600].map((tMs) => ({ tMs, bytesPerSec: rate })),
    pause: { fromMs: f.toResumeMs - f.guestPauseMs, toMs: f.toResumeMs },
  });
  const plain = RUNS.get("plain")?.[0] as RunFigures;
  const free = RUNS.get("vmprune free")?.[0] as RunFigures;
  const runs = new Map<string, RunFigures[]>([
    [
      "plain",
      [withSeries(plain, 540, 0, 110e6), withSeries(plain, 560, 0, 90e6), withSeries(plain, 550, 0, 100e6)],
    ],
    ["vmprune free", [withSeries(free, 210, 300, 50e6), withSeries(free, 200, 320, 60e6)]],
  ]);
  const model = linkReportModel(benchResult(runs));
  assert.equal(model.baseline, "plain");
  assert.deepEqual(
    model.rows.map((r) => r.name),
    ["plain", "vmprune free"],
  );
  const [p, v] = model.rows;
  assert.equal(p?.pageBytes["sent whole"], 550 * MIB, "the median of 540, 560 and 550");
  assert.equal(v?.pageBytes["free, pruned"], 310 * MIB, "the median of 300 and 320");
  assert.equal(p?.throughput[0]?.bytesPerSec, 110e6, "the first run's curve");
  assert.equal(v?.guestPauseMs, free.guestPauseMs);
  assert.equal(model.ideal?.bytes, 96 * MIB);
  const html = await htmlReport(model);
  assert.equal(html.match(/<svg\b/g)?.length, 3);
  assert.match(html, /veth 10\.77\.0\.1 → 10\.77\.0\.2, tbf 1000 Mbit\/s/);
  assert.ok(!model.context.some((line) => line.includes("preallocated")), "on-demand: nothing said");
  const preallocated = linkReportModel({ ...benchResult(runs), destinationRam: "preallocated" });
  assert.ok(
    preallocated.context.some((line) => line.startsWith("Destinations preallocated their RAM")),
    preallocated.context.join(" | "),
  );
});
