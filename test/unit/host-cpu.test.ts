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
  // The window lies between the readings: from after the first, to before the last (readings are in whole ms).
  sampler.start();
  const from = Date.now();
  whole += 400;
  part += 300;
  gone = 0; // exited: /proc reads 0
  await new Promise((r) => setTimeout(r, 5));
  const to = Date.now();
  sampler.stop();
  const text = sampler.describe(from, to);
  assert.match(text, /proc 400 ms, proc's main thread 300 ms, exits 0 ms/);
  const rest = Number(/the rest \([^)]*\) (-?\d+) ms/.exec(text)?.[1]);
  const busy = Number(/: (\d+) ms busy/.exec(text)?.[1]);
  assert.equal(rest, busy - 400, "only the process's 400 ms is taken from the host's busy time");
  assert.match(sampler.timeline(from, to, 1), /^\(host\/proc\/proc's main thread\/exits\)/);
});

test("a process first read inside the window counts from its first reading, not from its start", async () => {
  let late: number | undefined;
  const sampler = new CpuSampler(
    () => (late === undefined ? [] : [{ name: "late", cpuMs: () => late ?? 0 }]),
    1_000_000,
  );
  const pause = () => new Promise((r) => setTimeout(r, 5));
  sampler.start(); // a reading without it
  await pause();
  const from = Date.now();
  await pause();
  late = 5000; // it spent 5 s starting up (preallocating its RAM, say) before anyone read it
  sampler.stop(); // its first reading, inside the window
  late += 250;
  await pause();
  const to = Date.now();
  sampler.stop(); // the reading that closes the window
  const used = sampler.usage(from, to);
  assert.equal(used?.processes.get("late"), 250, "only the work after it was first read");
});
