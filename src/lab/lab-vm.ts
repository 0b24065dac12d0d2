/**
 * Lab VMs as tests, the demo and benchmarks use them: a source VM booted with one kernel on one QEMU, a
 * destination started to receive it, both sharing one copy of the data disk (shared storage), and plain-QEMU
 * live migration between them on loopback.
 */

import { randomBytes } from "node:crypto";
import { copyFile, mkdir, rm, truncate, writeFile } from "node:fs/promises";
import { join } from "node:path";
import {
  type MigrationOptions,
  type MigrationResult,
  prepareIncoming,
  runMigration,
  waitDestinationState,
} from "../qemu/migration.ts";
import { detectAccelerator } from "./accel.ts";
import { trackPath, untrackPath } from "./cleanup.ts";
import { buildDataDisk, type DataDiskLayout } from "./data-disk.ts";
import { DEBIAN_GUEST_KERNEL, ensureDebianGuest } from "./debian-guest.ts";
import { run } from "./exec.ts";
import { ensureGuestImage, type GuestImage } from "./guest-image.ts";
import { DISK_SERIAL } from "./initramfs.ts";
import type { KernelId } from "./kernels.ts";
import { ensureQemu, type QemuBinary, type QemuVersion } from "./qemu-binaries.ts";
import { type Accelerator, RUN_ROOT, Vm, type VmConfig } from "./vm.ts";
import { workload } from "./workloads.ts";

export interface LabVmOptions {
  kernel: KernelId;
  /**
   * "lab" (default): the busybox initramfs guest with the lab's data disk. "debian": the whole Debian system with
   * PostgreSQL (src/lab/debian-guest.ts) on kernel 6.1, its system disk the shared disk in the data disk's place:
   * a qcow2 overlay per pair over the cached image (`data.qcow2`), or with `storage.format` "raw" a sparse copy
   * of it (`data.img`).
   */
  guest?: "lab" | "debian";
  qemu: QemuVersion;
  memoryMiB?: number;
  vcpus?: number;
  cpu?: string;
  accel?: Accelerator;
  extraArgs?: string[];
  /** Extra kernel command-line arguments (e.g. "page_poison=1"). */
  kernelArgs?: string;
  /** A second RAM block (pc-dimm) of this many MiB. */
  dimmMiB?: number;
  /** The guest RAM's memory-backend id, i.e. its RAMBlock's name in the stream (VmConfig.ramBackendId). */
  ramBackendId?: string;
  bootTimeoutMs?: number;
  /** A virtio-balloon device on source and destination (see VmConfig.balloon). */
  balloon?: "free-page-hint";
  /** Start the source with -S and do not wait for the guest: RAM holds only firmware (tiny streams). */
  frozen?: boolean;
  /**
   * Destinations' guest RAM in anonymous memory (VmConfig.anonymousRam), for benchmarks and the demo, whose destinations no
   * oracle reads and which are never promoted to sources.
   */
  anonymousDestinationRam?: boolean;
  /** Destinations' guest RAM faulted in when they start (VmConfig.preallocateRam). */
  preallocateDestinationRam?: boolean;
  /**
   * Network namespaces (src/lab/netns.ts) to start the source and the destination QEMU in (VmConfig.netns), so
   * that their migration traffic crosses a link between them (src/lab/shaped-link.ts). Absent: this process's
   * namespace. Give `migratePlain` an `incomingUri` on the destination's address then.
   */
  netns?: { src?: string; dst?: string };
  /**
   * Shared storage as operators have it: `format` "qcow2" puts the data disk in a qcow2 overlay over a raw
   * backing file (the guest's writes land in the overlay); `second` adds a second ext4 data disk (its own
   * filesystem UUID, files made like the first's; the guest mounts it with {@link mountSecondDisk}).
   */
  storage?: {
    format?: "raw" | "qcow2";
    second?: boolean;
    /** The data disk made for this pair with this layout (a sparse image of its size) instead of the lab's. */
    dataLayout?: DataDiskLayout;
  };
}

/** systemd and PostgreSQL under TCG take about a minute to come up (measured); twice that and some. */
const DEBIAN_BOOT_TIMEOUT_MS = 300_000;

/** The second data disk: smaller than the first, same kind of files (data-disk.ts). */
const SECOND_DISK_LAYOUT: DataDiskLayout = { fileCount: 4, fileSizeMiB: 8, imageSizeMiB: 64 };

