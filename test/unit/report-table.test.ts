/** report/table.ts: the one table layout of the CLI and the benchmarks, and the word wrap around it. */
import assert from "node:assert/strict";
import { test } from "node:test";
import { table, wrap } from "../../src/report/table.ts";
import { assertFiguresRightAligned } from "./table-layout.ts";

test("columns as wide as their widest cell: names left, figures right, text columns left when asked", () => {
  const out = table(
    ["row", "MiB", { header: "target", align: "left" }],
    [
      ["plain", "512.0", "met"],
      ["vmprune free+cache", "12.5", "not met"],
    ],
  );
  assert.equal(
    out,
    [
      "row                   MiB  target",
      "------------------  -----  -------",
      "plain               512.0  met",
      "vmprune free+cache   12.5  not met",
    ].join("\n"),
  );
  assert.equal(assertFiguresRightAligned(out), 2);
});

test("a missing cell is blank, and no line ends in blanks", () => {
  const out = table(["a", "b", { header: "c", align: "left" }], [["x"], ["y", "1", ""]]);
  for (const line of out.split("\n")) assert.equal(line, line.trimEnd());
  assert.equal(out.split("\n")[2], "x");
});

test("wrap: words kept whole, lines at most the width, a longer word cut", () => {
  assert.deepEqual(wrap("aa bb cc dd", 5), ["aa bb", "cc dd"]);
  assert.deepEqual(wrap("a verylongword b", 4), ["a", "very", "long", "word", "b"]);
  assert.deepEqual(wrap("  ", 10), []);
});
