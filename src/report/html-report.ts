/**
 * The report as one self-contained HTML page: inline CSS and SVG plots (plots.ts), a table of the figures, no
 * script and no external reference, so it opens from a mail attachment or an artifact store as it is.
 */
import { pageTrafficSpec, renderSvg, TIMING_UNITS, throughputSpec, timingSpec } from "./plots.ts";
import {
  baselineRow,
  type MigrationReportModel,
  PAGE_TRAFFIC_CATEGORIES,
  type ReportRow,
} from "./report-model.ts";

/** Text as HTML element content or a double-quoted attribute value. */
export function escapeHtml(text: string): string {
  return text
    .replaceAll("&", "&amp;")
    .replaceAll("<", "&lt;")
    .replaceAll(">", "&gt;")
    .replaceAll('"', "&quot;")
    .replaceAll("'", "&#39;");
}

/** Prose from the model: escaped, with `backquoted` words (commands, QMP names) set as code. */
export function proseHtml(text: string): string {
  return escapeHtml(text).replaceAll(/`([^`]+)`/g, "<code>$1</code>");
}

const STYLE = `
body { font-family: "DejaVu Sans", Verdana, sans-serif; color: #222; margin: 24px auto; max-width: 1000px;
  padding: 0 16px; background: #fff; }
h1 { font-size: 22px; margin: 0 0 6px; }
h2 { font-size: 16px; margin: 28px 0 4px; border-bottom: 1px solid #ddd; padding-bottom: 3px; }
p.context { margin: 2px 0; color: #444; font-size: 13px; }
p.caption { margin: 2px 0 8px; color: #555; font-size: 12px; }
figure { margin: 0; }
figure svg { max-width: 100%; height: auto; }
table { border-collapse: collapse; font-size: 12px; margin-top: 6px; }
th, td { padding: 3px 8px; border-bottom: 1px solid #eee; }
th { text-align: left; background: #f6f6f6; font-weight: 600; }
td.figure { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.row { white-space: nowrap; }
ul.notes { font-size: 12px; color: #444; padding-left: 18px; }
`;

const mib = (bytes: number) => (bytes / (1024 * 1024)).toFixed(1);

function figuresTable(model: MigrationReportModel): string {
  const categories = PAGE_TRAFFIC_CATEGORIES.filter((c) => model.rows.some((r) => (r.pageBytes[c] ?? 0) > 0));
  const header = ["row", "time to resume", "guest pause", "link MiB", ...categories.map((c) => `${c} MiB`)];
  const line = (r: ReportRow) =>
    [
      `<td class="row">${escapeHtml(r.name)}</td>`,
      `<td class="figure">${TIMING_UNITS.resume.format(r.toResumeMs)}</td>`,
      `<td class="figure">${r.guestPauseMs === null ? "-" : TIMING_UNITS.pause.format(r.guestPauseMs)}</td>`,
      `<td class="figure">${mib(r.linkBytes)}</td>`,
      ...categories.map((c) => `<td class="figure">${mib(r.pageBytes[c] ?? 0)}</td>`),
    ].join("");
  return [
    "<table>",
    `<tr>${header.map((h) => `<th>${escapeHtml(h)}</th>`).join("")}</tr>`,
    ...model.rows.map((r) => `<tr>${line(r)}</tr>`),
    "</table>",
  ].join("\n");
}

/**
 * The page for `model`. Plots with nothing to show (no row has throughput samples) are left out with a
 * sentence saying so, rather than drawn empty.
 */
export async function htmlReport(model: MigrationReportModel): Promise<string> {
  if (model.rows.length === 0) throw new Error("the report has no rows: nothing was measured to plot");
  // The plots tell rows apart by name: two of one name would be drawn as one.
  const names = new Set<string>();
  for (const { name } of model.rows) {
    if (names.has(name))
      throw new Error(`the report has two rows named '${name}': give each row its own name`);
    names.add(name);
  }
  const baseline = baselineRow(model);
  const sampled = model.rows.some((r) => r.throughput.length > 0);
  const [throughput, traffic, timing] = await Promise.all([
    sampled ? renderSvg(throughputSpec(model)) : Promise.resolve(null),
    renderSvg(pageTrafficSpec(model)),
    renderSvg(timingSpec(model)),
  ]);
  const versus = baseline
    ? `; beside each bar, its ratio to ${escapeHtml(baseline.name)} (the grey bar and its dashed line)`
    : "";
  const floor =
    model.ideal?.floorMs !== undefined
      ? "; the floor: the ideal bytes at the link's measured rate, the least time any migration can take"
      : "";
  return [
    "<!DOCTYPE html>",
    '<html lang="en">',
    "<head>",
    '<meta charset="utf-8">',
    `<title>${escapeHtml(model.title)}</title>`,
    `<style>${STYLE}</style>`,
    "</head>",
    "<body>",
    `<h1>${escapeHtml(model.title)}</h1>`,
    ...model.context.map((line) => `<p class="context">${proseHtml(line)}</p>`),
    '<section id="timing">',
    "<h2>Time to resume and guest pause</h2>",
    `<p class="caption">Time to resume: from <code>migrate</code> to the destination running. Guest pause: the ` +
      `source's STOP to the destination's RESUME${versus}${floor}.</p>`,
    `<figure>${timing}</figure>`,
    "</section>",
    '<section id="page-traffic">',
    "<h2>Guest pages by how they travelled</h2>",
    '<p class="caption">Pages × 4 KiB (a page sent twice counts twice)' +
      `${model.ideal ? "; the dashed line is the ideal: pages neither free, nor clean page cache, nor zero" : ""}.</p>`,
    `<figure>${traffic}</figure>`,
    "</section>",
    '<section id="throughput">',
    "<h2>Link throughput over time</h2>",
    sampled
      ? `<p class="caption">One migration per row${model.throughputNote ? ` (${proseHtml(model.throughputNote)})` : ""}; ` +
        "the red band is the guest's pause, STOP to RESUME.</p>" +
        `<figure>${throughput}</figure>`
      : '<p class="caption">Not sampled for these rows.</p>',
    "</section>",
    '<section id="figures">',
    "<h2>Figures</h2>",
    figuresTable(model),
    model.notes && model.notes.length > 0
      ? `<ul class="notes">${model.notes.map((n) => `<li>${proseHtml(n)}</li>`).join("")}</ul>`
      : "",
    "</section>",
    "</body>",
    "</html>",
    "",
  ].join("\n");
}
