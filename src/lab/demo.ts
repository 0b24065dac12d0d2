/**
 * The main job: live-migrate a guest running the mixed workload on loopback through vmprune without pruning, with
 * free pages pruned, and with free and cache pages pruned (each from a freshly booted guest), verify the guest
 * after each, and report them side by side.
 */

import { join } from "node:path";
import type { Category } from "../introspect/classifier.ts";
import { type MigrateReport, migrate } from "../migrate/migrate.ts";
import { LOOPBACK_PARAMETERS } from "../qemu/migration.ts";
import { hostCpu, ownCpuMs } from "./host-cpu.ts";
import type { KernelId } from "./kernels.ts";
import { LabPair } from "./lab-vm.ts";
import type { QemuVersion } from "./qemu-binaries.ts";
import { guestMeminfo, runMixedWorkload } from "./workloads.ts";

/**
 * The demo's migrations, in order: the label its report and JSON carry, the short name its table column gets
 * (the labels are too wide for a column), and what it drops.
 */
export const DEMO_RUNS = [
  { label: "baseline (vmprune migrate --baseline)", short: "baseline", drop: [] },
  { label: "pruned (vmprune migrate --drop free)", short: "free", drop: ["free"] },
  { label: "pruned (--drop free,cache, with receive)", short: "free+cache", drop: ["free", "cache"] },
] as const satisfies readonly { label: string; short: string; drop: readonly Category[] }[];

export interface DemoOptions {
  kernel: KernelId;
  qemu: QemuVersion;
  memoryMiB: number;
  log: (line: string) => void;
  /** Sample each migration's link throughput this often (migrate's `throughputSampleMs`), for a report. */
  throughputSampleMs?: number;
  /** Each migration's full report as it completes (e.g. for the HTML report), with its label. */
  onMigrated?: (label: string, report: MigrateReport) => void;
}

export interface DemoRun {
  label: string;
  status: string;
  totalTimeMs: number;
  downtimeMs: number;
  /** Bytes QEMU wrote, and bytes that reached the destination (after pruning). */
  sourceBytes: number;
  wireBytes: number;
  /** PAGE records QEMU sent, ZERO records it sent, and PAGE records vmprune turned into ZERO records. */
  pageRecords: number;
  zeroRecords: number;
  droppedPages: number;
  /** Cache pages sent as references and rebuilt by receive from the shared disk. */
  references: number;
  byCategory: Record<string, number> | null;
  iterations: number;
  verify: string;
  /**
   * CPU time from `migrate` until `vmprune migrate` returned (ms): the whole host's (all cores, both QEMUs
   * included; /proc/stat), and this process's (vmprune's relay, send and receive; process.cpuUsage).
   */
  hostCpuMs: number;
  vmpruneCpuMs: number;
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

function demoRun(
  label: string,
  r: MigrateReport,
  verify: string,
  cpu: { host: number; vmprune: number },
): DemoRun {
  return {
    label,
    status: r.error ? `${r.status}: ${r.error}` : r.status,
    totalTimeMs: r.totalTimeMs,
    downtimeMs: r.downtimeMs,
    sourceBytes: r.sourceBytes,
    wireBytes: r.wireBytes,
    pageRecords: r.records?.page ?? 0,
    zeroRecords: r.records?.zero ?? 0,
    droppedPages: r.prune?.pages.pruned ?? 0,
    references: r.receive?.refsResolved ?? 0,
    byCategory: r.prune?.pages.byCategory ?? null,
    iterations: r.iterations,
    verify,
    hostCpuMs: Math.round(cpu.host),
    vmpruneCpuMs: Math.round(cpu.vmprune),
  };
}

/**
 * The demo: each migration from a guest of its own, freshly booted with the same mixed workload, to a fresh
 * destination whose guest RAM is anonymous memory, as production destinations' is (LabPair
 * `anonymousDestinationRam`): first the baseline (relay in passthrough), then pruned (`--drop free`), then
 * `--drop free,cache` through receive. So every migration starts from the same kind of guest, and the destination
 * pays for each page it receives what a production one does (a page fault and a copy; a ZERO record of an untouched
 * page only a read of the zero page). The guest is verified after each.
 */
export async function runDemo(options: DemoOptions): Promise<DemoResult> {
  const { log } = options;
  const runs: DemoRun[] = [];
  /** The report's header: the first guest's facts (every guest is booted and loaded alike). */
  let guest: Omit<DemoResult, "runs"> | undefined;
  for (const { label, drop } of DEMO_RUNS) {
    log(`booting a ${options.memoryMiB} MiB guest: kernel ${options.kernel}, QEMU ${options.qemu}`);
    const pair = await LabPair.boot({
      kernel: options.kernel,
      qemu: options.qemu,
      memoryMiB: options.memoryMiB,
      anonymousDestinationRam: true,
    });
    try {
      log(`booted in ${(pair.bootMs / 1000).toFixed(1)} s (${pair.accel}); running the mixed workload`);
      for (const line of await runMixedWorkload(pair.src.agent)) log(`  guest: ${line}`);
      const meminfo = await guestMeminfo(pair.src.agent);
      guest ??= {
        kernel: pair.image.kernel.release,
        qemu: pair.qemu.fullVersion,
        accel: pair.accel,
        memoryMiB: options.memoryMiB,
        bootMs: Math.round(pair.bootMs),
        guestMemFreeKiB: meminfo.MemFree ?? 0,
        guestCachedKiB: meminfo.Cached ?? 0,
      };
      const dst = await pair.startDestination();
      log(`live-migrating to a fresh destination on loopback: ${label}`);
      // CPU from the first progress report (right after `migrate`): the preparation before it is not the migration.
      let cpuFrom: { host: number; own: NodeJS.CpuUsage } | undefined;
      const report = await migrate({
        srcQmp: pair.src.toolQmpPath,
        dstQmp: dst.toolQmpPath,
        drop,
        disk: join(pair.diskDir, "data.img"),
        parameters: LOOPBACK_PARAMETERS,
        ...(options.throughputSampleMs ? { throughputSampleMs: options.throughputSampleMs } : {}),
        onProgress: () => {
          cpuFrom ??= { host: hostCpu().busyMs, own: process.cpuUsage() };
        },
        log: (line) => log(`  ${line}`),
      });
      const cpu = cpuFrom
        ? { host: hostCpu().busyMs - cpuFrom.host, vmprune: ownCpuMs(cpuFrom.own) }
        : { host: 0, vmprune: 0 };
      if (report.error || report.status !== "completed")
        throw new Error(`${label}: migration ${report.status}: ${report.error ?? ""}`);
      const verify = (await LabPair.verify(dst)).trim();
      log(`  destination verify: ${verify}`);
      runs.push(demoRun(label, report, verify, cpu));
      options.onMigrated?.(label, report);
    } finally {
      await pair.stop();
    }
  }
  if (!guest) throw new Error("the demo has no migration to run");
  return { ...guest, runs };
}
