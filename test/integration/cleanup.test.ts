/**
 * No QEMU process and no /dev/shm file outlives its owner: a migration that fails midway (destination killed)
 * leaves the source running and intact, and teardown removes everything; a test process interrupted
 * (SIGTERM) or killed outright (SIGKILL) mid-migration takes its QEMUs with it, and the sweep removes the
 * files a SIGKILL could not.
 */
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";
import { tracked } from "../../src/lab/cleanup.ts";
import { LabPair } from "../../src/lab/lab-vm.ts";
import { REPO_ROOT } from "../../src/lab/paths.ts";
import { sweepStaleRuns } from "../../src/lab/vm.ts";
import { workload } from "../../src/lab/workloads.ts";
import { MigrationFailed, prepareIncoming, runMigration } from "../../src/qemu/migration.ts";

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

async function waitGone(pids: number[], timeoutMs: number): Promise<number[]> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline && pids.some(alive)) await sleep(100);
  return pids.filter(alive);
}

test("destination dies mid-migration: migration fails, source keeps running and verifies, a retry succeeds, teardown leaves nothing", async (t) => {
  const pair = await LabPair.boot({ kernel: "6.1", qemu: "7.2", memoryMiB: 256 });
  t.after(() => pair.stop());
  await pair.src.agent.run(workload.anon("64M"), 60_000);
  await pair.src.agent.run(workload.churn("96M", 1), 60_000);
  const dst = await pair.startDestination();
  const uri = await prepareIncoming(dst.monitor, { incomingUri: "tcp:127.0.0.1:0" });
  const migration = runMigration(pair.src.monitor, uri, {
    parameters: { "max-bandwidth": 16 * 1024 * 1024 },
    onProgress: (info) => {
      if ((info.ram?.transferred ?? 0) > 8 * 1024 * 1024 && alive(dst.pid)) process.kill(dst.pid, "SIGKILL");
    },
  });
  await assert.rejects(
    migration,
    (error: unknown) => error instanceof MigrationFailed && error.info?.status === "failed",
  );
  assert.equal((await pair.src.monitor.execute("query-status")).status, "running");
  assert.match(await LabPair.verify(pair.src), /^OK/);

  const retry = await pair.migratePlain();
  assert.equal(retry.status, "completed");
  assert.match(await LabPair.verify(pair.dst ?? pair.src), /^OK/);

  const pids = [pair.src.pid, pair.dst?.pid ?? 0, dst.pid];
  const paths = [pair.src.ramPath, pair.src.runDir, pair.dst?.ramPath ?? "", pair.diskDir];
  await pair.stop();
  assert.deepEqual(await waitGone(pids, 5_000), []);
  for (const path of paths) assert.equal(existsSync(path), false, `${path} removed`);
  assert.deepEqual(tracked().pids, []);
});

async function startInterruptedMigration(): Promise<{
  child: ReturnType<typeof spawn>;
  started: { status: string; pids: number[]; paths: string[] };
}> {
  const child = spawn(
    process.execPath,
    ["--import", "tsx", join(REPO_ROOT, "test/integration/fixtures/interrupted-migration.ts")],
    {
      cwd: REPO_ROOT,
      stdio: ["ignore", "pipe", "inherit"],
    },
  );
  const line = await new Promise<string>((resolve, reject) => {
    let out = "";
    child.stdout?.on("data", (chunk: Buffer) => {
      out += chunk.toString();
      if (out.includes("\n")) resolve(out.slice(0, out.indexOf("\n")));
    });
    child.once("exit", (code) => reject(new Error(`fixture exited (${code}) before starting the migration`)));
  });
  return { child, started: JSON.parse(line) };
}

for (const signal of ["SIGTERM", "SIGKILL"] as const) {
  test(`a test process ${signal === "SIGTERM" ? "interrupted" : "killed"} mid-migration (${signal}) leaves no QEMU and, after the sweep, no files`, async (t) => {
    const { child, started } = await startInterruptedMigration();
    t.after(() => {
      // Should the test itself fail, still stop whatever the fixture started.
      for (const pid of [child.pid ?? 0, ...started.pids])
        if (pid && alive(pid)) process.kill(pid, "SIGKILL");
      sweepStaleRuns();
    });
    assert.equal(
      started.status === "active" || started.status === "setup",
      true,
      `migration running (${started.status})`,
    );
    assert.equal(started.pids.every(alive), true);
    await sleep(1_000);
    const exited = new Promise((resolve) => child.once("exit", resolve));
    child.kill(signal);
    await exited;
    assert.deepEqual(await waitGone(started.pids, 10_000), [], "QEMU processes ended with their owner");
    if (signal === "SIGKILL") {
      // A SIGKILLed owner runs no cleanup; the next run's sweep removes its files.
      const swept = sweepStaleRuns();
      assert.ok(swept.removed.length >= 3, `sweep removed ${swept.removed.join(", ")}`);
    }
    for (const path of started.paths) assert.equal(existsSync(path), false, `${path} removed`);
  });
}
