/**
 * The lab's inputs as apt resolves them today, and what the build made of them: concrete kernel packages from
 * the meta-package (6.1 from the release with its security updates, 6.12 from backports), an initramfs holding
 * the agent, the workloads and every module of the load order, and a data disk of the documented size.
 */
import assert from "node:assert/strict";
import { stat } from "node:fs/promises";
import { test } from "node:test";
import { DATA_DISK_LAYOUT } from "../../src/lab/data-disk.ts";
import { run } from "../../src/lab/exec.ts";
import { ensureGuestImage } from "../../src/lab/guest-image.ts";
import { KERNEL_IDS } from "../../src/lab/kernels.ts";

const PACKAGE = {
  "6.1": /^linux-image-6\.1\.0-\d+-cloud-amd64$/,
  "6.12": /^linux-image-6\.12\.\d+\+deb12-cloud-amd64$/,
} as const;

for (const id of KERNEL_IDS) {
  test(`kernel ${id}: resolved through apt and built into an initramfs`, async () => {
    const image = await ensureGuestImage(id);
    assert.match(image.kernel.packageName, PACKAGE[id]);
    assert.ok(image.kernel.release.startsWith(id === "6.1" ? "6.1.0-" : "6.12."));
    const listing = (await run("cpio", ["-it", "--quiet", "-F", image.initrd])).split("\n");
    for (const path of ["init", "bin/busybox", "bin/agent", "bin/vmwork", "lib/modules/load-order"]) {
      assert.ok(listing.includes(path), `${path} in the initramfs`);
    }
    const loadOrder = (
      await run("cpio", ["-i", "--quiet", "--to-stdout", "-F", image.initrd, "lib/modules/load-order"])
    )
      .trim()
      .split("\n");
    assert.ok(
      loadOrder.some((m) => m.endsWith("/virtio_blk.ko")),
      "virtio_blk is loaded",
    );
    for (const module of loadOrder)
      assert.ok(listing.includes(`lib/modules/${module}`), `${module} is in the initramfs, uncompressed`);
    assert.equal((await stat(image.dataDisk)).size, DATA_DISK_LAYOUT.imageSizeMiB * 1024 * 1024);
  });
}
