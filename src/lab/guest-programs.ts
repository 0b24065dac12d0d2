/** The guest's own programs (command agent, workloads), compiled static from src/lab/guest/ at image build time. */
import { createHash } from "node:crypto";
import { readdir, readFile } from "node:fs/promises";
import { join } from "node:path";
import { cachedBuild } from "./cache.ts";
import { run } from "./exec.ts";
import { GUEST_SOURCES_DIR } from "./paths.ts";

export interface GuestPrograms {
  /** The command agent (src/lab/guest/agent.c). */
  agent: string;
  /** The multi-call workload tool `vmwork` (src/lab/guest/workload.c); also runs on the host (e.g. `gen`). */
  vmwork: string;
  /** Digest of the sources they were built from. */
  digest: string;
}

const CFLAGS = ["-static", "-O2", "-Wall", "-Wextra", "-Werror", "-std=gnu11"];

async function sourcesDigest(): Promise<string> {
  const hash = createHash("sha256");
  for (const name of (await readdir(GUEST_SOURCES_DIR)).sort()) {
    if (!/\.(c|h)$/.test(name)) continue;
    hash.update(name).update(await readFile(join(GUEST_SOURCES_DIR, name)));
  }
  return hash.digest("hex").slice(0, 16);
}

export async function ensureGuestPrograms(cacheRoot: string): Promise<GuestPrograms> {
  const digest = await sourcesDigest();
  const { dir } = await cachedBuild(join(cacheRoot, "guest-programs"), { digest, CFLAGS }, async (tmp) => {
    for (const [source, out] of [
      ["agent.c", "agent"],
      ["workload.c", "vmwork"],
    ] as const) {
      await run("gcc", [...CFLAGS, "-o", join(tmp, out), join(GUEST_SOURCES_DIR, source)]);
    }
  });
  return { agent: join(dir, "agent"), vmwork: join(dir, "vmwork"), digest };
}
