/**
 * Checks made before a migration is pruned, on the whole guest as the resolved layout sees it
 * (../shared/docs/kernel-layouts.md §5, §7). A layout that reads struct pages wrongly gives counts far from the
 * kernel's own counters; a failed check turns pruning off for that migration, with the reason:
 *
 * - free pages: the buddy pages found = the zones' NR_FREE_PAGES, within the counters' movement while the
 *   running guest was classified plus a tolerance (the per-CPU vmstat lag, at most 125 pages per zone and CPU,
 *   and pages moving during the pass: 1% of the guest's pages, at least 256). Failing refuses free and cache.
 * - file pages (with BTF only: the node counters' layout comes from it): page-cache, dirty and writeback pages
 *   against the nodes' NR_FILE_PAGES, NR_FILE_DIRTY and NR_WRITEBACK, within 2% of the file pages (at least
 *   256). Failing refuses cache.
 * - batch path: the path that judges the stream (classifyPfns: batches of page records, a free page inside a
 *   block found through its buddy head, the free block a batch before found) against the whole-guest pass
 *   (classifyRange), on windows spread over the guest, each read by both right after each other: a page the
 *   batch path calls free that the whole pass does not is the one mistake that would zero a page in use. More
 *   than 1% of the pages checked (at least 16) refuses free and cache. It is also what makes V8 compile the
 *   judging path before the migration rather than during it, where its compiler threads took a core from the
 *   QEMUs: on the demo's guest they used 200-220 ms in the first pruned migration instead of 250-270 ms, for
 *   10-50 ms of checking before it.
 * - page poisoning (`page_poison=1`): the allocator checks the 0xaa pattern of every page it hands out and reports
 *   a zeroed free page as memory corruption. Detected from the `_page_poisoning_enabled` static key (kallsyms)
 *   or, without kallsyms, from the free pages themselves (most sampled free pages entirely 0xaa). Refuses free.
 */
import {
  ATTR,
  CATEGORY,
  type Classification,
  classifyPfns,
  type FreeBlockMemo,
  type PageClassifier,
  type StructPageSource,
} from "./classifier.ts";
import type { GuestMemory } from "./guest-memory.ts";
import type { OpenedClassifier } from "./inspect.ts";
import { kernelFreePages, onlineNodes } from "./zone-stats.ts";

export type CheckVerdict = "ok" | "failed" | "skipped";

export interface SelfCheck {
  name: "free-pages" | "file-pages" | "batch-path" | "page-poison";
  verdict: CheckVerdict;
  detail: string;
}

export interface SelfCheckResult {
  checks: SelfCheck[];
  /** Categories not to prune, with the reason. */
  refused: Partial<Record<"free" | "cache", string>>;
  elapsedMs: number;
}

/** PAGE_POISON (include/linux/poison.h): the byte a poisoned free page is filled with. */
const PAGE_POISON = 0xaa;
/** Free pages sampled for the poison pattern. */
const POISON_SAMPLES = 64;
const PAGE_SIZE = 4096;

