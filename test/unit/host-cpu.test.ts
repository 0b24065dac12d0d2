/**
 * The CPU trace of bench:link and the demo: a thread sampled beside its process is shown but not counted twice in
 * "the rest", and the main thread's time is a part of its process's (the rest of a Node process is V8's
 * compiler and collector threads).
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { CpuSampler, processCpuMs, threadCpuMs } from "../../src/lab/host-cpu.ts";

/** Keeps this thread busy for `ms`. */
function spin(ms: number): void {
  const until = performance.now() + ms;
  let x = 0;
  while (performance.now() < until) x += Math.sqrt(x + 1);
  assert.ok(x > 0);
}

test("the main thread's CPU is part of its process's, and grows with work on it", () => {
  const before = threadCpuMs(process.pid);
  spin(200);
  const main = threadCpuMs(process.pid);
  assert.ok(main - before >= 100, `main thread grew ${main - before} ms over 200 ms of spinning`);
  assert.ok(processCpuMs(process.pid) >= main);
  assert.equal(threadCpuMs(process.pid, 0x7fffffff), 0, "a thread that does not exist reads 0");
});

test("a part is shown, not added to the processes' sum; an exited process keeps its last reading", async () => {
  let whole = 1000;
  let part = 500;
  let gone = 300;
  const sampler = new CpuSampler(
    () => [
      { name: "proc", cpuMs: () => whole },
      { name: "proc's main thread", cpuMs: () => part, partOf: "proc" },
      { name: "exits", cpuMs: () => gone },
    ],
    1_000_000,
  );
  const from = Date.now();
  sampler.start();
  whole += 400;
  part += 300;
  gone = 0; // exited: /proc reads 0
  await new Promise((r) => setTimeout(r, 5));
  sampler.stop();
  const text = sampler.describe(from, Date.now());
  assert.match(text, /proc 400 ms, proc's main thread 300 ms, exits 0 ms/);
  const rest = Number(/the rest \([^)]*\) (-?\d+) ms/.exec(text)?.[1]);
  const busy = Number(/: (\d+) ms busy/.exec(text)?.[1]);
  assert.equal(rest, busy - 400, "only the process's 400 ms is taken from the host's busy time");
  assert.match(sampler.timeline(from, Date.now(), 1), /^\(host\/proc\/proc's main thread\/exits\)/);
});
