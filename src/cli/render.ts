/** Human-readable reports for the CLI (tables laid out by report/table.ts). */

import type { InspectReport } from "../introspect/inspect.ts";
import { DEMO_RUNS, type DemoResult, type DemoRun } from "../lab/demo.ts";
import type { LibvirtMigrateReport } from "../libvirt/migrate.ts";
import type { ReceiveReport } from "../migrate/link-receive.ts";
import type { MigrateProgress, MigrateReport } from "../migrate/migrate.ts";
import type { SendReport } from "../migrate/send.ts";
import type { SwitchoverGuardReport } from "../migrate/switchover-guard.ts";
import type { MultifdPruneReport } from "../prune/multifd-processor.ts";
import type { PruneReport } from "../prune/pruning-processor.ts";
import { REPORT_WIDTH, table, wrap } from "../report/table.ts";
import type { RelayReport } from "../stream/relay.ts";
import type { StreamSummaryJson } from "../stream/summary.ts";

export function formatBytes(bytes: number): string {
  const units = ["B", "KiB", "MiB", "GiB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit++;
  }
  return `${value.toFixed(unit === 0 ? 0 : 1)} ${units[unit]}`;
}

/**
 * `vmprune demo`: the guest, then one column per migration (short names, explained below the table) with its
 * share of the baseline beside it; units sit in the row names so that the cells are bare, right-aligned numbers.
 * Laid out for REPORT_WIDTH columns.
 */
export function renderDemo(result: DemoResult): string {
  const fit = (text: string) => wrap(text, REPORT_WIDTH);
  const head = [
    ...fit(
      `guest: ${result.memoryMiB} MiB, kernel ${result.kernel}, ${result.accel}, booted in ${(result.bootMs / 1000).toFixed(1)} s`,
    ),
    ...fit(`QEMU ${result.qemu}`),
    ...fit(
      `guest before migration: MemFree ${formatBytes(result.guestMemFreeKiB * 1024)}, Cached ${formatBytes(result.guestCachedKiB * 1024)}`,
    ),
    "",
  ];
  const [base, ...others] = result.runs;
  if (!base) return `${head.join("\n")}no migration ran\n`;
  const ratio = (a: number, b: number) => (b > 0 ? `${((100 * a) / b).toFixed(0)}%` : "-");
  const mib = (bytes: number) => (bytes / 2 ** 20).toFixed(1);
  const verified = (r: DemoRun) => r.verify.startsWith("OK");
  const metrics: [string, (r: DemoRun) => string, ((r: DemoRun) => number) | null][] = [
    ["status", (r) => r.status, null],
    ["total time (s)", (r) => (r.totalTimeMs / 1000).toFixed(2), (r) => r.totalTimeMs],
    ["downtime (ms)", (r) => String(r.downtimeMs), (r) => r.downtimeMs],
    ["host CPU (s)", (r) => (r.hostCpuMs / 1000).toFixed(2), (r) => r.hostCpuMs],
    ["  of it vmprune", (r) => (r.vmpruneCpuMs / 1000).toFixed(2), (r) => r.vmpruneCpuMs],
    ["on the wire (MiB)", (r) => mib(r.wireBytes), (r) => r.wireBytes],
    ["from QEMU (MiB)", (r) => mib(r.sourceBytes), null],
    ["PAGE records", (r) => String(r.pageRecords), null],
    ["ZERO records", (r) => String(r.zeroRecords), null],
    ["pages dropped", (r) => String(r.droppedPages), null],
    ["  cache, from disk", (r) => String(r.references), null],
    ["pre-copy passes", (r) => String(r.iterations), null],
    ["guest verify", (r) => (verified(r) ? "OK" : "FAILED"), null],
  ];
  const rows = metrics.map(([name, show, value]) => [
    name,
    show(base),
    ...others.flatMap((o) => [show(o), value ? ratio(value(o), value(base)) : ""]),
  ]);
  const header = ["", shortLabel(base), ...others.flatMap((o) => [shortLabel(o), "vs base"])];
  const notes = [
    `Columns: ${result.runs.map((r) => `${shortLabel(r)} = ${r.label}`).join(", ")}; vs base: the figure as a share of the baseline's. "cache, from disk": dropped cache pages that receive rebuilt from the shared disk; on one host cache pages go whole (no network lies between to save, and a rebuilt page costs both ends CPU), unless \`vmprune migrate --refs-when always\` asks for references anyway.`,
    ...result.runs.filter((r) => !verified(r)).map((r) => `${shortLabel(r)}: guest verify: ${r.verify}`),
    "Loopback: no network limits these migrations, so their times measure this host's CPU (vmprune's relay and " +
      "receive share it with both QEMUs), not what fewer bytes save on a real link; for that, `npm run bench:link` " +
      "migrates the same guest over a 1 Gbit/s link between two network namespaces. Each migration starts from a " +
      "freshly booted guest with the same workload, to a destination that keeps guest RAM in anonymous memory, as " +
      "production destinations do: each page it receives costs it a page fault and a copy; a pruned one, which it " +
      "only reads (the zero page), far less. " +
      "Host CPU: all cores' busy time from `migrate` until the command returned, both QEMUs included; of it " +
      "vmprune: its own process.",
  ];
  return `${head.join("\n")}${table(header, rows)}\n\n${notes.flatMap(fit).join("\n")}\n`;
}