/** Runs every check on the guest as it is now; `classify` classifies all present PFNs. */
export function selfCheck(
  opened: OpenedClassifier,
  memory: GuestMemory,
  classify: () => Classification,
): SelfCheckResult {
  const started = performance.now();
  const checks: SelfCheck[] = [];
  const refused: Partial<Record<"free" | "cache", string>> = {};
  const freeBefore = tryNumber(() => kernelFreePages(opened.kernel));
  const fileBefore = nodeFileCounters(opened);
  const all = classify();
  const freeAfter = tryNumber(() => kernelFreePages(opened.kernel));
  const fileAfter = nodeFileCounters(opened);
  let present = 0;
  let buddy = 0;
  let file = 0;
  let dirty = 0;
  let writeback = 0;
  for (let i = 0; i < all.categories.length; i++) {
    const c = all.categories[i] ?? 0;
    const a = all.attributes[i] ?? 0;
    if (c !== CATEGORY.unknown) present++;
    if (a & ATTR.buddy) buddy++;
    if (c === CATEGORY.cache || c === CATEGORY.inode || c === CATEGORY.shmem) file++;
    if (c === CATEGORY.cache || c === CATEGORY.inode) {
      if (a & ATTR.dirty) dirty++;
      if (a & ATTR.writeback) writeback++;
    }
  }

  if (freeBefore === null || freeAfter === null)
    checks.push({
      name: "free-pages",
      verdict: "skipped",
      detail: "VMCOREINFO does not locate NR_FREE_PAGES",
    });
  else {
    const slack = Math.max(256, Math.ceil(0.01 * present));
    const lo = Math.min(freeBefore, freeAfter) - slack;
    const hi = Math.max(freeBefore, freeAfter) + slack;
    const detail = `${buddy} buddy pages, NR_FREE_PAGES ${freeBefore}..${freeAfter} (tolerance ${slack})`;
    if (buddy >= lo && buddy <= hi) checks.push({ name: "free-pages", verdict: "ok", detail });
    else {
      checks.push({ name: "free-pages", verdict: "failed", detail });
      const reason = `the free pages found disagree with the kernel's own count (${detail}): the page layout is not understood`;
      refused.free = reason;
      refused.cache = reason;
    }
  }

  if (!fileBefore || !fileAfter)
    checks.push({
      name: "file-pages",
      verdict: "skipped",
      detail: "no BTF for the node counters (NR_FILE_PAGES, NR_FILE_DIRTY, NR_WRITEBACK)",
    });
  else {
    const slack = Math.max(256, Math.ceil(0.02 * Math.max(fileBefore.file, fileAfter.file)));
    const within = (ours: number, a: number, b: number) =>
      ours >= Math.min(a, b) - slack && ours <= Math.max(a, b) + slack;
    const detail =
      `file ${file} vs NR_FILE_PAGES ${fileBefore.file}..${fileAfter.file}, dirty ${dirty} vs ${fileBefore.dirty}..${fileAfter.dirty}, ` +
      `writeback ${writeback} vs ${fileBefore.writeback}..${fileAfter.writeback} (tolerance ${slack})`;
    const ok =
      within(file, fileBefore.file, fileAfter.file) &&
      within(dirty, fileBefore.dirty, fileAfter.dirty) &&
      within(writeback, fileBefore.writeback, fileAfter.writeback);
    checks.push({ name: "file-pages", verdict: ok ? "ok" : "failed", detail });
    if (!ok)
      refused.cache ??= `the page-cache pages found disagree with the kernel's own counters (${detail})`;
  }

  const batch = batchPathCheck(opened.classifier, opened.kernel.memmap, all.categories.length);
  checks.push(batch);
  if (batch.verdict === "failed") {
    const reason = `the stream's judging path disagrees with the whole-guest pass (${batch.detail})`;
    refused.free ??= reason;
    refused.cache ??= reason;
  }

  const poison = pagePoisoning(opened, memory, all);
  checks.push(poison);
  if (poison.verdict === "failed")
    refused.free ??= `the guest poisons free pages (page_poison=1: ${poison.detail}) and would report a zeroed one as corruption`;
  return { checks, refused, elapsedMs: performance.now() - started };
}

/** Windows the batch-path check reads, at most, spread over the guest. */
const BATCH_CHECK_WINDOWS = 32;
/** Page records in a batch of the check: about what one 64 KiB socket read of the stream holds. */
const BATCH_CHECK_RECORDS = 16;

/** See the header: the batch path against the whole-guest pass, window by window. */
export function batchPathCheck(
  classifier: PageClassifier,
  memmap: StructPageSource,
  maxPfn: number,
): SelfCheck {
  const span = classifier.buddySpan;
  const windows = Math.min(BATCH_CHECK_WINDOWS, Math.floor(maxPfn / span));
  const pages = Buffer.alloc(span * classifier.size);
  const batch = new Uint8Array(span);
  const memo: FreeBlockMemo = { head: -1, end: -1 };
  let compared = 0;
  let batchOnly = 0;
  let wholeOnly = 0;
  for (let w = 0; w < windows; w++) {
    const start = Math.floor((w * maxPfn) / windows / span) * span;
    for (let at = 0; at < span; at += BATCH_CHECK_RECORDS) {
      const pfns: number[] = [];
      for (let i = at; i < Math.min(span, at + BATCH_CHECK_RECORDS); i++) pfns.push(start + i);
      batch.set(classifyPfns(classifier, memmap, pfns, maxPfn, memo), at);
    }
    if (!memmap.read(start, span, pages)) continue; // no memmap there (a hole): nothing to compare
    const whole = classifier.classifyRange(start, span, pages).categories;
    for (let i = 0; i < span; i++) {
      const batchFree = batch[i] === CATEGORY.free;
      const wholeFree = whole[i] === CATEGORY.free;
      if (batchFree && !wholeFree) batchOnly++;
      if (wholeFree && !batchFree) wholeOnly++;
    }
    compared++;
  }
  const checked = compared * span;
  if (checked === 0)
    return { name: "batch-path", verdict: "skipped", detail: "no window of the guest had a readable memmap" };
  const slack = Math.max(16, Math.ceil(0.01 * checked));
  const detail = `${checked} pages in ${compared} windows: ${batchOnly} free only to the batch path, ${wholeOnly} only to the whole pass (tolerance ${slack})`;
  return { name: "batch-path", verdict: batchOnly <= slack ? "ok" : "failed", detail };
}

