/**
 * Ground truth taken at (nearly) the moment the guest is paused: the guest dumps /proc/kpageflags to its spare
 * disk in the background and stays alive afterwards; the host watches the disk image for the dump's header (the
 * dumper writes it last, after the data, and fsyncs) and pauses the guest as soon as it appears. Waiting for the
 * agent's reply instead lets the dumper exit first, which frees its kernel stack and page tables: pages the dump
 * saw in use that are free at the pause, "false free" of the test's own making.
 */
import { open } from "node:fs/promises";
import { join } from "node:path";
import type { LabPair } from "./lab-vm.ts";
import { workload } from "./workloads.ts";

const HEADER_MAGIC = "VMPKPF01";
const POLL_MS = 2;

async function headerStamp(image: string): Promise<bigint | null> {
  const handle = await open(image, "r");
  try {
    const header = Buffer.alloc(40);
    await handle.read(header, 0, 40, 0);
    return header.toString("latin1", 0, 8) === HEADER_MAGIC ? header.readBigUInt64LE(32) : null;
  } finally {
    await handle.close();
  }
}

/** Dumps kpageflags and pauses the source guest right after; returns how long the host took to notice (ms). */
export async function dumpKpageflagsAndPause(pair: LabPair, timeoutMs = 120_000): Promise<number> {
  const image = join(pair.diskDir, "spare.img");
  const before = await headerStamp(image);
  await pair.src.agent.run(workload.kpageflagsHeld(Math.ceil(timeoutMs / 1000) + 600));
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const stamp = await headerStamp(image);
    if (stamp !== null && stamp !== before) {
      const seen = performance.now();
      await pair.src.monitor.execute("stop");
      return performance.now() - seen;
    }
    if (Date.now() > deadline)
      throw new Error(`no kpageflags dump appeared on ${image} within ${timeoutMs} ms`);
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
  }
}
