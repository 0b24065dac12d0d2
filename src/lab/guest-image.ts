/** Everything needed to boot the lab guest with one kernel: kernel, initramfs, data disk; cached by inputs. */
import { join } from "node:path";
import { cachedBuild } from "./cache.ts";
import { buildDataDisk, DATA_DISK_LAYOUT } from "./data-disk.ts";
import { ensureGuestPrograms, type GuestPrograms } from "./guest-programs.ts";
import { buildInitramfs, guestDrivers, initScript } from "./initramfs.ts";
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

/** The guest image for `kernelId`, built on first use (the kernel downloaded too) and cached. */
export async function ensureGuestImage(kernelId: KernelId): Promise<GuestImage> {
  const root = labDir();
  const kernel = await ensureKernel(join(root, "kernels"), kernelId);
  const drivers = await guestDrivers(kernel);
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
    // Named as before the flavours came: the cloud kernels' list is still GUEST_DRIVERS, so their key holds.
    GUEST_DRIVERS: drivers,
  };
  const { dir } = await cachedBuild(join(root, "images", kernelId), inputs, (tmp) =>
    buildInitramfs(kernel, programs, join(tmp, "initrd.cpio"), drivers),
  );
  return {
    kernel,
    initrd: join(dir, "initrd.cpio"),
    dataDisk: join(disk, "data.img"),
    programs,
    cmdline: GUEST_CMDLINE,
  };
}
