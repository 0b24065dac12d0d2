import assert from "node:assert/strict";
import { test } from "node:test";
import { moduleLoadOrder, moduleName, parseModulesBuiltin, parseModulesDep } from "../../src/lab/modules.ts";

const DEP = `kernel/drivers/block/virtio_blk.ko.xz: kernel/drivers/virtio/virtio_ring.ko.xz kernel/drivers/virtio/virtio.ko.xz
kernel/drivers/virtio/virtio_pci.ko.xz: kernel/drivers/virtio/virtio_pci_modern_dev.ko.xz kernel/drivers/virtio/virtio_ring.ko.xz kernel/drivers/virtio/virtio.ko.xz
kernel/drivers/virtio/virtio_pci_modern_dev.ko.xz:
kernel/drivers/virtio/virtio_ring.ko.xz: kernel/drivers/virtio/virtio.ko.xz
kernel/drivers/virtio/virtio.ko.xz:
kernel/fs/a-b.ko: kernel/fs/c.ko
kernel/fs/c.ko: kernel/fs/a-b.ko
`;

test("module names: suffixes and dashes", () => {
  assert.equal(moduleName("kernel/drivers/block/virtio_blk.ko.xz"), "virtio_blk");
  assert.equal(moduleName("kernel/fs/a-b.ko"), "a_b");
});

test("load order: dependencies first, each once", () => {
  const order = moduleLoadOrder(["virtio_pci", "virtio_blk"], parseModulesDep(DEP), new Set());
  assert.deepEqual(order, [
    "kernel/drivers/virtio/virtio_pci_modern_dev.ko.xz",
    "kernel/drivers/virtio/virtio.ko.xz",
    "kernel/drivers/virtio/virtio_ring.ko.xz",
    "kernel/drivers/virtio/virtio_pci.ko.xz",
    "kernel/drivers/block/virtio_blk.ko.xz",
  ]);
});

test("built-in modules need no file", () => {
  const builtin = parseModulesBuiltin(
    "kernel/drivers/virtio/virtio.ko\nkernel/drivers/virtio/virtio_ring.ko\n",
  );
  const order = moduleLoadOrder(["virtio_blk"], parseModulesDep(DEP), builtin);
  assert.deepEqual(order, ["kernel/drivers/block/virtio_blk.ko.xz"]);
});

test("unknown module and cycles are errors", () => {
  assert.throws(
    () => moduleLoadOrder(["nosuch"], parseModulesDep(DEP), new Set()),
    /nosuch is neither built in nor in modules.dep/,
  );
  assert.throws(() => moduleLoadOrder(["a-b"], parseModulesDep(DEP), new Set()), /cycle/);
});