/** A run's column name: the demo's short name for it, or its whole label for a run the demo does not know. */
function shortLabel(run: DemoRun): string {
  return DEMO_RUNS.find((r) => r.label === run.label)?.short ?? run.label;
}

/** `vmprune stream inspect`: a human summary of a migration stream. */
export function renderStreamSummary(s: StreamSummaryJson): string {
  const r = s.ram.records;
  const lines = [
    `stream: ${formatBytes(s.bytes)} (${s.bytes} bytes), version ${s.version ?? "?"}, machine ${s.machineType ?? "?"}`,
    `sha256: ${s.sha256}`,
    `sections: ${s.sections.length} (${countBy(s.sections.map((x) => `${x.type}${x.idstr ? ` ${x.idstr}` : ""}`))})`,
    `commands: ${s.commands.length ? countBy(s.commands.map((c) => c.name)) : "none"}`,
    "",
    table(
      ["RAM block", "length"],
      s.ram.blocks.map((b) => [b.id, formatBytes(b.length)]),
    ),
    "",
    table(
      ["RAM records", "count"],
      [
        ["PAGE", String(r.page)],
        ["  of which all-zero", String(s.ram.zeroPayloadPages)],
        ["ZERO", String(r.zero)],
        ["XBZRLE", String(r.xbzrle)],
        ["COMPRESS_PAGE", String(r.compress)],
        ["MULTIFD_FLUSH", String(r.multifdFlush)],
        ["MEM_SIZE", String(r.memSize)],
        ["EOS", String(r.eos)],
      ],
    ),
    "",
    `RAM records on the wire: ${formatBytes(s.ram.wireBytes)}`,
    s.passthroughFrom === null
      ? "parsed to the end"
      : `passthrough from byte ${s.passthroughFrom}: ${s.passthroughReason ?? ""}`,
  ];
  if (s.error) lines.push(`ERROR: ${s.error.message}`);
  return `${lines.join("\n")}\n`;
}

function countBy(items: string[]): string {
  const counts = new Map<string, number>();
  for (const i of items) counts.set(i, (counts.get(i) ?? 0) + 1);
  return [...counts].map(([k, n]) => `${n}× ${k}`).join(", ");
}

/**
 * A relay's connections: kind, bytes each way (named by the caller), how long the source went unread because the
 * destination side held the relay's bound (so that side set the pace), what closed them.
 */
function channelTable(relay: RelayReport, directions: [string, string]): string {
  return table(
    ["connection", "kind", ...directions, "source held", "closed by"],
    relay.channels.map((c) => [
      String(c.index),
      c.kind,
      formatBytes(c.bytesToDestination),
      formatBytes(c.bytesToSource),
      `${(c.sourceHeldMs / 1000).toFixed(2)} s`,
      c.closedBy,
    ]),
  );
}

