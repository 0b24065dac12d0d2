/**
 * Page-by-page comparison of two guests' RAM files (source and destination of a migration, both paused): the
 * migration oracle. Reads both files in 4 MiB windows; reports the differing guest page frame numbers
 * (file offset / 4096, i.e. RAMBlock offsets of the lab's single RAM block).
 */
import { open } from "node:fs/promises";

const PAGE_SIZE = 4096;
const WINDOW = 4 * 1024 * 1024;

export interface RamDifference {
  pages: number;
  differing: number[];
}

export async function compareRamFiles(a: string, b: string, maxListed = 1024): Promise<RamDifference> {
  const [fa, fb] = await Promise.all([open(a, "r"), open(b, "r")]);
  try {
    const [sa, sb] = await Promise.all([fa.stat(), fb.stat()]);
    if (sa.size !== sb.size) throw new Error(`RAM files differ in size: ${a} ${sa.size} vs ${b} ${sb.size}`);
    const bufA = Buffer.allocUnsafe(WINDOW);
    const bufB = Buffer.allocUnsafe(WINDOW);
    const differing: number[] = [];
    let count = 0;
    for (let offset = 0; offset < sa.size; offset += WINDOW) {
      const length = Math.min(WINDOW, sa.size - offset);
      await Promise.all([fa.read(bufA, 0, length, offset), fb.read(bufB, 0, length, offset)]);
      if (bufA.compare(bufB, 0, length, 0, length) === 0) continue;
      for (let page = 0; page < length; page += PAGE_SIZE) {
        if (bufA.compare(bufB, page, page + PAGE_SIZE, page, page + PAGE_SIZE) !== 0) {
          count++;
          if (differing.length < maxListed) differing.push((offset + page) / PAGE_SIZE);
        }
      }
    }
    return {
      pages: sa.size / PAGE_SIZE,
      differing: count > differing.length ? [...differing, -1] : differing,
    };
  } finally {
    await Promise.all([fa.close(), fb.close()]);
  }
}