/** Where the guest mounts the second data disk, and the shell line that does it. */
export const SECOND_DISK_MOUNT = "/data2";
export function mountSecondDisk(): string {
  return `mkdir -p ${SECOND_DISK_MOUNT} && mount -t ext4 /dev/disk/by-serial/${DISK_SERIAL.data2} ${SECOND_DISK_MOUNT} && echo OK`;
}

/** Spare raw disk per guest: room for a /proc/kpageflags + kpagecount dump (16 bytes per 4 KiB page). */
function spareDiskBytes(memoryMiB: number): number {
  return 1024 * 1024 + Math.ceil(((memoryMiB + 4096) * 256 * 16) / 4096) * 4096;
}

/**
 * The pair's data disk in `diskDir`: `data.img`, a copy of the lab's (or one made with `dataLayout`), with
 * format "qcow2" `data.qcow2` over it. The Debian guest's system disk takes its place: `data.qcow2` directly over
 * the cached image (which QEMU opens read-only as a backing file: nothing copied), or with "raw" a sparse copy.
 */
async function prepareDataDisk(
  image: GuestImage,
  diskDir: string,
  debian: boolean,
  storage: LabVmOptions["storage"],
): Promise<void> {
  const raw = join(diskDir, "data.img");
  const overlay = (backing: string) =>
    run("qemu-img", ["create", "-q", "-f", "qcow2", "-b", backing, "-F", "raw", join(diskDir, "data.qcow2")]);
  if (debian) {
    if (storage?.format === "raw")
      await run("cp", ["--sparse=always", "--reflink=auto", image.dataDisk, raw]);
    else await overlay(image.dataDisk);
    return;
  }
  if (storage?.dataLayout) await buildDataDisk(image.programs.vmwork, raw, storage.dataLayout);
  else await copyFile(image.dataDisk, raw);
  if (storage?.format === "qcow2") await overlay(raw);
}

export class LabPair {
  dst: Vm | undefined;
  private stopped = false;

  private constructor(
    readonly options: Required<Pick<LabVmOptions, "kernel" | "qemu" | "memoryMiB" | "vcpus">> & LabVmOptions,
    readonly qemu: QemuBinary,
    readonly image: GuestImage,
    readonly accel: Accelerator,
    readonly diskDir: string,
    public src: Vm,
    readonly bootMs: number,
  ) {}

  private static config(
    options: LabPair["options"],
    qemu: QemuBinary,
    image: GuestImage,
    accel: Accelerator,
    diskDir: string,
    name: string,
    role: "src" | "dst",
  ): VmConfig {
    return {
      name,
      qemu,
      image: options.kernelArgs ? { ...image, cmdline: `${image.cmdline} ${options.kernelArgs}` } : image,
      accel,
      memoryMiB: options.memoryMiB,
      vcpus: options.vcpus,
      ...(options.cpu ? { cpu: options.cpu } : {}),
      disks: {
        data:
          options.storage?.format === "qcow2"
            ? { path: join(diskDir, "data.qcow2"), format: "qcow2" }
            : join(diskDir, "data.img"),
        spare: join(diskDir, "spare.img"),
        ...(options.storage?.second ? { data2: join(diskDir, "data2.img") } : {}),
      },
      ...(options.extraArgs ? { extraArgs: options.extraArgs } : {}),
      ...(options.dimmMiB ? { dimmMiB: options.dimmMiB } : {}),
      ...(options.ramBackendId ? { ramBackendId: options.ramBackendId } : {}),
      ...(options.balloon ? { balloon: options.balloon } : {}),
      ...(options.netns?.[role] ? { netns: options.netns[role] } : {}),
      ...(role === "dst" && options.anonymousDestinationRam ? { anonymousRam: true } : {}),
      ...(role === "dst" && options.preallocateDestinationRam ? { preallocateRam: true } : {}),
    };
  }