/** `vmprune send`: what was relayed, per connection, and what the main channel carried. */
export function renderSendReport(r: SendReport): string {
  const lines = [
    channelTable(r.relay, ["to destination", "to source"]),
    `relayed in ${(r.relay.durationMs / 1000).toFixed(2)} s`,
  ];
  const s = r.stream;
  if (s) {
    const c = s.ram.records;
    lines.push(
      `main channel: ${c.page} PAGE (${s.ram.zeroPayloadPages} all-zero), ${c.zero} ZERO, ${c.xbzrle} XBZRLE, ` +
        `${c.compress} COMPRESS_PAGE, ${c.eos} EOS, ${s.sections.length} sections`,
      s.passthroughFrom === null
        ? "parsed to the end"
        : `parsed up to byte ${s.passthroughFrom} (${s.passthroughReason ?? ""}), then relayed raw`,
    );
  }
  if (r.prune) lines.push(...renderPruneLines(r.prune));
  if (r.cacheRefs) lines.push(renderCacheRefs(r.cacheRefs));
  if (r.diskIndex)
    lines.push(
      `shared disk index: ${r.diskIndex.entries} blocks (${r.diskIndex.alignmentBytes}-byte alignment) built in ${r.diskIndex.buildMs} ms`,
    );
  if (r.switchover) lines.push(renderSwitchover(r.switchover));
  if (r.relay.error) lines.push(`ERROR: ${r.relay.error}`);
  return `${lines.join("\n")}\n`;
}

/** Where clean cache pages were found: by the guest's metadata (the locator), by content (the index), or not. */
export function renderCacheRefs(c: NonNullable<SendReport["cacheRefs"]>): string {
  const misses = Object.entries(c.notLocated)
    .sort((a, b) => (b[1] ?? 0) - (a[1] ?? 0))
    .map(([reason, n]) => `${n} ${reason}`);
  return (
    `cache page locator ${c.locator}, prepared in ${c.prepareMs} ms: ${c.located} located` +
    (misses.length > 0 ? `; not located: ${misses.join(", ")}` : "") +
    `; content index: ${c.indexHits} found; sent whole: ${c.notFound}` +
    (c.notAccepted > 0 ? `; ${c.notAccepted} not offered (receive takes no such reference)` : "")
  );
}

/** What pruning did: pages by category when judged, how many were dropped, the bytes saved. */
export function renderPruneLines(p: PruneReport): string[] {
  const dry = p.mode === "dry-run";
  const lines = [
    `pruning: ${p.mode}${p.judge ? `, ${p.judge}` : ""}`,
    table(
      ["PAGE records by category", "pages", "bytes"],
      Object.entries(p.pages.byCategory)
        .filter(([, n]) => n > 0)
        .map(([c, n]) => [c, String(n), formatBytes(n * 4096)]),
    ),
    `${dry ? "would drop" : "dropped"} ${p.pages.pruned} of ${p.pages.seen} pages (${p.drop.join(", ")}), ` +
      `${formatBytes(p.bytesSaved)} ${dry ? "could be" : ""} saved; ${p.batches} batches judged in ${p.judgeMs} ms`,
  ];
  if (p.refs || p.cacheMisses || p.cacheWhole)
    lines.push(
      `cache pages: ${p.refs} sent as references to the shared disk, ${p.cacheMisses} not found there (sent whole)` +
        (p.cacheWhole
          ? `, ${p.cacheWhole} sent whole while the link was not what held the migration back (--refs-when link-busy)`
          : ""),
    );
  if (p.degraded) lines.push(`pruning off: ${p.degraded}`);
  if (p.multifd) lines.push(...renderMultifdLines(p.multifd, dry));
  return lines;
}

