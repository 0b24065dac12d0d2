/**
 * The benchmarks' setup check (bench/common.ts requireSetup, bench/preflight.mjs): on a checkout where
 * scripts/setup.sh has not run, a benchmark says in one line what to run first, before it does anything.
 */
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { copyFile, mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { promisify } from "node:util";
import { type BenchNeeds, missingSetup, type SetupProbe, setupAdvice } from "../../bench/common.ts";
import { REPO_ROOT } from "../../src/lab/paths.ts";

const execFileAsync = promisify(execFile);

/** A host where exactly `files` exist and `commands` are on PATH. */
function probe(files: string[], commands: string[], isRoot = true): SetupProbe {
  return {
    labDir: "/lab",
    exists: (path) => files.includes(path),
    onPath: (command) => commands.includes(command),
    isRoot,
  };
}

const LINK: BenchNeeds = { guests: ["6.1"], qemu: ["10.0"], commands: ["ip", "tc"], root: true };
const BUILT = [
  "/lab/images/6.1/initrd.cpio",
  "/lab/data-disk/data.img",
  "/lab/qemu-10.0/root/usr/bin/qemu-system-x86_64",
  "/usr/bin/qemu-system-x86_64",
];

test("a fresh checkout: one line naming what is missing and the command to run first", () => {
  const advice = setupAdvice("bench:link", LINK, probe([], []));
  assert.equal(
    advice,
    "bench:link cannot run yet (missing: the 6.1 guest image, the guest data disk, QEMU 10.0, ip, tc): " +
      "run `bash scripts/setup.sh` first, as root",
  );
});

test("set up: nothing to say; only what a benchmark needs counts", () => {
  assert.equal(setupAdvice("bench:link", LINK, probe(BUILT, ["ip", "tc"])), null);
  assert.deepEqual(missingSetup({ guests: ["6.12"], qemu: ["7.2"] }, probe(BUILT, [])), [
    "the 6.12 guest image",
  ]);
  assert.deepEqual(missingSetup({ qemu: ["7.2"] }, probe([], [])), [
    "QEMU 7.2 (/usr/bin/qemu-system-x86_64)",
  ]);
  assert.equal(setupAdvice("bench:introspect", {}, probe([], [], false)), null);
  // A kernel setup does not build is built on its first boot: only what setup installs must be there.
  assert.deepEqual(missingSetup({ guests: ["6.18"] }, probe(BUILT, [])), []);
  assert.deepEqual(missingSetup({ guests: ["6.18"] }, probe([], [])), ["the guest data disk"]);
});

test("set up but not root: the network namespaces need root", () => {
  assert.equal(
    setupAdvice("bench:link", LINK, probe(BUILT, ["ip", "tc"], false)),
    "bench:link creates network namespaces: run it as root",
  );
});

test("npm run bench:prune with an empty lab folder stops at once with the one line", async () => {
  const lab = await mkdtemp(join(tmpdir(), "vmprune-bench-setup-"));
  try {
    const failed = await execFileAsync(
      process.execPath,
      ["--import", "./bench/preflight.mjs", "--import", "tsx", "bench/prune.ts", "--kernel", "6.12"],
      { cwd: REPO_ROOT, env: { ...process.env, VMPRUNE_LAB_DIR: lab }, timeout: 60_000 },
    ).then(
      () => null,
      (error: unknown) => error as { code: number; stdout: string; stderr: string },
    );
    assert.ok(failed, "the benchmark must not run");
    assert.equal(failed.code, 1);
    assert.equal(failed.stdout, "");
    assert.match(
      failed.stderr,
      /^bench:prune cannot run yet \(missing: the 6\.12 guest image, the guest data disk/,
    );
    assert.match(failed.stderr, /run `bash scripts\/setup\.sh` first, as root\n$/);
    assert.equal(failed.stderr.split("\n").length, 2, "one line");
  } finally {
    await rm(lab, { recursive: true, force: true });
  }
});

test("without the npm packages, bench/preflight.mjs says so before tsx is looked for", async () => {
  // A copy outside the checkout resolves packages from there, where there are none: as in a fresh clone.
  const dir = await mkdtemp(join(tmpdir(), "vmprune-preflight-"));
  try {
    await copyFile(join(REPO_ROOT, "bench", "preflight.mjs"), join(dir, "preflight.mjs"));
    const failed = await execFileAsync(
      process.execPath,
      ["--import", "./preflight.mjs", "--import", "tsx", "-e", "console.log('ran')"],
      { cwd: dir, timeout: 60_000 },
    ).then(
      () => null,
      (error: unknown) => error as { code: number; stdout: string; stderr: string },
    );
    assert.ok(failed);
    assert.equal(failed.code, 1);
    assert.equal(
      failed.stderr,
      "the npm packages are not installed: run `bash scripts/setup.sh` first (or `npm ci`)\n",
    );
    const ok = await execFileAsync(
      process.execPath,
      ["--import", "./bench/preflight.mjs", "-e", "console.log('ran')"],
      { cwd: REPO_ROOT, timeout: 60_000 },
    );
    assert.equal(ok.stdout, "ran\n");
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});
