/**
 * Which accelerator boots the lab guest here. /dev/kvm can exist and still fail a stock guest kernel (seen on
 * this project's machines: the guest spins in the host kernel and prints nothing), so KVM counts as usable only
 * after it booted the guest to the agent once. The verdict is cached per host kernel and QEMU build;
 * VMPRUNE_ACCEL=kvm|tcg overrides it.
 */
import { accessSync, constants } from "node:fs";
import { mkdir, readFile, writeFile } from "node:fs/promises";
import { release } from "node:os";
import { join } from "node:path";
import type { GuestImage } from "./guest-image.ts";
import { labDir } from "./paths.ts";
import type { QemuBinary } from "./qemu-binaries.ts";
import { type Accelerator, Vm } from "./vm.ts";

const PROBE_BOOT_TIMEOUT_MS = 20_000;

function kvmDeviceUsable(): boolean {
  try {
    accessSync("/dev/kvm", constants.R_OK | constants.W_OK);
    return true;
  } catch {
    return false;
  }
}

export async function detectAccelerator(
  qemu: QemuBinary,
  image: GuestImage,
): Promise<{ accel: Accelerator; reason: string }> {
  const forced = process.env.VMPRUNE_ACCEL;
  if (forced === "kvm" || forced === "tcg") return { accel: forced, reason: "VMPRUNE_ACCEL" };
  if (!kvmDeviceUsable()) return { accel: "tcg", reason: "/dev/kvm not accessible" };
  const cacheFile = join(labDir(), "accel.json");
  const key = `${release()} ${qemu.fullVersion} ${image.kernel.release}`;
  const cache = JSON.parse(await readFile(cacheFile, "utf8").catch(() => "{}")) as Record<
    string,
    Accelerator
  >;
  const known = cache[key];
  if (known) return { accel: known, reason: "cached probe" };
  const vm = await Vm.start({
    name: "kvmprobe",
    qemu,
    image,
    accel: "kvm",
    memoryMiB: 256,
    vcpus: 1,
    disks: {},
  }).catch(() => undefined);
  let accel: Accelerator = "tcg";
  if (vm) {
    try {
      await vm.waitBooted(PROBE_BOOT_TIMEOUT_MS);
      accel = "kvm";
    } catch {
      accel = "tcg";
    } finally {
      await vm.stop();
    }
  }
  cache[key] = accel;
  await mkdir(labDir(), { recursive: true });
  await writeFile(cacheFile, JSON.stringify(cache, null, 2));
  return {
    accel,
    reason:
      accel === "kvm"
        ? "KVM booted the guest"
        : `KVM did not boot the guest within ${PROBE_BOOT_TIMEOUT_MS} ms`,
  };
}