/** The multifd channels: pages judged and dropped per channel, and why a channel's pages went unpruned. */
export function renderMultifdLines(m: MultifdPruneReport, dry: boolean): string[] {
  const lines = [
    table(
      [
        "multifd connection",
        "channel",
        "packets",
        "normal pages",
        "judged",
        dry ? "would drop" : "dropped",
        "of them references",
        "saved",
      ],
      m.channels.map((c) => [
        String(c.connection),
        c.channelId === null ? "-" : String(c.channelId),
        String(c.packets),
        String(c.normalPages),
        String(c.pagesJudged),
        String(c.pagesPruned),
        String(c.pagesReferenced),
        formatBytes(c.bytesSaved),
      ]),
    ),
    `multifd: ${dry ? "would drop" : "dropped"} ${m.pagesPruned} of ${m.pagesJudged} judged pages (${m.pagesReferenced} as references to shared storage), ${formatBytes(m.bytesSaved)}`,
  ];
  for (const c of m.channels) {
    if (c.unpruned) lines.push(`multifd connection ${c.connection}: ${c.unpruned}`);
    for (const u of c.unjudged)
      lines.push(
        `multifd connection ${c.connection}: ${u.packets} packets (${u.pages} pages) unjudged: ${u.reason}`,
      );
  }
  return lines;
}

/** `vmprune inspect`: pages by category. */
export function renderInspectReport(r: InspectReport): string {
  const total = r.pfns || 1;
  const rows = Object.entries(r.pages).map(([name, n]) => [
    name,
    String(n),
    formatBytes(n * 4096),
    `${((100 * n) / total).toFixed(1)}%`,
  ]);
  return `${[
    `Linux ${r.kernel.release}, ${r.kernel.pagingLevels}-level paging; ${r.pfns} PFNs; free pruning ${r.layout.free.on ? "on" : `off (${r.layout.free.reason})`}, cache pruning ${r.layout.cache.on ? "on" : `off (${r.layout.cache.reason})`}; types: ${r.layout.btf}`,
    table(["category", "pages", "bytes", "share"], rows),
    `opened in ${r.timings.openMs.toFixed(0)} ms, classified in ${r.timings.classifyMs.toFixed(0)} ms`,
  ].join("\n")}\n`;
}

/** One progress line of `vmprune migrate` (stderr). */
export function renderMigrateProgress(p: MigrateProgress): string {
  const done =
    p.transferredBytes + p.remainingBytes > 0
      ? p.transferredBytes / (p.transferredBytes + p.remainingBytes)
      : 0;
  const width = 24;
  const filled = Math.round(done * width);
  const bar = `${"#".repeat(filled)}${".".repeat(width - filled)}`;
  return (
    `[${bar}] ${p.status} ${(p.elapsedMs / 1000).toFixed(1)} s, pass ${p.iteration}, ` +
    `${formatBytes(p.transferredBytes)} sent, ${formatBytes(p.remainingBytes)} left, ${p.mbps.toFixed(0)} Mbit/s, ` +
    `dropped ${p.pruned} pages`
  );
}

/** `vmprune migrate`: the report of one migration. */
export function renderMigrateReport(r: MigrateReport): string {
  const rows = [
    ["mode", r.mode],
    ["status", r.error ? `${r.status}: ${r.error}` : r.status],
    ["total time", `${r.totalTimeMs} ms`],
    ["downtime", `${r.downtimeMs} ms`],
    ["bytes from QEMU", formatBytes(r.sourceBytes)],
    ["bytes on the wire", formatBytes(r.wireBytes)],
    ["pre-copy passes", String(r.iterations)],
    ["destination", r.destinationStatus],
  ];
  const lines = [table(["migration", ""], rows)];
  if (r.records) {
    const c = r.records;
    lines.push(
      `records from QEMU: ${c.page} PAGE, ${c.zero} ZERO, ${c.xbzrle} XBZRLE, ${c.compress} COMPRESS_PAGE`,
    );
  }
  if (r.prune) lines.push(...renderPruneLines(r.prune));
  if (r.receive)
    lines.push(
      `references: ${r.receive.refsResolved} cache pages rebuilt from the disk, ${r.receive.refsNacked} NACKed and sent whole`,
    );
  return `${lines.join("\n")}\n`;
}

