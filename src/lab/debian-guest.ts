/**
 * The Debian guest: a whole Debian 12 system on an ext4 disk, bootstrapped with mmdebstrap from the system's own
 * mirror (systemd as init, PostgreSQL 15 with a pgbench database made at build time, the lab's agent as a
 * service on ttyS1), booted with the lab's 6.1 cloud kernel (`-kernel`) and a small busybox initrd that mounts
 * the disk as root. Built once and cached by its inputs; each VM pair puts a qcow2 overlay over the cached raw
 * image, so a boot copies nothing.
 *
 * Why the lab's initrd and not Debian's own (initramfs-tools in the image): the kernel is the lab's extracted
 * package (the one every other test reads BTF from), not one apt installs in the image, so an initramfs-tools
 * initrd would have to be built for a kernel the image does not hold, and it would be a second way of booting to
 * keep working. The lab's module closure (modules.ts) already gives what mounting a virtio disk needs.
 */
import { existsSync } from "node:fs";
import { readFile, rm, stat, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { debianCodename, systemSourceEntries } from "./apt.ts";
import { cachedBuild } from "./cache.ts";
import {
  AGENT_UNIT,
  agentUnit,
  bootstrapSources,
  customizeScript,
  DEBIAN_GUEST_CMDLINE,
  DEBIAN_GUEST_PACKAGES,
  MASKED_UNITS,
  PGBENCH_DATABASE,
  ROOT_DISK_SIZE_MIB,
  rootInitScript,
} from "./debian-system.ts";
import { run } from "./exec.ts";
import type { GuestImage } from "./guest-image.ts";
import { ensureGuestPrograms } from "./guest-programs.ts";
import { buildInitramfs, guestDrivers } from "./initramfs.ts";
import { ensureKernel } from "./kernels.ts";
import { labDir } from "./paths.ts";

/** The Debian guest's kernel: the lab's 6.1 cloud kernel (Debian 12's own; BTF on, virtio drivers as modules). */
export const DEBIAN_GUEST_KERNEL = "6.1" as const;

export interface DebianGuestImage extends GuestImage {
  /** The system disk (raw, ext4, read-only to VMs: each pair's qcow2 overlay takes the writes). Also `dataDisk`. */
  rootDisk: string;
  /** What the build took and made (read from the cache folder). */
  build: DebianGuestBuild;
}

export interface DebianGuestBuild {
  buildMs: number;
  /** The raw image's nominal size and what it occupies (it is sparse). */
  imageBytes: number;
  allocatedBytes: number;
}

const BUILD_INFO = "build.json";

/** Debian's bootstrap tool; scripts/setup.sh installs it. */
const MMDEBSTRAP = "/usr/bin/mmdebstrap";

/** The Debian guest image, built on first use (a few minutes: packages, database) and cached by its inputs. */
export async function ensureDebianGuest(): Promise<DebianGuestImage> {
  const root = labDir();
  const kernel = await ensureKernel(join(root, "kernels"), DEBIAN_GUEST_KERNEL);
  const programs = await ensureGuestPrograms(root);
  const drivers = await guestDrivers(kernel);
  const codename = await debianCodename();
  const sources = bootstrapSources(await systemSourceEntries(), codename);
  const modulesDir = kernel.modulesDir;
  const inputs = {
    codename,
    sources,
    DEBIAN_GUEST_PACKAGES,
    MASKED_UNITS,
    PGBENCH_DATABASE,
    ROOT_DISK_SIZE_MIB,
    kernel: kernel.packageName,
    kernelVersion: kernel.packageVersion,
    programs: programs.digest,
    agentUnit: agentUnit(),
    // The script with placeholder paths: the real ones point into the temporary build folder.
    customize: customizeScript({
      agent: "AGENT",
      vmwork: "VMWORK",
      agentUnit: "UNIT",
      modulesDir: "MODULES",
      kernelRelease: kernel.release,
    }),
    init: rootInitScript(),
    drivers,
  };
  const { dir } = await cachedBuild(join(root, "debian-guest"), inputs, async (tmp) => {
    if (!existsSync(MMDEBSTRAP))
      throw new Error(
        `${MMDEBSTRAP} is missing: install it (apt-get install mmdebstrap, or run scripts/setup.sh) to build the Debian guest`,
      );
    const started = performance.now();
    const system = join(tmp, "system");
    const unitFile = join(tmp, AGENT_UNIT);
    const hook = join(tmp, "customize.sh");
    await writeFile(unitFile, agentUnit());
    await writeFile(
      hook,
      customizeScript({
        agent: programs.agent,
        vmwork: programs.vmwork,
        agentUnit: unitFile,
        modulesDir,
        kernelRelease: kernel.release,
      }),
      { mode: 0o755 },
    );
    await run(
      MMDEBSTRAP,
      [
        "--mode=root",
        "--format=directory",
        "--variant=apt",
        '--aptopt=APT::Install-Recommends "false"',
        `--include=${DEBIAN_GUEST_PACKAGES.join(",")}`,
        `--customize-hook=sh ${hook} "$1"`,
        codename,
        system,
        ...sources,
      ],
      { timeoutMs: 1_800_000 },
    );
    const image = join(tmp, "root.img");
    // -d copies the tree with its owners, modes and extended attributes; the label names the disk in diagnostics.
    await run(
      "mkfs.ext4",
      ["-q", "-F", "-L", "vmprune-root", "-d", system, image, `${ROOT_DISK_SIZE_MIB}M`],
      {
        timeoutMs: 600_000,
      },
    );
    await rm(system, { recursive: true, force: true });
    await buildInitramfs(kernel, programs, join(tmp, "initrd.cpio"), drivers, rootInitScript());
    const built = await stat(image);
    const info: DebianGuestBuild = {
      buildMs: Math.round(performance.now() - started),
      imageBytes: built.size,
      allocatedBytes: built.blocks * 512,
    };
    await writeFile(join(tmp, BUILD_INFO), JSON.stringify(info, null, 2));
  });
  const rootDisk = join(dir, "root.img");
  const build = JSON.parse(await readFile(join(dir, BUILD_INFO), "utf8")) as DebianGuestBuild;
  return {
    kernel,
    initrd: join(dir, "initrd.cpio"),
    dataDisk: rootDisk,
    rootDisk,
    programs,
    cmdline: DEBIAN_GUEST_CMDLINE,
    build,
  };
}
