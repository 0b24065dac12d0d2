/**
 * The main job, for now: boot a guest, run the mixed workload, live-migrate it with plain QEMU on loopback to a
 * fresh destination, verify the guest there, and report what moved. Later issues add the pruned runs beside it.
 */
import type { QemuVersion } from "../qemu/binaries.ts";
import type { MigrationInfo } from "../qemu/qmp.ts";
import type { KernelId } from "./kernels.ts";
import { LabPair } from "./lab-vm.ts";
import { guestMeminfo, runMixedWorkload } from "./workloads.ts";

export interface DemoOptions {
  kernel: KernelId;
  qemu: QemuVersion;
  memoryMiB: number;
  log: (line: string) => void;
}

export interface DemoRun {
  label: string;
  status: string;
  totalTimeMs: number;
  downtimeMs: number;
  transferredBytes: number;
  pagesSent: number;
  zeroPages: number;
  iterations: number;
  verify: string;
}

export interface DemoResult {
  kernel: string;
  qemu: string;
  accel: string;
  memoryMiB: number;
  bootMs: number;
  guestMemFreeKiB: number;
  guestCachedKiB: number;
  runs: DemoRun[];
}

export function summarizeMigration(label: string, info: MigrationInfo, verify: string): DemoRun {
  return {
    label,
    status: info.status ?? "unknown",
    totalTimeMs: info["total-time"] ?? 0,
    downtimeMs: info.downtime ?? 0,
    transferredBytes: info.ram?.transferred ?? 0,
    pagesSent: info.ram?.normal ?? 0,
    zeroPages: info.ram?.duplicate ?? 0,
    iterations: info.ram?.["dirty-sync-count"] ?? 0,
    verify,
  };
}

export async function runDemo(options: DemoOptions): Promise<DemoResult> {
  const { log } = options;
  log(`booting a ${options.memoryMiB} MiB guest: kernel ${options.kernel}, QEMU ${options.qemu}`);
  const pair = await LabPair.boot({
    kernel: options.kernel,
    qemu: options.qemu,
    memoryMiB: options.memoryMiB,
  });
  try {
    log(`booted in ${(pair.bootMs / 1000).toFixed(1)} s (${pair.accel}); running the mixed workload`);
    for (const line of await runMixedWorkload(pair.src.agent)) log(`  guest: ${line}`);
    const meminfo = await guestMeminfo(pair.src.agent);
    log("live-migrating with plain QEMU to a fresh destination on loopback");
    const result = await pair.migratePlain();
    const dst = pair.dst;
    if (!dst) throw new Error("no destination VM after migration");
    const verify = (await LabPair.verify(dst)).trim();
    log(`destination verify: ${verify}`);
    return {
      kernel: pair.image.kernel.release,
      qemu: pair.qemu.fullVersion,
      accel: pair.accel,
      memoryMiB: options.memoryMiB,
      bootMs: Math.round(pair.bootMs),
      guestMemFreeKiB: meminfo.MemFree ?? 0,
      guestCachedKiB: meminfo.Cached ?? 0,
      runs: [summarizeMigration("plain QEMU", result.info, verify)],
    };
  } finally {
    await pair.stop();
  }
}