/** `vmprune receive`: what was rebuilt and relayed. */
export function renderReceiveReport(r: ReceiveReport): string {
  const lines = [
    channelTable(r.relay, ["to QEMU", "return path"]),
    `references: ${r.refs.refsResolved} rebuilt from the disk, ${r.refs.refsNacked} NACKed (${r.refs.pagesReceived} answered with the page)`,
  ];
  const refused = r.relay.refused ?? [];
  if (refused.length > 0)
    lines.push(
      `refused ${refused.length} connection${refused.length === 1 ? "" : "s"} before the handshake completed: ${refused.map((x) => `${x.peer} (${x.reason})`).join("; ")}`,
    );
  if (r.relay.error) lines.push(`ERROR: ${r.relay.error}`);
  return `${lines.join("\n")}\n`;
}

/** What the switchover guard told the source QEMU (migrate/switchover-guard.ts). */
export function renderSwitchover(g: SwitchoverGuardReport): string {
  if (g.linkBytesPerSecond === null)
    return "switchover guard: the link never carried a whole window; QEMU decided on its own estimate";
  const mb = (bytes: number) => `${(bytes / 1e6).toFixed(1)} MB`;
  const rate =
    g.linkRateSource === "carried"
      ? `no link-bound stretch (send was the slower side), counted on what the link carried, ${mb(g.linkBytesPerSecond)}/s`
      : `link measured at ${mb(g.linkBytesPerSecond)}/s`;
  const told =
    g.mode === "avail-switchover-bandwidth"
      ? `avail-switchover-bandwidth set ${g.updates} times, lowest ${mb(g.lowestGivenBytesPerSecond ?? 0)}/s (relay read-ahead ${mb(g.readAheadBytes)} deducted)`
      : `downtime-limit lowered ${g.updates} times, to ${g.lowestDowntimeLimitMs ?? "-"} ms at least`;
  const glided =
    g.glidingTicks > 0
      ? `; near the end, ${g.glidingTicks} ticks let the link run ahead of QEMU's pass end`
      : "";
  return `switchover guard: ${rate}; ${told}${glided}${g.errors > 0 ? `; ${g.errors} QMP errors` : ""}`;
}

/**
 * `vmprune libvirt migrate`: vmprune's bytes beside libvirt's own figures for the completed job (QEMU's counters,
 * i.e. before pruning), then what send did.
 */
export function renderLibvirtMigrateReport(r: LibvirtMigrateReport): string {
  const job = r.libvirtJob;
  const figure = (n: number | undefined, unit: "bytes" | "ms" | "pages" = "bytes") =>
    n === undefined ? "-" : unit === "bytes" ? `${formatBytes(n)} (${n})` : `${n} ${unit}`;
  const rows: string[][] = [
    ["bytes QEMU wrote to vmprune send", figure(r.bytes.fromQemu), "vmprune"],
    ["bytes on vmprune's link (before TLS)", figure(r.bytes.onLink), "vmprune"],
    ["saved", `${figure(r.bytes.savedBytes)} ${r.bytes.savedPercent}%`, "vmprune"],
  ];
  if (job) {
    const side = `libvirt (${job.side})`;
    rows.push(
      ["data processed", figure(job.dataProcessedBytes), side],
      ["memory total", figure(job.memoryTotalBytes), side],
      ["normal pages", figure(job.memoryNormalPages, "pages"), side],
      ["normal bytes", figure(job.memoryNormalBytes), side],
      ["constant (zero) pages", figure(job.memoryConstantPages, "pages"), side],
      ["iterations", job.iterations === undefined ? "-" : String(job.iterations), side],
      ["time elapsed", figure(job.timeElapsedMs, "ms"), side],
      ["downtime", figure(job.downtimeMs, "ms"), side],
    );
  }
  const lines = [
    `domain ${r.domain} → ${r.destUri} (${r.migrateUri}): ${r.status} in ${(r.elapsedMs / 1000).toFixed(1)} s`,
    ...(r.error ? [`ERROR: ${r.error}`] : []),
    ...r.ramSources.map((s) => `guest RAM: ${s}`),
    table(["", { header: "value" }, { header: "source", align: "left" }], rows),
    ...(job ? [] : [`libvirt's completed-job figures unavailable: ${r.libvirtJobError ?? "?"}`]),
    renderSendReport(r.send).trimEnd(),
  ];
  return `${lines.join("\n")}\n`;
}
