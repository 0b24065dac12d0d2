/**
 * The guest workloads (the `vmwork` tool in the guest, src/lab/guest/workload.c) as typed host calls, and the
 * mixed workload the demo and tests use.
 */

import { DATA_DISK_LAYOUT, type DataDiskLayout, dataFilePaths } from "./data-disk.ts";
import type { GuestAgent } from "./guest-agent.ts";
import { DISK_SERIAL } from "./initramfs.ts";

export type Size = `${number}${"K" | "M" | "G" | ""}`;

/** Shell-quotes one word for the guest's /bin/sh. */
function q(word: string): string {
  return /^[\w./:=@%+-]+$/.test(word) ? word : `'${word.replaceAll("'", "'\\''")}'`;
}

export const workload = {
  fillCache: (files: readonly string[]) => `vmwork fill-cache ${files.map(q).join(" ")}`,
  mapFiles: (files: readonly string[]) => `vmwork map-files ${files.map(q).join(" ")}`,
  dirtyFiles: (dir: string, size: Size, count = 4) => `vmwork dirty-files ${q(dir)} ${size} ${count}`,
  anon: (size: Size) => `vmwork anon ${size}`,
  tmpfs: (size: Size, dir = "/dev/shm") => `vmwork tmpfs ${size} ${q(dir)}`,
  churn: (size: Size, loops = 1) => `vmwork churn ${size} ${loops}`,
  /** Rewrites `size` of anonymous memory at a rate; `sparse`: each pass changes one word per page (XBZRLE-friendly). */
  dirty: (ratePerSecond: Size, size: Size = "64M", mode: "dense" | "sparse" = "dense") =>
    `vmwork dirty ${ratePerSecond} ${size}${mode === "sparse" ? " sparse" : ""}`,
  kpageflags: (device = `/dev/disk/by-serial/${DISK_SERIAL.spare}`) => `vmwork kpageflags ${q(device)}`,
  /** The dump in the background, the dumper kept alive `holdSeconds` after it (see dumpKpageflagsAndPause). */
  kpageflagsHeld: (holdSeconds: number, device = `/dev/disk/by-serial/${DISK_SERIAL.spare}`) =>
    `setsid vmwork kpageflags ${q(device)} ${holdSeconds} >/dev/null 2>&1 < /dev/null &`,
  verify: () => "vmwork verify",
  stop: () => "vmwork stop",
  status: () => "vmwork status",
} as const;

export interface MixedWorkloadSizes {
  /** Files read into clean, unmapped page cache. */
  cacheFiles: number;
  /** Files mmapped by a keeper process. */
  mappedFiles: number;
  anon: Size;
  tmpfs: Size;
  /** Anonymous memory filled with non-zero data and freed again. */
  churn: Size;
  churnLoops: number;
  dirtyFiles: { size: Size; count: number };
}

/** Sized for a 512 MiB guest: about 300 MiB in use, the rest mostly non-zero free pages. */
export const MIXED_512M: MixedWorkloadSizes = {
  cacheFiles: 6,
  mappedFiles: 2,
  anon: "64M",
  tmpfs: "32M",
  churn: "160M",
  churnLoops: 2,
  dirtyFiles: { size: "4M", count: 4 },
};

/** A page-cache-heavy 512 MiB guest: most data-disk files read (clean cache) or mapped, little else. */
export const CACHE_HEAVY_512M: MixedWorkloadSizes = {
  cacheFiles: 10,
  mappedFiles: 2,
  anon: "16M",
  tmpfs: "8M",
  churn: "32M",
  churnLoops: 1,
  dirtyFiles: { size: "1M", count: 1 },
};

/**
 * The papers' kind of guest (Wang et al., D3): it read a lot of files (about 150 MiB of clean page cache) and
 * used and freed about 200 MiB of memory, then went quiet: most of its memory is free (with old, non-zero data)
 * or clean cache. What pruning is for.
 */
export const IDLE_AFTER_WORK_512M: MixedWorkloadSizes = {
  cacheFiles: 9,
  mappedFiles: 0,
  anon: "8M",
  tmpfs: "4M",
  churn: "200M",
  churnLoops: 1,
  dirtyFiles: { size: "1M", count: 1 },
};

/**
 * Nothing dispensable: anonymous memory fills most of the guest (what is free was never touched, so it is zero
 * and plain QEMU skips it too), almost no page cache. What vmprune costs when there is nothing to prune.
 */
