/**
 * Which vmprune this is: package.json's version, shown by `vmprune --version` and carried by every JSON report,
 * so that a report kept for later says which vmprune wrote it.
 */
import { readFileSync } from "node:fs";

/** package.json is two levels above this module, in src/report/ as compiled into dist/report/. */
const PACKAGE_JSON = new URL("../../package.json", import.meta.url);

let version: string | undefined;

export function vmpruneVersion(): string {
  if (version === undefined) {
    const parsed: unknown = JSON.parse(readFileSync(PACKAGE_JSON, "utf8"));
    const found =
      typeof parsed === "object" && parsed !== null && "version" in parsed ? parsed.version : undefined;
    if (typeof found !== "string") throw new Error(`${PACKAGE_JSON.pathname} has no version`);
    version = found;
  }
  return version;
}

/** What heads every JSON report: the version, and the process's peak resident memory so far (its high-water mark). */
export interface ReportOrigin {
  vmprune: { version: string; peakRssBytes: number };
}

/** `report` with the vmprune that wrote it as its first key. */
export function withOrigin<T extends object>(report: T): ReportOrigin & T {
  // resourceUsage().maxRSS is in KiB (getrusage ru_maxrss on Linux).
  return {
    vmprune: { version: vmpruneVersion(), peakRssBytes: process.resourceUsage().maxRSS * 1024 },
    ...report,
  };
}

/** A report as the CLI prints it for --json: indented, headed by its origin, one trailing newline. */
export function reportJson(report: object): string {
  return `${JSON.stringify(withOrigin(report), null, 2)}\n`;
}
