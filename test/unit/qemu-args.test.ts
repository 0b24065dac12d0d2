import assert from "node:assert/strict";
import { test } from "node:test";
import type { GuestImage } from "../../src/lab/guest-image.ts";
import type { QemuBinary } from "../../src/lab/qemu-binaries.ts";
import { qemuArgs, type VmConfig } from "../../src/lab/vm.ts";

const qemu: QemuBinary = {
  version: "10.0",
  fullVersion: "10.0.2",
  binary: "/q",
  firmwareDirs: ["/fw/seabios", "/fw/qemu"],
  env: {},
};
const image = {
  kernel: { vmlinuz: "/k/vmlinuz" },
  initrd: "/k/initrd",
  cmdline: "console=ttyS0",
} as unknown as GuestImage;
const files = {
  ramPath: "/dev/shm/vmprune-1-src.ram",
  qmpPath: "/r/qmp.sock",
  agentPath: "/r/agent.sock",
  consolePath: "/r/console.log",
};
const base: VmConfig = {
  name: "src",
  qemu,
  image,
  accel: "tcg",
  memoryMiB: 512,
  vcpus: 2,
  disks: { data: "/d/data.img", spare: "/d/spare.img" },
};

function flagValues(args: string[], flag: string): string[] {
  return args.flatMap((a, i) => (a === flag ? [args[i + 1] ?? ""] : []));
}

test("guest RAM is a shared file backend of the requested size, bound to the machine", () => {
  const args = qemuArgs(base, files);
  assert.deepEqual(flagValues(args, "-object"), [
    "memory-backend-file,id=ram0,size=512M,mem-path=/dev/shm/vmprune-1-src.ram,share=on",
  ]);
  assert.deepEqual(flagValues(args, "-machine"), ["q35,accel=tcg,memory-backend=ram0"]);
  assert.deepEqual(flagValues(args, "-m"), ["512M"]);
  assert.deepEqual(flagValues(args, "-smp"), ["2"]);
});

test("firmware dirs, sockets, console and disks with their serials", () => {
  const args = qemuArgs(base, files);
  assert.deepEqual(flagValues(args, "-L"), ["/fw/seabios", "/fw/qemu"]);
  assert.deepEqual(flagValues(args, "-qmp"), [
    "unix:/r/qmp.sock,server=on,wait=off",
    "unix:/r/tools.sock,server=on,wait=off",
  ]);
  assert.deepEqual(flagValues(args, "-serial"), ["chardev:console", "chardev:agent"]);
  assert.deepEqual(flagValues(args, "-device"), [
    "virtio-blk-pci,drive=data,serial=vmprune-data",
    "virtio-blk-pci,drive=spare,serial=vmprune-spare",
  ]);
  assert.equal(args.includes("-incoming"), false);
});

test("incoming VMs wait for migrate-incoming; CPU defaults per accelerator", () => {
  const dst = qemuArgs({ ...base, incoming: true }, files);
  assert.deepEqual(flagValues(dst, "-incoming"), ["defer"]);
  assert.deepEqual(flagValues(dst, "-cpu"), ["qemu64"]);
  assert.deepEqual(flagValues(qemuArgs({ ...base, accel: "kvm" }, files), "-cpu"), ["host"]);
  assert.deepEqual(flagValues(qemuArgs({ ...base, cpu: "max" }, files), "-cpu"), ["max"]);
});

test("a free-page-hint balloon: virtio-balloon-pci with free-page-hint on its own iothread, on src and dst alike", () => {
  assert.equal(qemuArgs(base, files).join(" ").includes("balloon"), false);
  for (const incoming of [false, true]) {
    const args = qemuArgs({ ...base, balloon: "free-page-hint", incoming }, files);
    assert.deepEqual(flagValues(args, "-object"), [
      "memory-backend-file,id=ram0,size=512M,mem-path=/dev/shm/vmprune-1-src.ram,share=on",
      "iothread,id=iothread0",
    ]);
    assert.deepEqual(flagValues(args, "-device"), [
      "virtio-blk-pci,drive=data,serial=vmprune-data",
      "virtio-blk-pci,drive=spare,serial=vmprune-spare",
      "virtio-balloon-pci,id=balloon0,free-page-hint=on,iothread=iothread0",
    ]);
  }
});

test("anonymous guest RAM: a memory-backend-ram of the same size and id, no file, the dimm too", () => {
  const args = qemuArgs({ ...base, anonymousRam: true, dimmMiB: 128 }, files);
  const objects = flagValues(args, "-object");
  assert.ok(objects.includes("memory-backend-ram,id=ram0,size=512M"), objects.join(" | "));
  assert.ok(objects.includes("memory-backend-ram,id=dimm0,size=128M"), objects.join(" | "));
  assert.ok(!args.some((a) => a.includes(files.ramPath)), "no RAM file");
});

test("preallocated guest RAM: every memory backend, anonymous or a file, cleared when QEMU starts", () => {
  for (const anonymousRam of [true, false]) {
    const args = qemuArgs({ ...base, anonymousRam, preallocateRam: true, dimmMiB: 128 }, files);
    const backends = flagValues(args, "-object").filter((o) => o.startsWith("memory-backend-"));
    assert.equal(backends.length, 2, backends.join(" | "));
    for (const backend of backends) assert.match(backend, /,prealloc=on$/, backend);
  }
  const onDemand = flagValues(qemuArgs({ ...base, anonymousRam: true }, files), "-object");
  assert.ok(!onDemand.some((o) => o.includes("prealloc")), "not unless asked");
});
