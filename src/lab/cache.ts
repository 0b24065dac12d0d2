/**
 * Build-once folders keyed by their inputs: a folder is rebuilt only when the JSON of its inputs changes, built
 * in a temporary sibling and renamed into place, so an interrupted build never leaves a half-made artefact.
 * A lock file serialises concurrent builders (test files run in parallel processes).
 */
import { createHash } from "node:crypto";
import { existsSync } from "node:fs";
import { mkdir, open, readFile, rename, rm, writeFile } from "node:fs/promises";
import { dirname } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { processAlive } from "./cleanup.ts";

export function inputKey(inputs: unknown): string {
  return createHash("sha256").update(JSON.stringify(inputs)).digest("hex").slice(0, 16);
}

/** Runs `fn` holding an exclusive lock file; a lock left by a dead process is taken over. */
export async function withLock<T>(lockPath: string, fn: () => Promise<T>, timeoutMs = 900_000): Promise<T> {
  await mkdir(dirname(lockPath), { recursive: true });
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      const handle = await open(lockPath, "wx");
      await handle.writeFile(String(process.pid));
      await handle.close();
      break;
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code !== "EEXIST") throw error;
      const holder = Number.parseInt(await readFile(lockPath, "utf8").catch(() => ""), 10);
      if (Number.isFinite(holder) && !processAlive(holder)) {
        await rm(lockPath, { force: true });
        continue;
      }
      if (Date.now() > deadline)
        throw new Error(`timed out waiting for lock ${lockPath} held by pid ${holder}`);
      await sleep(200);
    }
  }
  try {
    return await fn();
  } finally {
    await rm(lockPath, { force: true });
  }
}

/**
 * Returns `dir`, building it with `build(tmpDir)` unless it already holds a build of the same inputs.
 * `build` writes everything into the temporary folder it is given.
 */
export async function cachedBuild(
  dir: string,
  inputs: unknown,
  build: (tmpDir: string) => Promise<void>,
): Promise<{ dir: string; built: boolean }> {
  const key = inputKey(inputs);
  const keyFile = `${dir}/.inputs-key`;
  const isCurrent = async () => existsSync(keyFile) && (await readFile(keyFile, "utf8")) === key;
  if (await isCurrent()) return { dir, built: false };
  return withLock(`${dir}.lock`, async () => {
    if (await isCurrent()) return { dir, built: false };
    const tmp = `${dir}.tmp-${process.pid}`;
    await rm(tmp, { recursive: true, force: true });
    await mkdir(tmp, { recursive: true });
    try {
      await build(tmp);
      await writeFile(`${tmp}/.inputs-key`, key);
      await writeFile(`${tmp}/.inputs.json`, JSON.stringify(inputs, null, 2));
      await rm(dir, { recursive: true, force: true });
      await rename(tmp, dir);
    } catch (error) {
      await rm(tmp, { recursive: true, force: true });
      throw error;
    }
    return { dir, built: true };
  });
}