  /** Boots the source VM (with its own copy of the data disk) and waits for its agent. */
  static async boot(opts: LabVmOptions): Promise<LabPair> {
    const debian = opts.guest === "debian";
    if (debian && opts.kernel !== DEBIAN_GUEST_KERNEL)
      throw new Error(
        `the Debian guest runs kernel ${DEBIAN_GUEST_KERNEL}, not ${opts.kernel}: ask for that one`,
      );
    const options = {
      memoryMiB: 512,
      vcpus: 1,
      ...opts,
      // The Debian guest's system disk is a qcow2 overlay unless a raw copy is asked for.
      ...(debian ? { storage: { ...opts.storage, format: opts.storage?.format ?? ("qcow2" as const) } } : {}),
    };
    const [qemu, image] = await Promise.all([
      ensureQemu(options.qemu),
      debian ? ensureDebianGuest() : ensureGuestImage(options.kernel),
    ]);
    const accel = options.accel ?? (await detectAccelerator(qemu, image)).accel;
    const diskDir = join(RUN_ROOT, `${process.pid}-disks-${randomBytes(3).toString("hex")}`);
    await mkdir(diskDir, { recursive: true });
    trackPath(diskDir);
    let src: Vm | undefined;
    try {
      await prepareDataDisk(image, diskDir, debian, options.storage);
      if (options.storage?.second)
        await buildDataDisk(image.programs.vmwork, join(diskDir, "data2.img"), SECOND_DISK_LAYOUT);
      await writeFile(join(diskDir, "spare.img"), "");
      await truncate(join(diskDir, "spare.img"), spareDiskBytes(options.memoryMiB));
      const started = performance.now();
      const config = LabPair.config(options, qemu, image, accel, diskDir, "src", "src");
      if (options.frozen) config.extraArgs = [...(config.extraArgs ?? []), "-S"];
      src = await Vm.start(config);
      if (!options.frozen)
        await src.waitBooted(options.bootTimeoutMs ?? (debian ? DEBIAN_BOOT_TIMEOUT_MS : 120_000));
      return new LabPair(options, qemu, image, accel, diskDir, src, performance.now() - started);
    } catch (error) {
      await src?.stop();
      await rm(diskDir, { recursive: true, force: true });
      untrackPath(diskDir);
      throw error;
    }
  }

  /**
   * Starts a destination VM (same devices, -incoming defer) on the same shared disks. `paused` adds `-S`: the
   * guest stays stopped after the migration completes, so its RAM can be compared with the source's.
   */
  async startDestination(options: { name?: string; paused?: boolean } = {}): Promise<Vm> {
    if (this.dst) await this.dst.stop();
    const config = LabPair.config(
      this.options,
      this.qemu,
      this.image,
      this.accel,
      this.diskDir,
      options.name ?? "dst",
      "dst",
    );
    this.dst = await Vm.start({
      ...config,
      incoming: true,
      ...(options.paused ? { extraArgs: [...(config.extraArgs ?? []), "-S"] } : {}),
    });
    return this.dst;
  }

  /**
   * Plain QEMU live migration src → dst on loopback (dst is started if needed). When it completes, waits for the
   * destination to run (or, started paused, to have loaded everything) and reconnects nothing: callers use
   * `dst.agent`.
   */
  async migratePlain(options: Partial<MigrationOptions> = {}): Promise<MigrationResult> {
    // A destination that died (a failed migration) is replaced by a fresh one.
    const dst = this.dst?.running ? this.dst : await this.startDestination();
    const uri = await prepareIncoming(dst.monitor, {
      incomingUri: options.incomingUri ?? "tcp:127.0.0.1:0",
      ...(options.capabilities ? { capabilities: options.capabilities } : {}),
    });
    const result = await runMigration(this.src.monitor, options.connectUri ?? uri, options);
    const held = dst.config.extraArgs?.includes("-S") ?? false;
    await waitDestinationState(dst.monitor, held ? "paused" : "running");
    return result;
  }

  /**
   * After a completed migration: the destination becomes the source (the old source is stopped), so the same
   * guest can be migrated again to a fresh destination.
   */
  async promoteDestination(): Promise<Vm> {
    if (!this.dst) throw new Error("no destination to promote: migrate first");
    const old = this.src;
    this.src = this.dst;
    this.dst = undefined;
    await old.stop();
    return this.src;
  }

  /** `vmwork verify` on a VM; returns its output, throws with the first mismatch. */
  static verify(vm: Vm, timeoutMs = 300_000): Promise<string> {
    return vm.agent.run(workload.verify(), timeoutMs);
  }

  async stop(): Promise<void> {
    if (this.stopped) return;
    this.stopped = true;
    await Promise.allSettled([this.src.stop(), this.dst?.stop()]);
    await rm(this.diskDir, { recursive: true, force: true });
    untrackPath(this.diskDir);
  }
}
