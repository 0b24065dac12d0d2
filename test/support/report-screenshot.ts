/**
 * The HTML report as a person sees it: the page opened in headless Chromium (Debian's `chromium`), and its
 * screenshot checked for the plots' own colours in the amounts three plots of two rows draw: bars of the timing
 * plot, the pruned and referenced segments of the page plot, the throughput areas and a pause band. Without the
 * plots, the page is text on white and every count below is 0.
 *
 * VMPRUNE_KEEP_SCREENSHOT=DIR copies the page and its screenshot there, to look at.
 */
import assert from "node:assert/strict";
import { type ChildProcess, spawn } from "node:child_process";
import { access, constants, copyFile, readFile, stat } from "node:fs/promises";
import { join } from "node:path";
import type { TestContext } from "node:test";
import { REPO_ROOT } from "../../src/lab/paths.ts";
import { decodePng } from "./png.ts";

/** Debian's chromium package puts its launcher here. */
export const CHROMIUM = "/usr/bin/chromium";

/** The window Chromium renders the page in: the page's width (1000 px and margins), tall enough for all of it. */
const WINDOW = { width: 1100, height: 2000 };

/** A child the test owns: its output, its end, and its stop by PID (its process group: Chromium forks). */
export function start(command: string, args: string[], timeoutMs: number) {
  const child: ChildProcess = spawn(command, args, {
    cwd: REPO_ROOT,
    stdio: ["ignore", "pipe", "pipe"],
    detached: true,
  });
  let stdout = "";
  let stderr = "";
  child.stdout?.on("data", (d: Buffer) => {
    stdout += d.toString();
  });
  child.stderr?.on("data", (d: Buffer) => {
    stderr += d.toString();
  });
  const stop = () => {
    if (child.pid !== undefined && child.exitCode === null && child.signalCode === null)
      try {
        process.kill(-child.pid, "SIGKILL");
      } catch {
        // Already gone.
      }
  };
  const done = new Promise<{ stdout: string; stderr: string }>((resolve, reject) => {
    const timer = setTimeout(() => {
      stop();
      reject(
        new Error(`${command} ran longer than ${timeoutMs} ms: stopped; stderr: ${stderr.slice(-2000)}`),
      );
    }, timeoutMs);
    child.on("error", reject);
    child.on("close", (code, signal) => {
      clearTimeout(timer);
      if (code === 0) resolve({ stdout, stderr });
      else reject(new Error(`${command} ended with ${signal ?? `code ${code}`}: ${stderr.slice(-2000)}`));
    });
  });
  return { done, stop };
}

/**
 * Pixels of `rgb` (give or take `tolerance` per channel) that lie in a horizontal run of at least `minRun` such
 * pixels, the first and last row they are on, and how many separate vertical bands those rows form (one per
 * plot panel): filled shapes (bars, areas, bands), not anti-aliased text, whose strokes are never that wide in
 * one colour.
 */
function countColour(
  png: ReturnType<typeof decodePng>,
  rgb: [number, number, number],
  tolerance = 2,
  minRun = 8,
): { pixels: number; firstY: number; lastY: number; bands: number } {
  let pixels = 0;
  let firstY = -1;
  let lastY = -1;
  let bands = 0;
  const matches = (x: number, y: number) => {
    const at = (y * png.width + x) * 4;
    return (
      Math.abs((png.rgba[at] ?? 0) - rgb[0]) <= tolerance &&
      Math.abs((png.rgba[at + 1] ?? 0) - rgb[1]) <= tolerance &&
      Math.abs((png.rgba[at + 2] ?? 0) - rgb[2]) <= tolerance
    );
  };
  for (let y = 0; y < png.height; y++) {
    let run = 0;
    for (let x = 0; x <= png.width; x++) {
      if (x < png.width && matches(x, y)) {
        run++;
        continue;
      }
      if (run >= minRun) {
        pixels += run;
        if (firstY < 0) firstY = y;
        // Panels are ~14 px apart (plots.ts spacing): a gap of more rows starts a new band.
        if (lastY < 0 || y - lastY > 10) bands++;
        lastY = y;
      }
      run = 0;
    }
  }
  return { pixels, firstY, lastY, bands };
}

