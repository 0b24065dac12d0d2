/** Human-readable tables for the CLI. */
import type { DemoResult } from "../lab/demo.ts";

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

export function table(header: string[], rows: string[][]): string {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? "").length)));
  const line = (cells: string[]) =>
    cells.map((c, i) => (i === 0 ? c.padEnd(widths[i] ?? 0) : c.padStart(widths[i] ?? 0))).join("  ");
  return [line(header), widths.map((w) => "-".repeat(w)).join("  "), ...rows.map(line)].join("\n");
}

export function renderDemo(result: DemoResult): string {
  const head = [
    `guest: ${result.memoryMiB} MiB, kernel ${result.kernel}, QEMU ${result.qemu}, ${result.accel}, booted in ${(result.bootMs / 1000).toFixed(1)} s`,
    `guest before migration: MemFree ${formatBytes(result.guestMemFreeKiB * 1024)}, Cached ${formatBytes(result.guestCachedKiB * 1024)}`,
    "",
  ];
  const rows = result.runs.map((r) => [
    r.label,
    r.status,
    `${(r.totalTimeMs / 1000).toFixed(2)} s`,
    `${r.downtimeMs} ms`,
    formatBytes(r.transferredBytes),
    String(r.pagesSent),
    String(r.zeroPages),
    String(r.iterations),
    r.verify.startsWith("OK") ? "OK" : r.verify,
  ]);
  return `${head.join("\n")}${table(["migration", "status", "total time", "downtime", "on the wire", "pages sent", "zero pages", "passes", "verify"], rows)}\n`;
}
