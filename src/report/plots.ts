/**
 * The report's plots as vega-lite specifications, rendered to SVG strings in Node (vega's scenegraph with
 * `renderer: 'none'` and `toSVG()`: no browser, no canvas). Three plots:
 *   throughput     one panel per row: the link's rate over one migration, the guest's pause shaded;
 *   page traffic   one stacked bar per row: guest pages by how they travelled, the ideal as a rule;
 *   timing         time to resume and guest pause side by side, one bar per row, the baseline as a rule.
 * Rows keep the model's order on every plot. Names are data, never part of an expression, so any text is safe.
 */
import * as vega from "vega";
import { compile, type TopLevelSpec } from "vega-lite";
import {
  baselineRow,
  type MigrationReportModel,
  PAGE_TRAFFIC_CATEGORIES,
  type PageTrafficCategory,
} from "./report-model.ts";

/** Plot width in CSS pixels: fits a 1000-pixel page with the row names beside the bars. */
export const PLOT_WIDTH = 620;
const MIB = 1024 * 1024;

/** Colours of the page categories: the bytes that still move stand out, what vmprune saved is green. */
const CATEGORY_COLOURS: Record<PageTrafficCategory, string> = {
  "sent whole": "#4c78a8",
  "free, pruned": "#54a24b",
  "cache, referenced": "#b8d98a",
  "zero page": "#c7c7c7",
  "xbzrle delta": "#f58518",
};
const PAUSE_COLOUR = "#e45756";
const BAR_COLOUR = "#4c78a8";
const BASELINE_COLOUR = "#8c8c8c";

const CONFIG = {
  font: "DejaVu Sans, Verdana, sans-serif",
  // Row names up to ~40 characters beside a bar; longer ones end in "…" (the table below has them whole).
  axis: { labelFontSize: 11, titleFontSize: 12, titleFontWeight: "normal" as const, labelLimit: 300 },
  header: { labelFontSize: 12 },
  legend: { labelFontSize: 11, titleFontSize: 12, orient: "bottom" as const },
  view: { stroke: "#ddd" },
};

/**
 * Advance widths of DejaVu Sans (the page's first font; Debian's default sans) in em, from its hmtx table: the
 * lowercase letters one by one, other characters by kind. Without a canvas vega guesses 0.8 em for every
 * character, about a third too wide: axes then leave gaps, and names are cut ("…") that would fit.
 */
const LOWERCASE_EM = [
  0.613, 0.635, 0.55, 0.635, 0.615, 0.352, 0.635, 0.634, 0.278, 0.278, 0.579, 0.278, 0.974, 0.634, 0.612,
  0.635, 0.635, 0.411, 0.521, 0.392, 0.634, 0.592, 0.818, 0.592, 0.592, 0.525,
];

function characterEm(c: string): number {
  const code = c.charCodeAt(0);
  if (code >= 97 && code <= 122) return LOWERCASE_EM[code - 97] ?? 0.6;
  if (code >= 48 && code <= 57) return 0.636;
  if (code >= 65 && code <= 90) return "IJ".includes(c) ? 0.3 : "MW".includes(c) ? 0.92 : 0.7;
  if (" .,:;'|!".includes(c)) return 0.318;
  if ("()[]{}/\\-".includes(c)) return 0.38;
  return 0.84; // × + = % … and anything wider
}

/** The width in pixels of `text` in DejaVu Sans at `fontSizePx`. */
export function textWidthPx(text: string, fontSizePx: number): number {
  let em = 0;
  for (const c of text) em += characterEm(c);
  return em * fontSizePx;
}

/** The part of a vega text item its width depends on (vega-scenegraph's textMetrics). */
interface TextItem {
  fontSize?: number | null;
  text?: unknown;
}

/**
 * vega-scenegraph's `textMetrics`, re-exported by vega but not in its typings: the extension point vega keeps for
 * this (vl-convert sets it too). Set once, when this module loads; it only changes how wide vega thinks text is.
 */
const textMetrics = (
  vega as unknown as { textMetrics?: { width: (item: TextItem, text?: unknown) => number } }
).textMetrics;
if (textMetrics)
  textMetrics.width = (item, text) => {
    const value = text ?? item.text;
    const lines = Array.isArray(value) ? value.map(String) : [value === undefined ? "" : String(value)];
    return Math.max(0, ...lines.map((line) => textWidthPx(line, item.fontSize ?? 11)));
  };

/** A rate unit that keeps the axis' numbers short: Gbit/s from 5 Gbit/s on (loopback), else Mbit/s. */
function rateUnit(maxBytesPerSec: number): { name: string; bitsPer: number } {
  return maxBytesPerSec * 8 >= 5e9 ? { name: "Gbit/s", bitsPer: 1e9 } : { name: "Mbit/s", bitsPer: 1e6 };
}

