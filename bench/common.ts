/** What the lab benchmarks share: the median of their runs, and the guest/QEMU/runs options they all take. */
import { isKernelId, type KernelId } from "../src/lab/kernels.ts";
import { isQemuVersion, type QemuVersion } from "../src/qemu/binaries.ts";

/** The median (the mean of the middle two for an even count); 0 for no values. */
export function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  return sorted.length % 2 === 1 ? (sorted[mid] ?? 0) : ((sorted[mid - 1] ?? 0) + (sorted[mid] ?? 0)) / 2;
}

/** parseArgs options for --kernel, --qemu and --runs, with the benchmarks' defaults. */
export const LAB_OPTIONS = {
  kernel: { type: "string", default: "6.1" },
  qemu: { type: "string", default: "10.0" },
  runs: { type: "string", default: "3" },
} as const;

/** Checks --kernel, --qemu and --runs; errors name the bad value and repeat `usage`. */
export function labTarget(
  values: { kernel: string; qemu: string; runs: string },
  usage: string,
): { kernel: KernelId; qemu: QemuVersion; runs: number } {
  const runs = Number(values.runs);
  if (!isKernelId(values.kernel)) throw new Error(`unknown kernel ${values.kernel} (${usage})`);
  if (!isQemuVersion(values.qemu)) throw new Error(`unknown QEMU ${values.qemu} (${usage})`);
  if (!Number.isInteger(runs) || runs < 1) throw new Error(`--runs needs a positive integer (${usage})`);
  return { kernel: values.kernel, qemu: values.qemu, runs };
}
