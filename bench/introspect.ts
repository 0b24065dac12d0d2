/**
 * Introspection speeds on a synthetic guest in a RAM file (/dev/shm, filled with non-zero data like a busy
 * guest): VMCOREINFO scan, openGuestKernel, page walks per second (uncached and cached), reading every struct
 * page of a section. Usage: node --import tsx bench/introspect.ts [sizeMiB=512]
 */
import { closeSync, openSync, unlinkSync, writeSync } from "node:fs";
import { AddressSpace } from "../src/introspect/address-space.ts";
import { openGuestKernel, openRawSnapshot } from "../src/introspect/kernel.ts";
import { buildSyntheticKernel } from "../src/introspect/synthetic-guest.ts";
import { requireSetup } from "./common.ts";

// A synthetic guest in /dev/shm: nothing of the lab is needed, only the npm packages (bench/preflight.mjs).
requireSetup("bench:introspect", {});
const sizeMiB = Number(process.argv[2] ?? 512);
const path = `/dev/shm/vmprune-bench-introspect-${process.pid}`;
const head = Buffer.alloc(32 * 1024 * 1024);
const kernel = buildSyntheticKernel(head);
const fd = openSync(path, "w");
try {
  writeSync(fd, head, 0, head.length, 0);
  const fill = Buffer.alloc(4 * 1024 * 1024);
  for (let i = 0; i < fill.length; i++) fill[i] = (i * 31 + 7) & 0xff;
  for (let off = head.length; off < sizeMiB * 1024 * 1024; off += fill.length)
    writeSync(fd, fill, 0, fill.length, off);
  closeSync(fd);
  const memory = openRawSnapshot(path);
  for (let rep = 0; rep < 3; rep++) {
    const k = openGuestKernel(memory);
    console.log(`openGuestKernel ${sizeMiB} MiB: scan ${k.scan.elapsedMs.toFixed(1)} ms (${k.release})`);
  }
  const k = openGuestKernel(memory);
  // Uncached walks: a fresh cache for every translation of the direct map (1 GiB pages) and vmemmap (2 MiB).
  const as = new AddressSpace(memory, { rootPa: kernel.rootPa, levels: 4, cacheEntries: 16 });
  let n = 0;
  let started = performance.now();
  while (performance.now() - started < 500) {
    for (let i = 0; i < 1000; i++) {
      as.clearCache();
      as.translate(kernel.directMapBase + BigInt((i * 4096) % (32 * 1024 * 1024)));
    }
    n += 1000;
  }
  console.log(`uncached page walks: ${Math.round(n / ((performance.now() - started) / 1000))}/s`);
  n = 0;
  started = performance.now();
  while (performance.now() - started < 500) {
    for (let i = 0; i < 1000; i++) as.translate(kernel.vmemmapBase + BigInt((i * 64) % (2 * 1024 * 1024)));
    n += 1000;
  }
  console.log(`cached translations: ${Math.round(n / ((performance.now() - started) / 1000))}/s`);
  const window = Buffer.alloc(32768 * 64);
  started = performance.now();
  for (let rep = 0; rep < 10; rep++) if (!k.memmap.read(0, 32768, window)) throw new Error("memmap read");
  console.log(
    `struct pages of one section (32768 PFNs): ${((performance.now() - started) / 10).toFixed(2)} ms`,
  );
  memory.close();
} finally {
  unlinkSync(path);
}
