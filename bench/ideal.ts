/**
 * The ideal of a migration, shared by the benchmarks: the bytes of guest RAM that truly must cross, read from the
 * source's RAM while its guest is paused.
 */
import { open, stat } from "node:fs/promises";
import { CATEGORY } from "../src/introspect/classifier.ts";
import { blockOffsetToGpa } from "../src/introspect/guest-memory.ts";
import { classifyGuest } from "../src/introspect/inspect.ts";
import { openLiveVmMemory } from "../src/introspect/live-vm.ts";
import type { LabPair } from "../src/lab/lab-vm.ts";
import { QmpClient } from "../src/qemu/qmp.ts";

const PAGE_SIZE = 4096;

/**
 * Bytes of guest RAM that must travel: pages neither free nor clean page cache (by the guest kernel's own
 * struct pages) nor all zero. Read from the source's RAM file(s) while the guest is paused; RAMBlock offsets
 * not mapped into guest-physical memory (e.g. behind the VGA hole) count when non-zero.
 */
export async function idealBytes(
  pair: LabPair,
): Promise<{ ideal: number; freeOnly: number; counts: string }> {
  const qmp = await QmpClient.connect(pair.src.toolQmpPath);
  try {
    await qmp.execute("stop");
    try {
      const live = await openLiveVmMemory(qmp, pair.src.toolQmpPath);
      try {
        const { categories } = classifyGuest(live.memory);
        let ideal = 0;
        let freeOnly = 0;
        const pages = { free: 0, cache: 0, zero: 0, other: 0 };
        const zeroPage = Buffer.alloc(PAGE_SIZE);
        const window = Buffer.alloc(4 << 20);
        for (const [block, path] of Object.entries(live.sources)) {
          if (path.startsWith("process ")) throw new Error(`block ${block} has no RAM file to read`);
          const handle = await open(path, "r");
          try {
            const size = (await stat(path)).size;
            for (let offset = 0; offset < size; offset += window.length) {
              const { bytesRead } = await handle.read(
                window,
                0,
                Math.min(window.length, size - offset),
                offset,
              );
              for (let at = 0; at + PAGE_SIZE <= bytesRead; at += PAGE_SIZE) {
                const gpa = blockOffsetToGpa(live.layout, block, offset + at);
                const category = gpa === null ? CATEGORY.unknown : (categories[gpa / PAGE_SIZE] ?? 0);
                const zero = window.compare(zeroPage, 0, PAGE_SIZE, at, at + PAGE_SIZE) === 0;
                if (category === CATEGORY.free) pages.free++;
                else if (zero) pages.zero++;
                else if (category === CATEGORY.cache) pages.cache++;
                else pages.other++;
                if (category !== CATEGORY.free && !zero) {
                  freeOnly += PAGE_SIZE;
                  if (category !== CATEGORY.cache) ideal += PAGE_SIZE;
                }
              }
            }
          } finally {
            await handle.close();
          }
        }
        return { ideal, freeOnly, counts: JSON.stringify(pages) };
      } finally {
        live.memory.close();
      }
    } finally {
      await qmp.execute("cont");
    }
  } finally {
    qmp.close();
  }
}
