/**
 * Checks on a table printed by src/report/table.ts, shared by the tests of the reports that print one: every
 * line fits the width, and in every right-aligned column each figure ends at the column's right edge.
 */
import assert from "node:assert/strict";

/** Column spans [start, end) read off the rule under the header (runs of '-'). */
export function columnSpans(rule: string): [number, number][] {
  return [...rule.matchAll(/-+/g)].map((m) => [m.index, m.index + m[0].length]);
}

/** Every line of `text` is at most `width` characters long. */
export function assertFits(text: string, width: number): void {
  for (const line of text.split("\n"))
    assert.ok(line.length <= width, `${line.length} > ${width} characters: ${JSON.stringify(line)}`);
}

/**
 * In the table that starts at the line before the first rule of `text`, every cell holding a digit in a column
 * other than the first (the row names) is flush with the column's right edge, and each figure is whole (it does
 * not spill into the gap). Returns the number of figures checked, so a test can tell it looked at something.
 */
export function assertFiguresRightAligned(text: string): number {
  const lines = text.split("\n");
  const ruleAt = lines.findIndex((l) => /^-+( +-+)+$/.test(l));
  assert.ok(ruleAt > 0, "a table with a rule under its header");
  const spans = columnSpans(lines[ruleAt] ?? "");
  let checked = 0;
  for (const line of lines.slice(ruleAt + 1)) {
    if (line.trim() === "") break;
    for (const [start, end] of spans.slice(1)) {
      const cell = line.slice(start, end);
      if (!/\d/.test(cell)) continue;
      assert.equal(cell, cell.trim().padStart(end - start), `right-aligned in [${start}, ${end}): ${line}`);
      assert.ok(line[start - 1] === " " || start === 0, `the cell starts inside its column: ${line}`);
      checked++;
    }
  }
  return checked;
}
