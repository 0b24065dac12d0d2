/**
 * The demo's report (cli/render.ts renderDemo) with the figures of a real 512 MiB run: it must fit a
 * 100-column terminal (it was 170 wide) with its figures right-aligned.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { renderDemo } from "../../src/cli/render.ts";
import type { DemoResult, DemoRun } from "../../src/lab/demo.ts";
import { REPORT_WIDTH } from "../../src/report/table.ts";
import { assertFiguresRightAligned, assertFits } from "./table-layout.ts";

function run(label: string, figures: Partial<DemoRun>): DemoRun {
  return {
    label,
    status: "completed",
    totalTimeMs: 2312,
    downtimeMs: 41,
    sourceBytes: 548_112_384,
    wireBytes: 548_112_384,
    pageRecords: 131_418,
    zeroRecords: 2_634,
    droppedPages: 0,
    references: 0,
    byCategory: null,
    iterations: 3,
    verify: "OK 12 files, 96 MiB",
    hostCpuMs: 3410,
    vmpruneCpuMs: 1020,
    ...figures,
  };
}

const DEMO_RESULT: DemoResult = {
  kernel: "6.1.0-37-cloud-amd64",
  qemu: "10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)",
  accel: "kvm",
  memoryMiB: 512,
  bootMs: 3214,
  guestMemFreeKiB: 301_244,
  guestCachedKiB: 120_016,
  runs: [
    run("baseline (vmprune migrate --baseline)", {}),
    run("pruned (vmprune migrate --drop free)", {
      totalTimeMs: 1508,
      downtimeMs: 38,
      sourceBytes: 552_207_360,
      wireBytes: 236_453_120,
      pageRecords: 132_470,
      droppedPages: 76_812,
      hostCpuMs: 2980,
      vmpruneCpuMs: 1260,
    }),
    run("pruned (--drop free,cache, with receive)", {
      totalTimeMs: 1377,
      downtimeMs: 35,
      sourceBytes: 551_501_824,
      wireBytes: 158_334_976,
      pageRecords: 132_301,
      droppedPages: 95_906,
      references: 19_094,
    }),
  ],
};

test("the demo's report fits 100 columns, figures right-aligned", () => {
  const out = renderDemo(DEMO_RESULT);
  process.stdout.write(`the demo's report:\n${out}`);
  assertFits(out, REPORT_WIDTH);
  assert.ok(assertFiguresRightAligned(out) >= 25, "the table's figures were checked");
  assert.match(out, /^on the wire \(MiB\) +522\.7 +225\.5 +43% +151\.0 +29%$/m);
  assert.match(out, /^host CPU \(s\) +3\.41 +2\.98 +87% +3\.41 +100%$/m);
  assert.match(out, /^ {2}of it vmprune +1\.02 +1\.26 +124% +1\.02 +100%$/m);
});

test("a failed verify shows as FAILED in the table and in full below it, still within 100 columns", () => {
  const [base, free, cache] = DEMO_RESULT.runs;
  assert.ok(base && free && cache);
  const bad = { ...cache, verify: `MISMATCH /data/files/f03 page 17: ${"ab".repeat(60)}` };
  const out = renderDemo({ ...DEMO_RESULT, runs: [base, free, bad] });
  assertFits(out, REPORT_WIDTH);
  assert.match(out, /^guest verify +OK +OK +FAILED$/m);
  assert.match(out, /free\+cache: guest verify: MISMATCH/);
});
