/**
 * A report model shaped like bench:link's (plain QEMU, QEMU's options, vmprune rows, the ideal), with synthetic
 * but plausible figures: a 512 MiB guest over a 1 Gbit/s link.
 */
import type { MigrationReportModel, ReportRow, ThroughputSample } from "../../src/report/report-model.ts";

const MIB = 1024 * 1024;
const LINK_BYTES_PER_SEC = 117e6;

/** A migration that runs the link full for `busyMs`, then a tail at a quarter of it, sampled every 200 ms. */
function curve(busyMs: number, tailMs: number): ThroughputSample[] {
  const samples: ThroughputSample[] = [];
  for (let t = 200; t <= busyMs + tailMs; t += 200)
    samples.push({
      tMs: t,
      bytesPerSec:
        t <= busyMs ? LINK_BYTES_PER_SEC * (0.95 + 0.05 * Math.sin(t / 300)) : LINK_BYTES_PER_SEC / 4,
    });
  return samples;
}

function row(name: string, toResumeMs: number, pauseMs: number, pages: ReportRow["pageBytes"]): ReportRow {
  const sent = Object.values(pages).reduce((a, b) => a + (b ?? 0), 0);
  const linkBytes = (pages["sent whole"] ?? 0) * 1.02 + (sent - (pages["sent whole"] ?? 0)) * 0.003;
  return {
    name,
    toResumeMs,
    guestPauseMs: pauseMs,
    linkBytes,
    pageBytes: pages,
    throughput: curve(toResumeMs - pauseMs - 400, 400 + pauseMs),
    pause: { fromMs: toResumeMs - pauseMs, toMs: toResumeMs },
  };
}

export function sampleModel(overrides: Partial<MigrationReportModel> = {}): MigrationReportModel {
  return {
    title: "vmprune bench:link: mixed workload",
    context: [
      "512 MiB guest, mixed workload, kernel 6.1, QEMU 10.0 (tcg), medians of 3 runs per row.",
      "Link: veth shaped with tbf to 1000 Mbit/s, measured 0.936 Gbit/s.",
    ],
    rows: [
      row("plain", 5200, 180, { "sent whole": 560 * MIB, "zero page": 40 * MIB }),
      row("free-page-hint", 3900, 210, { "sent whole": 420 * MIB, "zero page": 60 * MIB }),
      row("xbzrle", 5400, 190, { "sent whole": 540 * MIB, "zero page": 40 * MIB, "xbzrle delta": 30 * MIB }),
      row("vmprune free", 2300, 150, {
        "sent whole": 250 * MIB,
        "free, pruned": 300 * MIB,
        "zero page": 40 * MIB,
      }),
      row("vmprune free+cache", 1500, 140, {
        "sent whole": 150 * MIB,
        "free, pruned": 300 * MIB,
        "cache, referenced": 100 * MIB,
        "zero page": 40 * MIB,
      }),
    ],
    baseline: "plain",
    ideal: { bytes: 130 * MIB, floorMs: 1170 },
    notes: ["Synthetic figures for the report's tests."],
    ...overrides,
  };
}