/** Fails at once, before anything is booted, when Chromium is missing. */
export async function requireChromium(): Promise<void> {
  await access(CHROMIUM, constants.X_OK).catch(() => {
    throw new Error(`${CHROMIUM} is missing: install Debian's chromium package (scripts/setup.sh does)`);
  });
}

/** Screenshots the report `html` (two rows: a baseline and a pruned run) in `work`, and checks what it shows. */
export async function checkReportScreenshot(t: TestContext, html: string, work: string): Promise<void> {
  const png = join(work, "report.png");
  const profile = join(work, "chromium-profile");
  const chromium = start(
    CHROMIUM,
    [
      ...["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run"],
      `--user-data-dir=${profile}`,
      `--window-size=${WINDOW.width},${WINDOW.height}`,
      `--screenshot=${png}`,
      `file://${html}`,
    ],
    90_000,
  );
  t.after(chromium.stop);
  await chromium.done;
  const keep = process.env.VMPRUNE_KEEP_SCREENSHOT;
  if (keep) {
    await copyFile(html, join(keep, "report.html"));
    await copyFile(png, join(keep, "report.png"));
    t.diagnostic(`page and screenshot copied to ${keep}`);
  }
  assert.ok((await stat(png)).size > 20_000, "a screenshot with something in it");
  const image = decodePng(await readFile(png));
  assert.deepEqual([image.width, image.height], [WINDOW.width, WINDOW.height]);

  let white = 0;
  const colours = new Set<number>();
  for (let i = 0; i < image.width * image.height; i++) {
    const [r, g, b] = [image.rgba[i * 4] ?? 0, image.rgba[i * 4 + 1] ?? 0, image.rgba[i * 4 + 2] ?? 0];
    if (r > 250 && g > 250 && b > 250) white++;
    colours.add((r << 16) | (g << 8) | b);
  }
  const inked = 1 - white / (image.width * image.height);
  t.diagnostic(`${colours.size} colours, ${(inked * 100).toFixed(1)}% of the window not white`);
  assert.ok(colours.size > 100, `${colours.size} distinct colours: a rendering, not a blank page`);
  assert.ok(inked > 0.05, `${(inked * 100).toFixed(1)}% of the window drawn`);

  // The plots' own colours (src/report/plots.ts), as Chromium painted them.
  const timingBars = countColour(image, [76, 120, 168]); // the pruned run's bars, "sent whole" segments
  const baselineBars = countColour(image, [140, 140, 140]); // the baseline's bars
  const freePruned = countColour(image, [84, 162, 75]); // "free, pruned"
  const referenced = countColour(image, [184, 217, 138]); // "cache, referenced"
  const throughput = countColour(image, [103, 140, 181], 3, 4); // the areas, #4c78a8 at 0.85 on white; a 100 ms step is ~5 px wide
  const pauseBands = countColour(image, [246, 196, 196], 3); // #e45756 at 0.35 on white
  t.diagnostic(
    JSON.stringify({ timingBars, baselineBars, freePruned, referenced, throughput, pauseBands }, null, 0),
  );
  assert.ok(timingBars.pixels > 2_000, "bars of the pruned run");
  assert.ok(baselineBars.pixels > 1_000, "bars of the baseline");
  assert.ok(freePruned.pixels > 500, "free pages pruned, in the page plot");
  assert.ok(referenced.pixels > 200, "cache pages referenced, in the page plot");
  // The curves' shape is the migration's (a loaded host makes them spiky): ask for ink in two panels.
  assert.ok(throughput.pixels > 500, "throughput areas drawn");
  assert.equal(throughput.bands, 2, "one throughput panel per migration");
  // Top to bottom as on the page: timing, pages, throughput.
  assert.ok(baselineBars.lastY < freePruned.firstY, "the timing plot above the page plot");
  assert.ok(freePruned.lastY < throughput.firstY, "the page plot above the throughput plot");
  assert.ok(throughput.lastY < WINDOW.height - 20, "the page fits the window");
  // A pause band shows where no curve covers it: a short pause under a high curve (a loaded host) is hidden by the
  // area drawn over it, so at least one must show; that every row has its band is report-html.test.ts's (SVG).
  assert.ok(pauseBands.bands >= 1, "a migration's pause, shaded on its panel");
}
