/** Everything needed to boot the lab guest with one kernel: kernel, initramfs, data disk; cached by inputs. */
import { join } from "node:path";
import { labApt } from "./apt.ts";
import { cachedBuild } from "./cache.ts";
import { buildDataDisk, DATA_DISK_LAYOUT } from "./data-disk.ts";
import { ensureGuestPrograms, type GuestPrograms } from "./guest-programs.ts";
import { buildInitramfs, GUEST_DRIVERS, initScript } from "./initramfs.ts";
import { ensureKernel, type GuestKernel, type KernelId } from "./kernels.ts";
import { labDir } from "./paths.ts";

export interface GuestImage {
  kernel: GuestKernel;
  initrd: string;
  /** Pristine data disk; each VM pair works on its own copy. */
  dataDisk: string;
  programs: GuestPrograms;
  /** Kernel command line. KASLR stays on: introspection must cope with it. */
  cmdline: string;
}

export const GUEST_CMDLINE = "console=ttyS0 panic=-1 loglevel=4";

export async function ensureGuestImage(kernelId: KernelId): Promise<GuestImage> {
  const root = labDir();
  const apt = await labApt();
  const kernel = await ensureKernel(apt, join(root, "kernels"), kernelId);
  const programs = await ensureGuestPrograms(root);
  const { dir: disk } = await cachedBuild(
    join(root, "data-disk"),
    { DATA_DISK_LAYOUT, programs: programs.digest },
    (tmp) => buildDataDisk(programs.vmwork, join(tmp, "data.img")),
  );
  const inputs = {
    kernel: kernel.packageName,
    version: kernel.packageVersion,
    programs: programs.digest,
    init: initScript(),
    GUEST_DRIVERS,
  };
  const { dir } = await cachedBuild(join(root, "images", kernelId), inputs, (tmp) =>
    buildInitramfs(kernel, programs, join(tmp, "initrd.cpio")),
  );
  return {
    kernel,
    initrd: join(dir, "initrd.cpio"),
    dataDisk: join(disk, "data.img"),
    programs,
    cmdline: GUEST_CMDLINE,
  };
}
