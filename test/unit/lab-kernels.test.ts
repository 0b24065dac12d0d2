/**
 * The lab's kernel choices without apt: which package of a line is newest, which packages make up a split
 * kernel, and the module closure with soft dependencies (5.10's ext4 needs crc32c, loaded by alias).
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import {
  ALL_KERNEL_IDS,
  isKernelId,
  KERNEL_IDS,
  KERNEL_SPECS,
  kernelParts,
  kernelSuites,
  newestOfLine,
} from "../../src/lab/kernels.ts";
import {
  moduleLoadOrder,
  parseModulesAlias,
  parseModulesDep,
  parseModulesSoftdep,
} from "../../src/lab/modules.ts";

test("kernel ids: the default two first, every id has a spec, the exact packages match their lines", () => {
  assert.deepEqual(KERNEL_IDS, ["6.1", "6.12"]);
  assert.deepEqual(ALL_KERNEL_IDS, ["6.1", "6.12", "5.10", "6.16-rt", "6.18", "7.2"]);
  assert.ok(isKernelId("6.16-rt") && !isKernelId("6.16"));
  for (const id of ALL_KERNEL_IDS) {
    const { source } = KERNEL_SPECS[id];
    if (source.kind === "exact") assert.match(source.package, source.line, id);
  }
  assert.deepEqual(kernelSuites(), ["bullseye", "trixie-backports", "forky", "sid"]);
});

test("newest of a line: by the numbers in the names, other flavours and lines left out", () => {
  const names = [
    "linux-image-6.16.9+deb13-rt-amd64",
    "linux-image-6.16.12+deb13-rt-amd64",
    "linux-image-6.16.13+deb13-amd64",
    "linux-image-6.17.2+deb13-rt-amd64",
    "linux-image-5.10.0-9-amd64",
    "linux-image-5.10.0-30-amd64",
    "linux-image-5.10.0-30-cloud-amd64",
  ];
  const rt = KERNEL_SPECS["6.16-rt"].source;
  assert.ok(rt.kind === "exact");
  assert.equal(newestOfLine(names, rt.line), "linux-image-6.16.12+deb13-rt-amd64");
  assert.equal(newestOfLine(names, /^linux-image-5\.10\.0-\d+-amd64$/), "linux-image-5.10.0-30-amd64");
  assert.equal(newestOfLine(names, /^linux-image-7\.2\.\d+\+deb14-amd64$/), undefined);
});

test("kernel parts: the dependencies that carry the image's ABI", () => {
  const depends = [
    "dracut",
    "initramfs-tools",
    "linux-base",
    "linux-base-7.2.13+deb14-amd64",
    "linux-binary-7.2.13+deb14-amd64",
    "linux-modules-7.2.13+deb14-amd64",
    "linux-modules-7.2.13+deb14-cloud-amd64",
  ];
  assert.deepEqual(kernelParts("linux-image-7.2.13+deb14-amd64", depends), [
    "linux-base-7.2.13+deb14-amd64",
    "linux-binary-7.2.13+deb14-amd64",
    "linux-modules-7.2.13+deb14-amd64",
  ]);
  assert.deepEqual(kernelParts("linux-image-5.10.0-30-amd64", ["kmod", "linux-base"]), []);
});

// 5.10's ext4 as depmod describes it (modules.dep, modules.softdep, modules.alias), cut down.
const DEP_510 = `kernel/fs/ext4/ext4.ko: kernel/fs/mbcache.ko kernel/fs/jbd2/jbd2.ko kernel/lib/crc16.ko
kernel/fs/mbcache.ko:
kernel/fs/jbd2/jbd2.ko:
kernel/lib/crc16.ko:
kernel/crypto/crc32c_generic.ko:
kernel/arch/x86/crypto/crc32c-intel.ko:
kernel/drivers/block/virtio_blk.ko:
`;
const SOFTDEP_510 = `# Soft dependencies extracted from modules themselves.
softdep cifs gcm
softdep ext4 pre: crypto-crc32c
softdep virtio_blk post: nosuch
softdep jbd2 pre: ext4
`;
const ALIAS_510 = `alias crypto-crc32c crc32c_generic
alias crc32c crc32c_generic
alias crypto-crc32c crc32c_intel
alias crc32c crc32c_intel
`;

test("softdep and alias files parse", () => {
  const softdeps = parseModulesSoftdep(SOFTDEP_510);
  assert.deepEqual(softdeps.get("ext4"), { pre: ["crypto-crc32c"], post: [] });
  assert.deepEqual(softdeps.get("cifs"), { pre: [], post: [] });
  assert.deepEqual(parseModulesAlias(ALIAS_510).get("crypto-crc32c"), ["crc32c_generic", "crc32c_intel"]);
});

test("load order: soft dependencies first, by their portable provider; missing or cyclic ones skipped", () => {
  const order = moduleLoadOrder(["virtio_blk", "ext4"], parseModulesDep(DEP_510), new Set(), {
    softdeps: parseModulesSoftdep(SOFTDEP_510),
    aliases: parseModulesAlias(ALIAS_510),
  });
  assert.deepEqual(order, [
    "kernel/drivers/block/virtio_blk.ko",
    "kernel/crypto/crc32c_generic.ko",
    "kernel/fs/mbcache.ko",
    "kernel/fs/jbd2/jbd2.ko",
    "kernel/lib/crc16.ko",
    "kernel/fs/ext4/ext4.ko",
  ]);
});

test("load order: a soft dependency one of whose providers is built in needs nothing", () => {
  const order = moduleLoadOrder(["ext4"], parseModulesDep(DEP_510), new Set(["crc32c_intel", "crc16"]), {
    softdeps: parseModulesSoftdep(SOFTDEP_510),
    aliases: parseModulesAlias(ALIAS_510),
  });
  assert.deepEqual(order, ["kernel/fs/mbcache.ko", "kernel/fs/jbd2/jbd2.ko", "kernel/fs/ext4/ext4.ko"]);
});
