/**
 * Plain-text tables for the CLI and the benchmarks. One layout for all of them, so that no report pads its own
 * columns (hand-padded copies drifted apart and grew to 170 columns): columns as wide as their widest cell, two
 * spaces apart, a rule under the header, text left-aligned and figures right-aligned so that digits line up.
 */

export type Align = "left" | "right";

export interface Column {
  header: string;
  /** Default: the first column (row names) left, every other one right (figures). */
  align?: Align;
}

/** A column is its header, or a header with an alignment. */
export type ColumnSpec = string | Column;

/** Spaces between two columns. */
const GAP = "  ";

export function table(columns: readonly ColumnSpec[], rows: readonly (readonly string[])[]): string {
  const specs = columns.map((c, i): Required<Column> => {
    const column = typeof c === "string" ? { header: c } : c;
    return { header: column.header, align: column.align ?? (i === 0 ? "left" : "right") };
  });
  const widths = specs.map((c, i) => Math.max(c.header.length, ...rows.map((r) => (r[i] ?? "").length)));
  const line = (cells: readonly string[]) =>
    specs
      .map((c, i) => {
        const cell = cells[i] ?? "";
        const width = widths[i] ?? 0;
        return c.align === "left" ? cell.padEnd(width) : cell.padStart(width);
      })
      .join(GAP)
      // A left-aligned last column would leave trailing blanks.
      .trimEnd();
  return [
    line(specs.map((c) => c.header)),
    widths.map((w) => "-".repeat(w)).join(GAP),
    ...rows.map(line),
  ].join("\n");
}

/**
 * Breaks `text` at spaces into lines of at most `width` characters; a word longer than that (a path, a hash in
 * an error message) is cut into pieces of `width`, so that no line ever exceeds it.
 */
export function wrap(text: string, width: number): string[] {
  const lines: string[] = [];
  let current = "";
  const words = text
    .split(/\s+/)
    .flatMap((w) => w.match(new RegExp(`.{1,${Math.max(1, width)}}`, "g")) ?? []);
  for (const word of words) {
    if (current.length > 0 && current.length + 1 + word.length > width) {
      lines.push(current);
      current = word;
    } else current = current.length > 0 ? `${current} ${word}` : word;
  }
  if (current.length > 0) lines.push(current);
  return lines;
}

/** The terminal width the reports are laid out for: a default terminal with room to spare. */
export const REPORT_WIDTH = 100;
