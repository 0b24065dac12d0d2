/**
 * What the HTML report shows: migrations of one guest side by side (the rows: plain QEMU, QEMU's own options,
 * vmprune), each with its times, its bytes on the link, the guest pages it carried by how they travelled, and one
 * migration's link throughput over time. Plain data, so that the CLI, the demo and the benchmarks fill it from
 * what they measured and `htmlReport` (html-report.ts) lays it out.
 */

/** One observation of a link's rate: `tMs` from the migration's start (`migrate`), averaged since the last one. */
export interface ThroughputSample {
  tMs: number;
  bytesPerSec: number;
}

/**
 * How a guest page travelled, in the order the report stacks them: sent in full (a PAGE record, or a multifd
 * page), dropped by vmprune as a free page (a ZERO record instead), sent by vmprune as a reference to the shared
 * disk (receive rebuilt it), QEMU's own zero pages, and xbzrle deltas.
 */
export const PAGE_TRAFFIC_CATEGORIES = [
  "sent whole",
  "free, pruned",
  "cache, referenced",
  "zero page",
  "xbzrle delta",
] as const;
export type PageTrafficCategory = (typeof PAGE_TRAFFIC_CATEGORIES)[number];

/** Bytes of guest pages (pages × page size, not wire bytes) by how they travelled; absent categories are 0. */
export type PageTrafficBytes = Partial<Record<PageTrafficCategory, number>>;

export interface ReportRow {
  /** The row's name as people read it ("plain", "vmprune free+cache"); any text, the report escapes it. */
  name: string;
  /** `migrate` on the source to the destination's RESUME. */
  toResumeMs: number;
  /** The source's STOP to the destination's RESUME (the pause the guest lived through); null when not known. */
  guestPauseMs: number | null;
  /** Bytes that crossed the link (or the relay's upstream) towards the destination. */
  linkBytes: number;
  pageBytes: PageTrafficBytes;
  /** One migration's link throughput, from `migrate` on; empty when it was not sampled. */
  throughput: readonly ThroughputSample[];
  /** When that migration's guest was paused, in ms from `migrate` (the STOP and RESUME events). */
  pause?: { fromMs: number; toMs: number };
}

export interface MigrationReportModel {
  title: string;
  /** Lines under the title: guest, QEMU, link, how many runs the figures are medians of. */
  context: readonly string[];
  rows: readonly ReportRow[];
  /** The name of the row the others are compared with (plain QEMU), if it is among `rows`. */
  baseline?: string;
  /** Bytes that truly had to move, and the least time to resume: those bytes at the link's measured rate. */
  ideal?: { bytes: number; floorMs?: number };
  /** What the throughput curves are, for the plot's caption (e.g. "the relay's bytes every 200 ms"). */
  throughputNote?: string;
  /** Paragraphs under the plots: how the figures were measured. */
  notes?: readonly string[];
}

/** The row named `model.baseline`, if there is one. */
export function baselineRow(model: MigrationReportModel): ReportRow | undefined {
  return model.baseline === undefined ? undefined : model.rows.find((r) => r.name === model.baseline);
}