/** One panel per row with samples: link throughput against seconds since `migrate`, the guest's pause shaded. */
export function throughputSpec(model: MigrationReportModel): TopLevelSpec {
  const rows = model.rows.filter((r) => r.throughput.length > 0);
  const peak = Math.max(0, ...rows.flatMap((r) => r.throughput.map((s) => s.bytesPerSec)));
  const unit = rateUnit(peak);
  const values = rows.flatMap((r) => [
    // A sample stands for the interval before it: start each line at 0 s so that panels begin alike.
    { row: r.name, kind: "rate", t: 0, rate: 0 },
    ...r.throughput.map((s) => ({
      row: r.name,
      kind: "rate",
      t: s.tMs / 1000,
      rate: (s.bytesPerSec * 8) / unit.bitsPer,
    })),
    ...(r.pause ? [{ row: r.name, kind: "pause", t: r.pause.fromMs / 1000, t2: r.pause.toMs / 1000 }] : []),
  ]);
  return {
    $schema: "https://vega.github.io/schema/vega-lite/v6.json",
    config: CONFIG,
    data: { values },
    facet: {
      field: "row",
      type: "nominal",
      sort: rows.map((r) => r.name),
      header: { title: null, labelAnchor: "start", labelFontWeight: "bold", labelPadding: 4 },
    },
    columns: 1,
    spacing: 14,
    spec: {
      // Wider than the bar plots: time runs along it, and it has no row names beside it.
      width: PLOT_WIDTH + 160,
      height: 70,
      layer: [
        {
          name: "pause",
          transform: [{ filter: "datum.kind === 'pause'" }],
          mark: { type: "rect", color: PAUSE_COLOUR, opacity: 0.35 },
          encoding: {
            x: { field: "t", type: "quantitative" },
            x2: { field: "t2" },
          },
        },
        {
          name: "throughput",
          transform: [{ filter: "datum.kind === 'rate'" }],
          mark: { type: "area", interpolate: "step-before", color: BAR_COLOUR, opacity: 0.85 },
          encoding: {
            x: { field: "t", type: "quantitative", title: "seconds" },
            y: {
              field: "rate",
              type: "quantitative",
              title: unit.name,
              axis: { tickCount: 3 },
            },
          },
        },
      ],
    },
  };
}

/** One stacked bar per row: its guest pages in MiB by how they travelled; the ideal (bytes that had to move). */
export function pageTrafficSpec(model: MigrationReportModel): TopLevelSpec {
  const names = model.rows.map((r) => r.name);
  const values = model.rows.flatMap((r) =>
    PAGE_TRAFFIC_CATEGORIES.flatMap((category, order) => {
      const bytes = r.pageBytes[category] ?? 0;
      return bytes > 0 ? [{ row: r.name, category, order, mib: bytes / MIB }] : [];
    }),
  );
  const present = PAGE_TRAFFIC_CATEGORIES.filter((c) => values.some((v) => v.category === c));
  const ideal = model.ideal;
  return {
    $schema: "https://vega.github.io/schema/vega-lite/v6.json",
    config: CONFIG,
    width: PLOT_WIDTH,
    height: { step: 26 },
    layer: [
      {
        name: "pages",
        data: { values },
        mark: { type: "bar", height: { band: 0.7 } },
        encoding: {
          y: { field: "row", type: "nominal", sort: names, scale: { domain: names }, title: null },
          x: { field: "mib", type: "quantitative", stack: "zero", title: "MiB of guest pages" },
          color: {
            field: "category",
            type: "nominal",
            title: null,
            scale: { domain: present, range: present.map((c) => CATEGORY_COLOURS[c]) },
          },
          order: { field: "order", type: "quantitative" },
        },
      },
      ...(ideal
        ? [
            {
              name: "ideal",
              data: {
                values: [{ mib: ideal.bytes / MIB, label: `ideal ${(ideal.bytes / MIB).toFixed(0)} MiB` }],
              },
              layer: [
                {
                  mark: { type: "rule" as const, color: "#222", strokeDash: [4, 3], strokeWidth: 1.5 },
                  encoding: { x: { field: "mib", type: "quantitative" as const } },
                },
                {
                  mark: {
                    type: "text" as const,
                    align: "left" as const,
                    baseline: "bottom" as const,
                    dx: -12,
                    dy: -3,
                    y: 0,
                    fontSize: 11,
                  },
                  encoding: {
                    x: { field: "mib", type: "quantitative" as const },
                    text: { field: "label", type: "nominal" as const },
                  },
                },
              ],
            },
          ]
        : []),
    ],
  };
}

