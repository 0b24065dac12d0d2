/** bench:prune's table (bench/prune.ts formatTable), laid out by report/table.ts: within 100 columns. */
import assert from "node:assert/strict";
import { test } from "node:test";
import { formatTable, type PruneBenchResult, type RunFigures } from "../../bench/prune.ts";
import { REPORT_WIDTH } from "../../src/report/table.ts";
import { assertFiguresRightAligned, assertFits } from "./table-layout.ts";

const MIB = 1 << 20;

function row(row: PruneBenchResult["rows"][number]["row"], median: RunFigures, wireRatioToPlain: number) {
  return { row, runs: [median], median, wireRatioToPlain };
}

test("the table fits 100 columns with its figures right-aligned", () => {
  const result: PruneBenchResult = {
    kernel: "6.12",
    qemu: "7.2",
    accel: "tcg",
    memoryMiB: 512,
    runs: 3,
    rows: [
      row(
        "plain",
        {
          wireBytes: 541 * MIB,
          ramTransferredBytes: 541 * MIB,
          totalTimeMs: 5210,
          downtimeMs: 242,
          freePages: 75_210,
        },
        1,
      ),
      row(
        "free-page-hint",
        {
          wireBytes: 262 * MIB,
          ramTransferredBytes: 262 * MIB,
          totalTimeMs: 2930,
          downtimeMs: 230,
          freePages: 75_113,
        },
        0.484,
      ),
      row(
        "vmprune --drop free",
        {
          wireBytes: 214 * MIB,
          ramTransferredBytes: 549 * MIB,
          totalTimeMs: 3120,
          downtimeMs: 155,
          freePages: 75_004,
          prunedPages: 76_812,
        },
        0.396,
      ),
    ],
    vmpruneAtMostFreePageHint: true,
  };
  const out = formatTable(result);
  process.stdout.write(`${out}\n`);
  assertFits(out, REPORT_WIDTH);
  assert.equal(
    assertFiguresRightAligned(out),
    3 * 7 - 2,
    "every figure but plain's and fp-hint's pruned pages",
  );
  assert.match(out, /^vmprune --drop free +214\.0 +0\.396 +549\.0 +3\.12 +155 +75004 +76812$/m);
});