function tryNumber(f: () => number): number | null {
  try {
    const n = f();
    return Number.isFinite(n) ? n : null;
  } catch {
    return null;
  }
}

interface FileCounters {
  file: number;
  dirty: number;
  writeback: number;
}

/** Σ over nodes of NR_FILE_PAGES, NR_FILE_DIRTY, NR_WRITEBACK (`pglist_data.vm_stat`, enum node_stat_item: BTF). */
function nodeFileCounters(opened: OpenedClassifier): FileCounters | null {
  const types = opened.types;
  const info = opened.kernel.info;
  if (!types || !info.has("SYMBOL(node_data)")) return null;
  const vmStat = types.memberOffset("pglist_data", "vm_stat");
  const items = ["NR_FILE_PAGES", "NR_FILE_DIRTY", "NR_WRITEBACK"].map((n) =>
    types.enumValue("node_stat_item", n),
  );
  const [fileItem, dirtyItem, writebackItem] = items;
  if (
    vmStat === undefined ||
    fileItem === undefined ||
    dirtyItem === undefined ||
    writebackItem === undefined
  )
    return null;
  try {
    const as = opened.kernel.addressSpace;
    const out: FileCounters = { file: 0, dirty: 0, writeback: 0 };
    for (const pgdat of onlineNodes(opened.kernel)) {
      const at = (item: number) => Number(BigInt.asIntN(64, as.readU64(pgdat + BigInt(vmStat + item * 8))));
      out.file += at(fileItem);
      out.dirty += at(dirtyItem);
      out.writeback += at(writebackItem);
    }
    return out;
  } catch {
    return null;
  }
}

/** page_poison=1, from the kernel's static key or, without kallsyms, from sampled free pages. */
function pagePoisoning(opened: OpenedClassifier, memory: GuestMemory, all: Classification): SelfCheck {
  // mm/page_alloc.c (5.11+): DEFINE_STATIC_KEY_FALSE(_page_poisoning_enabled); `enabled` (atomic_t) at offset 0.
  const key = opened.kallsyms?.lookup("_page_poisoning_enabled");
  if (key !== undefined) {
    const enabled = tryNumber(() => {
      const word = Buffer.alloc(4);
      opened.kernel.addressSpace.readVirt(key, word, 0, 4);
      return word.readInt32LE(0);
    });
    if (enabled !== null)
      return enabled > 0
        ? { name: "page-poison", verdict: "failed", detail: "static key _page_poisoning_enabled is on" }
        : { name: "page-poison", verdict: "ok", detail: "static key _page_poisoning_enabled is off" };
  }
  // Sample buddy pages spread over the guest: a poisoned guest's free pages are all 0xaa, other guests' are not.
  const buddyPfns: number[] = [];
  for (let pfn = 0; pfn < all.attributes.length; pfn++)
    if ((all.attributes[pfn] ?? 0) & ATTR.buddy) buddyPfns.push(pfn);
  if (buddyPfns.length === 0)
    return { name: "page-poison", verdict: "skipped", detail: "no free page to sample" };
  const step = Math.max(1, Math.floor(buddyPfns.length / POISON_SAMPLES));
  let sampled = 0;
  let poisoned = 0;
  const page = Buffer.alloc(PAGE_SIZE);
  for (let i = 0; i < buddyPfns.length && sampled < POISON_SAMPLES; i += step) {
    const gpa = (buddyPfns[i] ?? 0) * PAGE_SIZE;
    if (!memory.contains(gpa, PAGE_SIZE)) continue;
    memory.readInto(gpa, page, 0, PAGE_SIZE);
    sampled++;
    if (page.every((b) => b === PAGE_POISON)) poisoned++;
  }
  const detail = `${poisoned} of ${sampled} sampled free pages hold the 0xaa poison pattern`;
  return { name: "page-poison", verdict: poisoned * 2 > sampled ? "failed" : "ok", detail };
}
