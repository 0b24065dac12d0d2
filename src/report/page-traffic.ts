/**
 * A migration's guest pages by how they travelled (report-model.ts PAGE_TRAFFIC_CATEGORIES), from what the
 * source QEMU counted (query-migrate: pages it sent in full, zero pages, xbzrle pages) and what vmprune's send
 * did to QEMU's full pages on the way (free pages turned into ZERO records, cache pages into references).
 */
import type { PruneReport } from "../prune/pruning-processor.ts";
import type { MigrationInfo } from "../qemu/qmp.ts";
import type { PageTrafficBytes } from "./report-model.ts";

/** x86-64 guest pages; QEMU's "normal"/"duplicate" counters count target pages of this size. */
const PAGE_SIZE = 4096;

/**
 * `info`: the source's final query-migrate; `prune`: send's report, or null for a migration without vmprune
 * (a dry run or a passthrough changed nothing, so it counts as none).
 */
export function pageTrafficOf(
  info: MigrationInfo,
  prune: PruneReport | null,
  pageSize = PAGE_SIZE,
): PageTrafficBytes {
  const fullPages = info.ram?.normal ?? 0;
  const pruning = prune?.mode === "prune" ? prune : null;
  const multifd = pruning?.multifd;
  const referenced = (pruning?.refs ?? 0) + (multifd?.pagesReferenced ?? 0);
  // `pages.pruned` counts references too, on the main channel (pruning-processor.ts) as on multifd ones.
  const freePruned =
    (pruning ? pruning.pages.pruned - pruning.refs : 0) +
    (multifd ? multifd.pagesPruned - multifd.pagesReferenced : 0);
  const traffic: PageTrafficBytes = {
    "sent whole": Math.max(0, fullPages - freePruned - referenced) * pageSize,
    "zero page": (info.ram?.duplicate ?? 0) * pageSize,
  };
  if (freePruned > 0) traffic["free, pruned"] = freePruned * pageSize;
  if (referenced > 0) traffic["cache, referenced"] = referenced * pageSize;
  const xbzrlePages = info["xbzrle-cache"]?.pages ?? 0;
  if (xbzrlePages > 0) traffic["xbzrle delta"] = xbzrlePages * pageSize;
  return traffic;
}
