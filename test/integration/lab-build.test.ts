/**
 * The lab's inputs as apt resolves them today, and what the build made of them: concrete kernel packages (6.1
 * from the release with its security updates, 6.12 from backports, both through the cloud meta-package; the
 * other releases' exact packages through their own apt configuration), an initramfs holding the agent, the
 * workloads and every module of the load order uncompressed, and a data disk of the documented size. Builds
 * every kernel (the first run downloads about 400 MB for the four extra ones); boots none.
 */
import assert from "node:assert/strict";
import { stat } from "node:fs/promises";
import { test } from "node:test";
import { DATA_DISK_LAYOUT } from "../../src/lab/data-disk.ts";
import { run } from "../../src/lab/exec.ts";
import { ensureGuestImage } from "../../src/lab/guest-image.ts";
import { ALL_KERNEL_IDS, type KernelId } from "../../src/lab/kernels.ts";

const EXPECTED: Record<KernelId, { package: RegExp; release: string; modules: string[] }> = {
  "6.1": { package: /^linux-image-6\.1\.0-\d+-cloud-amd64$/, release: "6.1.0-", modules: ["virtio_blk"] },
  "6.12": {
    package: /^linux-image-6\.12\.\d+\+deb12-cloud-amd64$/,
    release: "6.12.",
    modules: ["virtio_blk"],
  },
  // Generic 5.10: virtio and ext4 are modules, and ext4 finds crc32c (metadata_csum) through its soft dependency.
  "5.10": {
    package: /^linux-image-5\.10\.0-\d+-amd64$/,
    release: "5.10.0-",
    modules: ["virtio_pci", "virtio_blk", "virtio_console", "ext4", "crc32c_generic"],
  },
  "6.16-rt": {
    package: /^linux-image-6\.16\.\d+\+deb13-rt-amd64$/,
    release: "6.16.",
    modules: ["virtio_blk", "ext4"],
  },
  "6.18": {
    package: /^linux-image-6\.18\.\d+\+deb13-cloud-amd64$/,
    release: "6.18.",
    modules: ["virtio_blk"],
  },
  "7.2": {
    package: /^linux-image-7\.2\.\d+\+deb14-amd64$/,
    release: "7.2.",
    modules: ["virtio_blk", "ext4"],
  },
};

for (const id of ALL_KERNEL_IDS) {
  test(`kernel ${id}: resolved through apt and built into an initramfs`, async () => {
    const image = await ensureGuestImage(id);
    const expected = EXPECTED[id];
    assert.match(image.kernel.packageName, expected.package);
    assert.ok(image.kernel.release.startsWith(expected.release), image.kernel.release);
    const listing = (await run("cpio", ["-it", "--quiet", "-F", image.initrd])).split("\n");
    for (const path of ["init", "bin/busybox", "bin/agent", "bin/vmwork", "lib/modules/load-order"]) {
      assert.ok(listing.includes(path), `${path} in the initramfs`);
    }
    const loadOrder = (
      await run("cpio", ["-i", "--quiet", "--to-stdout", "-F", image.initrd, "lib/modules/load-order"])
    )
      .trim()
      .split("\n");
    for (const module of expected.modules)
      assert.ok(
        loadOrder.some((m) => m.endsWith(`/${module}.ko`)),
        `${module} is loaded: ${loadOrder.join(" ")}`,
      );
    for (const module of loadOrder)
      assert.ok(listing.includes(`lib/modules/${module}`), `${module} is in the initramfs, uncompressed`);
    assert.equal((await stat(image.dataDisk)).size, DATA_DISK_LAYOUT.imageSizeMiB * 1024 * 1024);
  });
}
