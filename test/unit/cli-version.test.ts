/** `vmprune --version` and the origin every JSON report carries: both package.json's version. */
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { test } from "node:test";
import { promisify } from "node:util";
import { REPO_ROOT } from "../../src/lab/paths.ts";
import { reportJson, vmpruneVersion, withOrigin } from "../../src/report/version.ts";

const execFileAsync = promisify(execFile);

async function packageVersion(): Promise<string> {
  const parsed = JSON.parse(await readFile(join(REPO_ROOT, "package.json"), "utf8")) as { version: string };
  return parsed.version;
}

test("vmprune --version and -V print package.json's version", async () => {
  const expected = await packageVersion();
  assert.match(expected, /^\d+\.\d+\.\d+/);
  for (const flag of ["--version", "-V"]) {
    const { stdout } = await execFileAsync(
      process.execPath,
      ["--import", "tsx", join(REPO_ROOT, "src/cli/main.ts"), flag],
      { cwd: REPO_ROOT, timeout: 60_000 },
    );
    assert.equal(stdout, `${expected}\n`);
  }
});

test("a JSON report is headed by the vmprune that wrote it, its own fields unchanged", async () => {
  const report = { status: "completed", totalTimeMs: 2312, pages: { free: 3 } };
  assert.equal(vmpruneVersion(), await packageVersion());
  const json = reportJson(report);
  assert.ok(json.endsWith("}\n"));
  const parsed = JSON.parse(json) as { vmprune: { version: string; peakRssBytes: number } };
  const { peakRssBytes } = parsed.vmprune;
  // This process's high-water mark: at least what it holds now, and not absurd.
  assert.ok(
    peakRssBytes >= process.memoryUsage().rss * 0.5 && peakRssBytes < 16 * 2 ** 30,
    String(peakRssBytes),
  );
  assert.deepEqual(parsed, { vmprune: { version: vmpruneVersion(), peakRssBytes }, ...report });
  assert.deepEqual(Object.keys(withOrigin(report)), ["vmprune", "status", "totalTimeMs", "pages"]);
});