/** How each timing reads, one unit per figure so that a column or a plot never mixes them. */
export const TIMING_UNITS = {
  /** Time to resume: seconds, to 10 ms. */
  resume: { name: "seconds", ms: 1000, format: (ms: number) => `${(ms / 1000).toFixed(2)} s` },
  /** Guest pause: whole milliseconds. */
  pause: { name: "milliseconds", ms: 1, format: (ms: number) => `${Math.round(ms)} ms` },
} as const;

type TimingUnit = (typeof TIMING_UNITS)[keyof typeof TIMING_UNITS];

/** Time to resume (seconds) and guest pause (ms), side by side: one bar per row, labelled with its value and its
 * ratio to the baseline; the baseline's value (and, for time to resume, the floor) as labelled dashed rules. */
export function timingSpec(model: MigrationReportModel): TopLevelSpec {
  const names = model.rows.map((r) => r.name);
  const baseline = baselineRow(model);
  const panel = (
    name: string,
    title: string,
    unit: TimingUnit,
    figureOf: (r: MigrationReportModel["rows"][number]) => number | null,
    floorMs: number | undefined,
  ) => {
    const base = baseline ? figureOf(baseline) : null;
    const values = model.rows.flatMap((r) => {
      const ms = figureOf(r);
      if (ms === null) return [];
      // The ratio alone: the baseline's name is on its bar and its rule, and would not fit beside every bar.
      const ratio = base && r !== baseline ? `, ${(ms / base).toFixed(2)}×` : "";
      return [
        { row: r.name, v: ms / unit.ms, isBaseline: r === baseline, label: `${unit.format(ms)}${ratio}` },
      ];
    });
    const max = Math.max(0, ...values.map((v) => v.v), (floorMs ?? 0) / unit.ms);
    // Room right of the longest bar for its label.
    const domainMax = max > 0 ? max * 1.6 : 1;
    const rules = [
      ...(base !== null && baseline ? [{ v: base / unit.ms, what: baseline.name }] : []),
      ...(floorMs !== undefined ? [{ v: floorMs / unit.ms, what: "floor" }] : []),
    ];
    const y = { field: "row", type: "nominal" as const, sort: names, scale: { domain: names }, title: null };
    return {
      name,
      width: 300,
      height: { step: 26 },
      title: { text: title, anchor: "start" as const, fontSize: 13, offset: 16 },
      layer: [
        {
          name: `${name}_bars`,
          data: { values },
          mark: { type: "bar" as const, height: { band: 0.7 } },
          encoding: {
            y,
            x: {
              field: "v",
              type: "quantitative" as const,
              title: unit.name,
              scale: { domain: [0, domainMax] },
            },
            color: { condition: { test: "datum.isBaseline", value: BASELINE_COLOUR }, value: BAR_COLOUR },
          },
        },
        // Rules under the labels, so that a label crossing a rule stays readable.
        ...(rules.length > 0
          ? [
              {
                name: `${name}_rules`,
                data: { values: rules },
                layer: [
                  {
                    mark: { type: "rule" as const, strokeDash: [4, 3], color: "#222" },
                    encoding: { x: { field: "v", type: "quantitative" as const } },
                  },
                  {
                    // The rule's name just above the plot, where no bar label can be.
                    mark: {
                      type: "text" as const,
                      y: 0,
                      dy: -3,
                      baseline: "bottom" as const,
                      fontSize: 10,
                      color: "#222",
                      limit: 140,
                    },
                    encoding: {
                      x: { field: "v", type: "quantitative" as const },
                      text: { field: "what", type: "nominal" as const },
                    },
                  },
                ],
              },
            ]
          : []),
        {
          name: `${name}_labels`,
          data: { values },
          mark: { type: "text" as const, align: "left" as const, dx: 4, fontSize: 11 },
          encoding: {
            y,
            x: { field: "v", type: "quantitative" as const },
            text: { field: "label", type: "nominal" as const },
          },
        },
      ],
    };
  };
  return {
    $schema: "https://vega.github.io/schema/vega-lite/v6.json",
    config: CONFIG,
    hconcat: [
      panel("resume", "time to resume", TIMING_UNITS.resume, (r) => r.toResumeMs, model.ideal?.floorMs),
      panel("pause", "guest pause", TIMING_UNITS.pause, (r) => r.guestPauseMs, undefined),
    ],
    spacing: 30,
  };
}

/** A vega-lite specification as an SVG document (a string starting with `<svg`), rendered without a browser. */
export async function renderSvg(spec: TopLevelSpec): Promise<string> {
  const view = new vega.View(vega.parse(compile(spec).spec), { renderer: "none" });
  try {
    return await view.toSVG();
  } finally {
    view.finalize();
  }
}