export const ANON_512M: MixedWorkloadSizes = {
  cacheFiles: 0,
  mappedFiles: 0,
  anon: "320M",
  tmpfs: "4M",
  churn: "4M",
  churnLoops: 1,
  dirtyFiles: { size: "1M", count: 1 },
};

/** A size in MiB, from the workloads' `64M`/`1G`/`4096K` notation. */
function mib(size: Size): number {
  const m = /^(\d+(?:\.\d+)?)([KMG]?)$/.exec(size);
  if (!m?.[1]) throw new Error(`not a size: ${size}`);
  const unit = m[2] === "G" ? 1024 : m[2] === "K" ? 1 / 1024 : m[2] === "M" ? 1 : 1 / (1024 * 1024);
  return Number(m[1]) * unit;
}

/** The 512 MiB workload `sizes` scaled to a guest of `memoryMiB`, with the data disk its files need. */
export interface ScaledWorkload {
  sizes: MixedWorkloadSizes;
  /** The data disk the pair needs (LabVmOptions.storage.dataLayout): as many files, each `factor` times larger. */
  layout: DataDiskLayout;
  factor: number;
}

/**
 * Every amount of `sizes` (a 512 MiB guest's) times memoryMiB / 512, and the files it reads and maps as many but
 * as much larger, so that a larger guest holds the same shares of free, cache, anonymous and tmpfs memory. The
 * disk has room for the files, the dirty files and a quarter more.
 */
export function scaleWorkload(sizes: MixedWorkloadSizes, memoryMiB: number): ScaledWorkload {
  const factor = memoryMiB / 512;
  if (!Number.isInteger(factor) || factor < 1)
    throw new Error(`a scaled workload needs a multiple of 512 MiB, not ${memoryMiB} MiB`);
  const scale = (size: Size): Size => `${Math.round(mib(size) * factor)}M`;
  const fileCount = Math.max(1, sizes.cacheFiles + sizes.mappedFiles);
  const fileSizeMiB = DATA_DISK_LAYOUT.fileSizeMiB * factor;
  const dirtyMiB = mib(sizes.dirtyFiles.size) * factor * sizes.dirtyFiles.count;
  return {
    factor,
    sizes: {
      ...sizes,
      anon: scale(sizes.anon),
      tmpfs: scale(sizes.tmpfs),
      churn: scale(sizes.churn),
      dirtyFiles: { size: scale(sizes.dirtyFiles.size), count: sizes.dirtyFiles.count },
    },
    layout: {
      fileCount,
      fileSizeMiB,
      imageSizeMiB: Math.ceil(((fileCount * fileSizeMiB + dirtyMiB) * 1.25) / 64) * 64 + 64,
    },
  };
}

/**
 * Runs the mixed workload; returns what each step printed. `files`: the data disk's files it reads and maps, in
 * that order (default: the lab's data disk's).
 */
export async function runMixedWorkload(
  agent: GuestAgent,
  sizes: MixedWorkloadSizes = MIXED_512M,
  files: readonly string[] = dataFilePaths(),
): Promise<string[]> {
  const cache = files.slice(0, sizes.cacheFiles);
  const mapped = files.slice(sizes.cacheFiles, sizes.cacheFiles + sizes.mappedFiles);
  // Churn last: the memory it fills and frees stays free with old non-zero data (what QEMU cannot see as
  // dispensable), instead of being taken again by the steps after it.
  const steps = [
    ...(cache.length > 0 ? [workload.fillCache(cache)] : []),
    ...(mapped.length > 0 ? [workload.mapFiles(mapped)] : []),
    workload.anon(sizes.anon),
    workload.tmpfs(sizes.tmpfs),
    workload.dirtyFiles("/data/scratch", sizes.dirtyFiles.size, sizes.dirtyFiles.count),
    workload.churn(sizes.churn, sizes.churnLoops),
  ];
  const out: string[] = [];
  // A step's time grows with the guest: 5 minutes per 512 MiB of the largest amount it writes, at least.
  const timeoutMs = 300_000 * Math.max(1, Math.ceil(Math.max(mib(sizes.anon), mib(sizes.churn)) / 512));
  for (const step of steps) out.push((await agent.run(step, timeoutMs)).trim());
  return out;
}

/** Parsed /proc/meminfo of the guest, in KiB. */
export async function guestMeminfo(agent: GuestAgent): Promise<Record<string, number>> {
  const text = await agent.run("cat /proc/meminfo");
  const info: Record<string, number> = {};
  for (const line of text.split("\n")) {
    const m = /^(\S+):\s+(\d+)/.exec(line);
    if (m?.[1] && m[2]) info[m[1]] = Number(m[2]);
  }
  return info;
}
