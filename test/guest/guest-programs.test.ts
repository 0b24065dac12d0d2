/**
 * The guest programs, run natively on the host (they are plain static Linux programs): the agent's protocol,
 * timeouts and tolerance of garbage; the workloads' `verify` catching a changed byte in a file, in a keeper's
 * memory (written through /proc/PID/mem) and in a dirtying process; the kpageflags dump layout.
 */
import assert from "node:assert/strict";
import { mkdtemp, open, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";
import { run } from "../../src/lab/exec.ts";
import { parseReply } from "../../src/lab/guest-agent.ts";
import { ensureGuestPrograms } from "../../src/lab/guest-programs.ts";
import { labDir } from "../../src/lab/paths.ts";

const b64 = (s: string) => Buffer.from(s).toString("base64");

async function workDir(t: {
  after: (fn: () => Promise<void>) => void;
}): Promise<{ dir: string; env: NodeJS.ProcessEnv; vmwork: (...args: string[]) => Promise<string> }> {
  const programs = await ensureGuestPrograms(labDir());
  const dir = await mkdtemp(join(tmpdir(), "vmwork-"));
  const env = { ...process.env, VMWORK_STATE_DIR: join(dir, "state") };
  const vmwork = (...args: string[]) => run(programs.vmwork, args, { env, cwd: dir });
  t.after(async () => {
    await vmwork("stop").catch(() => undefined);
    await rm(dir, { recursive: true, force: true });
  });
  return { dir, env, vmwork };
}

test("agent: replies by id with status and output, ignores garbage, kills at the timeout, does not wait for daemons", async () => {
  const { agent } = await ensureGuestPrograms(labDir());
  const input = [
    "garbage before any request",
    `VMPRUNE-REQ 5 5000 ${b64("echo out; echo err >&2; exit 3")}`,
    "VMPRUNE-REQ 6 5000 !!!not-base64!!!",
    `VMPRUNE-REQ 7 300 ${b64("sleep 30")}`,
    `VMPRUNE-REQ 8 5000 ${b64("(sleep 30 &); echo started")}`,
    `VMPRUNE-REQ 9 0 ${b64("printf '%s' \"$(head -c 300000 /dev/zero | tr '\\0' x)\"")}`,
    "",
  ].join("\n");
  const started = performance.now();
  const stdout = await run(agent, ["-"], { input, timeoutMs: 20_000 });
  const elapsedMs = performance.now() - started;
  const replies = new Map(
    stdout
      .split("\n")
      .map(parseReply)
      .filter((r) => r !== undefined)
      .map((r) => [r.id, r.result]),
  );
  assert.deepEqual(replies.get(5), { status: 3, stdout: "out\n", stderr: "err\n" });
  assert.equal(replies.get(6)?.status, 125);
  assert.match(replies.get(6)?.stderr ?? "", /malformed/);
  assert.equal(replies.get(7)?.status, 124);
  assert.deepEqual(replies.get(8), { status: 0, stdout: "started\n", stderr: "" });
  assert.equal(replies.get(9)?.stdout.length, 300_000);
  assert.ok(elapsedMs < 15_000, `the agent did not wait for the background sleep (${elapsedMs} ms)`);
});

test("vmwork: every workload verifies, and verify reports the first changed byte of a file", async (t) => {
  const { dir, vmwork } = await workDir(t);
  await vmwork("gen", "f00", "2M");
  await vmwork("gen", "f01", "2M");
  assert.match(await vmwork("fill-cache", "f00"), /fill-cache files=1 bytes=2097152/);
  assert.match(await vmwork("map-files", "f01"), /map-files pid=\d+/);
  assert.match(await vmwork("anon", "4M"), /anon pid=\d+ addr=0x[0-9a-f]+ size=4194304/);
  await vmwork("tmpfs", "1M", dir);
  await vmwork("dirty-files", join(dir, "d"), "1M", "2");
  await vmwork("churn", "4M", "2");
  await vmwork("dirty", "4M", "2M");
  assert.match(await vmwork("verify"), /^OK 7 checks/);

  const handle = await open(join(dir, "f00"), "r+");
  await handle.write(Buffer.from([0xff]), 0, 1, 12345);
  await handle.close();
  await assert.rejects(vmwork("verify"), /FAIL file f00 at offset 12344/);
});

test("vmwork: verify catches a changed word in a keeper's anonymous memory", async (t) => {
  const { vmwork } = await workDir(t);
  const out = await vmwork("anon", "2M");
  const m = /pid=(\d+) addr=0x([0-9a-f]+)/.exec(out);
  assert.ok(m?.[1] && m[2]);
  assert.match(await vmwork("verify"), /^OK 1 checks/);
  const address = BigInt(`0x${m[2]}`) + 4096n * 100n + 8n;
  const mem = await open(`/proc/${m[1]}/mem`, "r+");
  await mem.write(Buffer.alloc(8), 0, 8, Number(address));
  await mem.close();
  await assert.rejects(vmwork("verify"), /FAIL anon - at offset 409608 .*got 0x0000000000000000/);
});

test("vmwork dirty: a page changed behind the writer's back is caught by verify", async (t) => {
  const { vmwork } = await workDir(t);
  const out = await vmwork("dirty", "64K", "1M");
  const m = /pid=(\d+) addr=0x([0-9a-f]+)/.exec(out);
  assert.ok(m?.[1] && m[2]);
  const mem = await open(`/proc/${m[1]}/mem`, "r+");
  // Page 200 is rewritten only after ~3 s at 64 KiB/s; verify sees the damage first.
  await mem.write(Buffer.from("garbage!"), 0, 8, Number(BigInt(`0x${m[2]}`) + 200n * 4096n + 64n));
  await mem.close();
  await assert.rejects(vmwork("verify"), /FAIL dirty/);
});

test("vmwork dirty sparse: a generation changes one word per page, and verify still checks every word", async (t) => {
  const { vmwork } = await workDir(t);
  const out = await vmwork("dirty", "4M", "64K", "sparse");
  const m = /pid=(\d+) addr=0x([0-9a-f]+)/.exec(out);
  assert.ok(m?.[1] && m[2]);
  const base = Number(BigInt(`0x${m[2]}`));
  const mem = await open(`/proc/${m[1]}/mem`, "r+");
  const read = async () => {
    const b = Buffer.alloc(4096);
    await mem.read(b, 0, 4096, base + 4096 * 3);
    return b;
  };
  const before = await read();
  await sleep(300); // 64 KiB at 4 MiB/s: many generations
  const after = await read();
  assert.notEqual(before.readBigUInt64LE(8), after.readBigUInt64LE(8), "the generation word changed");
  assert.ok(before.subarray(16).equals(after.subarray(16)), "nothing else in the page changed");
  assert.equal(after.readBigUInt64LE(0), 3n | (1n << 63n), "word 0: index and the sparse bit");
  assert.match(await vmwork("verify"), /^OK 1 checks/);
  await mem.write(Buffer.from("garbage!"), 0, 8, base + 4096 * 5 + 4000);
  await mem.close();
  await sleep(100);
  await assert.rejects(vmwork("verify"), /FAIL dirty/);
});

test("vmwork kpageflags: header and arrays laid out as documented", async (t) => {
  const { dir, vmwork } = await workDir(t);
  const dev = join(dir, "kpf.img");
  await writeFile(dev, "");
  const out = await vmwork("kpageflags", dev);
  const pfns = Number(/pfns=(\d+)/.exec(out)?.[1]);
  assert.ok(pfns > 0);
  const dump = await readFile(dev);
  assert.equal(dump.toString("latin1", 0, 8), "VMPKPF01");
  assert.equal(Number(dump.readBigUInt64LE(8)), pfns);
  const flagsOffset = Number(dump.readBigUInt64LE(16));
  const countsOffset = Number(dump.readBigUInt64LE(24));
  assert.equal(flagsOffset, 4096);
  assert.equal(countsOffset, 4096 + Math.ceil((pfns * 8) / 4096) * 4096);
  // The host has pages in use: some flag word and some map count are non-zero.
  let flagged = 0;
  let counted = 0;
  for (let i = 0; i < Math.min(pfns, 1 << 21); i++) {
    if (dump.readBigUInt64LE(flagsOffset + i * 8) !== 0n) flagged++;
    if (dump.readBigUInt64LE(countsOffset + i * 8) !== 0n) counted++;
  }
  assert.ok(flagged > 0 && counted > 0, `flags ${flagged}, counts ${counted}`);
});

test("vmwork: bad arguments give a clear error and a non-zero exit", async (t) => {
  const { vmwork } = await workDir(t);
  await assert.rejects(vmwork("anon", "lots"), /not a size: 'lots'/);
  await assert.rejects(vmwork("nosuch"), /unknown command 'nosuch'/);
  await assert.rejects(vmwork("fill-cache", "/nonexistent/file"), /cannot open \/nonexistent\/file/);
  assert.match(await vmwork("verify"), /^OK 0 checks/);
});
