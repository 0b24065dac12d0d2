/**
 * The HTML report from a model: one SVG per plot, one bar or line per row in the model's order, the labels people
 * read, nothing loaded from elsewhere, and row names shown as text whatever they contain.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { escapeHtml, htmlReport } from "../../src/report/html-report.ts";
import { sampleModel } from "../support/report-sample.ts";

/** The items (paths, texts or lines) of a vega mark group whose class ends with `name` (mark groups do not nest). */
function markItems(html: string, name: string): string[] {
  const groups = [
    ...html.matchAll(new RegExp(`<g class="mark-[a-z]+ role-mark ${name}"[^>]*>(.*?)</g>`, "gs")),
  ];
  return groups.flatMap((g) => [...(g[1] ?? "").matchAll(/<(path|text|line)\b[^>]*>/g)].map((m) => m[0]));
}

/** The `row: NAME` parts of the items' aria labels, in document order. */
function rowsOf(items: readonly string[]): string[] {
  return items.map((item) => /aria-label="[^"]*row: ([^";]*)/.exec(item)?.[1] ?? "?");
}

/** The page's sections, each with the SVGs inside it. */
function svgsBySection(html: string): Record<string, number> {
  const counts: Record<string, number> = {};
  for (const m of html.matchAll(/<section id="([^"]+)">(.*?)<\/section>/gs))
    counts[m[1] ?? ""] = (m[2]?.match(/<svg\b/g) ?? []).length;
  return counts;
}

test("htmlReport: one SVG per plot, one bar per row for both timings, one throughput line per row", async () => {
  const model = sampleModel();
  const html = await htmlReport(model);
  const names = model.rows.map((r) => r.name);
  assert.deepEqual(svgsBySection(html), { timing: 1, "page-traffic": 1, throughput: 1, figures: 0 });

  assert.deepEqual(rowsOf(markItems(html, "resume_bars_marks")), names);
  assert.deepEqual(rowsOf(markItems(html, "pause_bars_marks")), names);
  // Every bar has its value label, and the rows but plain their ratio to it.
  const labels = markItems(html, "resume_labels_marks");
  assert.equal(labels.length, names.length);
  assert.match(html, />1\.50 s, 0\.29×</);
  assert.match(html, />5\.20 s</);
  assert.match(html, />140 ms, 0\.78×</);
  assert.match(html, /<td class="figure">1\.50 s<\/td><td class="figure">140 ms<\/td>/);
  // The baseline's and the floor's rules, named.
  assert.equal(markItems(html, "resume_rules_layer_0_marks").length, 2);
  assert.match(html, /<text[^>]*>floor<\/text>/);

  // Page traffic: every row has bars, in the model's order; one segment per non-zero category.
  const segments = markItems(html, "pages_marks");
  assert.deepEqual([...new Set(rowsOf(segments))], names);
  const nonZero = model.rows.reduce(
    (n, r) => n + Object.values(r.pageBytes).filter((b) => (b ?? 0) > 0).length,
    0,
  );
  assert.equal(segments.length, nonZero);
  assert.equal(markItems(html, "ideal_layer_0_marks").length, 1, "the ideal's rule");
  assert.match(html, />ideal 130 MiB</);

  // Throughput: one area per row (each its own panel), and one pause band per row.
  assert.equal(markItems(html, "throughput_marks").length, names.length);
  assert.equal(markItems(html, "pause_marks").length, names.length);
  for (const name of names) assert.match(html, new RegExp(`<text[^>]*>${name.replace("+", "\\+")}</text>`));

  for (const label of [
    "time to resume",
    "guest pause",
    "seconds",
    "milliseconds",
    "MiB of guest pages",
    "Mbit/s",
    "sent whole",
    "free, pruned",
    "cache, referenced",
    "zero page",
    "xbzrle delta",
  ])
    assert.match(html, new RegExp(`<text[^>]*>${label}</text>`), `the plots show "${label}"`);
});

test("htmlReport: self-contained: no script, no stylesheet or image from elsewhere, no link out", async () => {
  const html = await htmlReport(sampleModel());
  assert.doesNotMatch(html, /<script|<link|<img|<iframe|@import|url\(/i);
  assert.doesNotMatch(html, /\b(src|href|xlink:href)=/i);
  // The SVG namespaces are names, not addresses; nothing else may name a URL.
  const withoutNamespaces = html.replaceAll(/xmlns(:xlink)?="http:\/\/www\.w3\.org\/[^"]*"/g, "");
  assert.doesNotMatch(withoutNamespaces, /https?:|\/\/[a-z]/i);
});

test("htmlReport: row names and titles are text: markup in them is escaped, the row still plotted", async () => {
  const hostile = `<script>alert("x")</script> & 'q' datum.row`;
  const base = sampleModel();
  const model = sampleModel({
    title: "<b>title</b>",
    context: ["<img src=x>"],
    rows: base.rows.map((r, i) => (i === 1 ? { ...r, name: hostile } : r)),
  });
  const html = await htmlReport(model);
  assert.doesNotMatch(html, /<script|<img|<b>/);
  assert.ok(html.includes(escapeHtml(hostile)), "the name appears escaped in the table");
  assert.ok(html.includes("<title>&lt;b&gt;title&lt;/b&gt;</title>"));
  // Its bars are drawn: as many as rows.
  assert.equal(markItems(html, "resume_bars_marks").length, model.rows.length);
  assert.equal(markItems(html, "throughput_marks").length, model.rows.length);
});

test("htmlReport: rows without samples get no throughput plot; rows without a pause no pause bar", async () => {
  const base = sampleModel();
  const model = sampleModel({
    rows: base.rows.map((r, i) => ({ ...r, throughput: [], guestPauseMs: i === 0 ? null : r.guestPauseMs })),
    ideal: undefined,
  });
  const html = await htmlReport(model);
  assert.deepEqual(svgsBySection(html), { timing: 1, "page-traffic": 1, throughput: 0, figures: 0 });
  assert.match(html, /Not sampled for these rows/);
  assert.doesNotMatch(html, /the red band/);
  assert.equal(markItems(html, "pause_bars_marks").length, model.rows.length - 1);
  assert.equal(markItems(html, "ideal_layer_0_marks").length, 0);
  // No floor without the ideal: plain's rule only.
  assert.equal(markItems(html, "resume_rules_layer_0_marks").length, 1);
});

test("htmlReport: a model without rows, or with two rows of one name, is refused with the reason", async () => {
  await assert.rejects(htmlReport(sampleModel({ rows: [] })), /no rows: nothing was measured/);
  const rows = sampleModel().rows;
  await assert.rejects(
    htmlReport(sampleModel({ rows: [...rows, { ...(rows[0] as (typeof rows)[number]) }] })),
    /two rows named 'plain': give each row its own name/,
  );
});

test("htmlReport: backquoted words in the model's prose are code, and still escaped", async () => {
  const html = await htmlReport(
    sampleModel({
      context: ["from `migrate` to <RESUME>"],
      notes: ["`a<b`"],
      throughputNote: "from `migrate`",
    }),
  );
  assert.match(html, /<p class="context">from <code>migrate<\/code> to &lt;RESUME&gt;<\/p>/);
  assert.match(html, /<li><code>a&lt;b<\/code><\/li>/);
  assert.match(html, /One migration per row \(from <code>migrate<\/code>\)/);
});
