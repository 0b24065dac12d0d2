import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { cachedBuild } from "../../src/lab/cache.ts";

test("cached build: built once per inputs, rebuilt when they change, no partial result on failure", async (t) => {
  const root = await mkdtemp(join(tmpdir(), "cache-"));
  t.after(() => rm(root, { recursive: true, force: true }));
  const dir = join(root, "thing");
  let builds = 0;
  const build = (content: string) => async (tmp: string) => {
    builds++;
    await writeFile(join(tmp, "out"), content);
  };
  assert.equal((await cachedBuild(dir, { v: 1 }, build("one"))).built, true);
  assert.equal((await cachedBuild(dir, { v: 1 }, build("two"))).built, false);
  assert.equal(await readFile(join(dir, "out"), "utf8"), "one");
  assert.equal((await cachedBuild(dir, { v: 2 }, build("two"))).built, true);
  assert.equal(await readFile(join(dir, "out"), "utf8"), "two");
  assert.equal(builds, 2);
  await assert.rejects(
    cachedBuild(dir, { v: 3 }, async () => {
      throw new Error("boom");
    }),
    /boom/,
  );
  assert.equal(await readFile(join(dir, "out"), "utf8"), "two", "a failed build leaves the previous one");
  assert.equal(existsSync(`${dir}.lock`), false);
});

test("concurrent builders of the same inputs build once", async (t) => {
  const root = await mkdtemp(join(tmpdir(), "cache-"));
  t.after(() => rm(root, { recursive: true, force: true }));
  let builds = 0;
  const build = async (tmp: string) => {
    builds++;
    await new Promise((r) => setTimeout(r, 50));
    await writeFile(join(tmp, "out"), "x");
  };
  await Promise.all([cachedBuild(join(root, "d"), 1, build), cachedBuild(join(root, "d"), 1, build)]);
  assert.equal(builds, 1);
});
