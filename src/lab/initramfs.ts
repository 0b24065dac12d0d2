/**
 * The guest's initramfs: busybox-static, the kernel modules the guest needs (closure from modules.dep and
 * modules.softdep, decompressed), the command agent and workload tool, and an init that mounts the data disk
 * and runs the agent on ttyS1.
 */
import { existsSync } from "node:fs";
import { chmod, copyFile, mkdir, readFile, writeFile } from "node:fs/promises";
import { dirname, join } from "node:path";
import { run, runBuffer } from "./exec.ts";
import type { GuestPrograms } from "./guest-programs.ts";
import type { GuestKernel } from "./kernels.ts";
import {
  moduleLoadOrder,
  parseModulesAlias,
  parseModulesBuiltin,
  parseModulesDep,
  parseModulesSoftdep,
} from "./modules.ts";

/**
 * Drivers the guest needs beyond what the cloud kernels build in (ext4 and the 8250 UART are built in). Built-in
 * ones are skipped, so 6.12's and 6.18's built-in virtio_pci and virtio_console cost nothing.
 */
export const GUEST_DRIVERS = ["virtio_pci", "virtio_blk", "virtio_console", "virtio_balloon"] as const;

/**
 * Drivers the cloud kernels build in but Debian's generic and rt kernels ship as modules (their configs:
 * CONFIG_EXT4_FS=m): ext4 for the data disk. The 8250 UART (CONFIG_SERIAL_8250=y), devtmpfs and tmpfs are
 * built into every Debian flavour.
 */
export const FLAVOUR_DRIVERS = ["ext4"] as const;

async function readModulesFile(kernel: GuestKernel, name: string): Promise<string> {
  const path = join(kernel.modulesDir, name);
  return existsSync(path) ? readFile(path, "utf8") : "";
}

/**
 * The drivers the initramfs loads for `kernel`: GUEST_DRIVERS, and those of FLAVOUR_DRIVERS it has as modules.
 * For the cloud kernels that is GUEST_DRIVERS alone, the list their cached images were keyed by.
 */
export async function guestDrivers(kernel: GuestKernel): Promise<string[]> {
  const builtin = parseModulesBuiltin(await readModulesFile(kernel, "modules.builtin"));
  return [...GUEST_DRIVERS, ...FLAVOUR_DRIVERS.filter((d) => !builtin.has(d))];
}

/** busybox-static's binary (Debian package busybox-static). */
export const BUSYBOX = "/bin/busybox";

/** Serial numbers the lab gives its virtio disks; init links them under /dev/disk/by-serial/. */
export const DISK_SERIAL = { data: "vmprune-data", spare: "vmprune-spare", data2: "vmprune-data2" } as const;

/** Printed on the console once init is done; the agent then answers on ttyS1. */
export const BOOT_MARKER = "VMPRUNE-BOOTED";

/** What every lab init starts with: busybox's applets on PATH, and /proc, /sys and /dev mounted. */
export const INIT_PRELUDE = `#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
`;

export function initScript(): string {
  return `${INIT_PRELUDE}mkdir -p /dev/shm /dev/pts /run /tmp /data /dev/disk/by-serial
mount -t tmpfs -o mode=1777 shm /dev/shm
mount -t tmpfs run /run
mount -t tmpfs tmp /tmp
while read -r module; do insmod "/lib/modules/$module" || echo "init: insmod $module failed"; done < /lib/modules/load-order
for block in /sys/block/vd*; do
  [ -e "$block/serial" ] && ln -sf "/dev/\${block##*/}" "/dev/disk/by-serial/$(cat "$block/serial")"
done
if [ -e /dev/disk/by-serial/${DISK_SERIAL.data} ]; then
  mount -t ext4 /dev/disk/by-serial/${DISK_SERIAL.data} /data || echo "init: cannot mount the data disk"
fi
echo "${BOOT_MARKER} $(uname -r) mem=$(grep MemTotal /proc/meminfo)"
while true; do /bin/agent /dev/ttyS1; echo "init: agent exited, restarting"; sleep 1; done
`;
}

export async function buildInitramfs(
  kernel: GuestKernel,
  programs: GuestPrograms,
  outPath: string,
  drivers: readonly string[] = GUEST_DRIVERS,
  /** The /init script; default the lab guest's ({@link initScript}). */
  init: string = initScript(),
): Promise<void> {
  const stage = `${outPath}.stage`;
  await run("rm", ["-rf", stage]);
  for (const d of ["bin", "dev", "proc", "sys", "run", "tmp", "data", "lib/modules"]) {
    await mkdir(join(stage, d), { recursive: true });
  }
  await copyFile(BUSYBOX, join(stage, "bin", "busybox"));
  await copyFile(programs.agent, join(stage, "bin", "agent"));
  await copyFile(programs.vmwork, join(stage, "bin", "vmwork"));
  await chmod(join(stage, "bin", "agent"), 0o755);
  await chmod(join(stage, "bin", "vmwork"), 0o755);

  const dep = parseModulesDep(await readFile(join(kernel.modulesDir, "modules.dep"), "utf8"));
  const builtin = parseModulesBuiltin(await readFile(join(kernel.modulesDir, "modules.builtin"), "utf8"));
  // Soft dependencies matter for 5.10's ext4: it finds crc32c (for metadata_csum, which the data disk has)
  // through the crypto API, and with no modprobe in the guest nothing would load crc32c_generic for it.
  const order = moduleLoadOrder(drivers, dep, builtin, {
    softdeps: parseModulesSoftdep(await readModulesFile(kernel, "modules.softdep")),
    aliases: parseModulesAlias(await readModulesFile(kernel, "modules.alias")),
  });
  const loadOrder: string[] = [];
  for (const path of order) {
    // busybox insmod cannot read compressed modules: store them plain.
    const plain = path.replace(/\.(xz|zst|gz)$/, "");
    const target = join(stage, "lib", "modules", plain);
    await mkdir(dirname(target), { recursive: true });
    const source = join(kernel.modulesDir, path);
    if (path.endsWith(".xz")) await writeFile(target, await runBuffer("xz", ["-dc", source]));
    else if (path.endsWith(".zst")) await writeFile(target, await runBuffer("zstd", ["-dc", source]));
    else if (path.endsWith(".gz")) await writeFile(target, await runBuffer("gzip", ["-dc", source]));
    else await copyFile(source, target);
    loadOrder.push(plain);
  }
  await writeFile(join(stage, "lib", "modules", "load-order"), `${loadOrder.join("\n")}\n`);
  await writeFile(join(stage, "init"), init, { mode: 0o755 });
  await run("bash", [
    "-c",
    'set -o pipefail; cd "$1" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet > "$2"',
    "_",
    stage,
    outPath,
  ]);
  await run("rm", ["-rf", stage]);
}
