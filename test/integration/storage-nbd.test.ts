/**
 * Guest disks read through QEMU's own block layer over NBD, with real QEMUs (7.2, and 10.0 from the lab):
 *  - source side (src/qemu/block-export.ts): a running QEMU exports its qcow2 disk (backing file: raw) read-only
 *    through QMP; read through NbdDevice it equals `qemu-img convert`; a write through the export is refused;
 *    the export is gone afterwards.
 *  - destination side (src/storage/nbd-server.ts): what a destination QEMU (-incoming, disk inactive) answers to
 *    block-export-add while the source QEMU holds the image (recorded, see nbd-server.ts's header), and qemu-nbd
 *    with force-share reading the image both QEMUs hold.
 *  - receive end to end: a link peer sends REFs of the qcow2 disk's blocks; receive resolves them through
 *    qemu-nbd asynchronously, NACKs the stale ones, and the destination gets the exact stream.
 * Every QEMU and qemu-nbd is stopped by its PID (also on failure); temp files are removed.
 */
import assert from "node:assert/strict";
import { type ChildProcess, execFile, spawn } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import { once } from "node:events";
import { existsSync } from "node:fs";
import { connect } from "node:net";
import { join } from "node:path";
import { type TestContext, test } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";
import { promisify } from "node:util";
import { trackProcess, untrackProcess } from "../../src/lab/cleanup.ts";
import { ensureQemu, type QemuBinary, type QemuVersion } from "../../src/lab/qemu-binaries.ts";
import { LinkDecoder } from "../../src/link/decoder.ts";
import { clientHandshake } from "../../src/link/handshake.ts";
import { CAPABILITY, encodeMessage, type Message, MSG } from "../../src/link/protocol.ts";
import { startReceive } from "../../src/migrate/link-receive.ts";
import { exportDisk, findDisk, listDisks } from "../../src/qemu/block-export.ts";
import { QmpClient, QmpError } from "../../src/qemu/qmp.ts";
import { openDiskReader } from "../../src/storage/block-reader.ts";
import { StorageError } from "../../src/storage/errors.ts";
import { formatNbdUri } from "../../src/storage/nbd-client.ts";
import { NbdDevice } from "../../src/storage/nbd-device.ts";
import { startNbdServer } from "../../src/storage/nbd-server.ts";
import { fakeDestination } from "../support/fake-peers.ts";
import { IMAGE_BYTES, makeImages, missingQemuTools } from "../support/nbd-images.ts";

const timeout = Number(process.env.NBD_TEST_TIMEOUT ?? 180_000);
const skip = missingQemuTools() ?? false;
const execFileAsync = promisify(execFile);

interface RunningQemu {
  qmp: QmpClient;
  pid: number;
}

/** A paused QEMU (no guest kernel needed) with `image` as a virtio disk, named the way libvirt names them. */
async function startQemu(
  t: TestContext,
  qemu: QemuBinary,
  image: string,
  dir: string,
  name: string,
  incoming = false,
): Promise<RunningQemu> {
  const qmpPath = join(dir, `${name}.qmp`);
  const args = [
    "-S",
    "-display",
    "none",
    "-machine",
    "q35",
    "-nodefaults",
    ...qemu.firmwareDirs.flatMap((d) => ["-L", d]),
    "-blockdev",
    `driver=file,filename=${image},node-name=libvirt-1-storage`,
    "-blockdev",
    "driver=qcow2,file=libvirt-1-storage,node-name=libvirt-1-format",
    "-device",
    "virtio-blk-pci,drive=libvirt-1-format,id=virtio-disk1",
    "-qmp",
    `unix:${qmpPath},server=on,wait=off`,
    ...(incoming ? ["-incoming", "defer"] : []),
  ];
  const child: ChildProcess = spawn(qemu.binary, args, {
    env: { ...process.env, ...qemu.env },
    stdio: ["ignore", "ignore", "pipe"],
  });
  let stderr = "";
  child.stderr?.on("data", (chunk: Buffer) => {
    stderr += chunk.toString();
  });
  const pid = child.pid as number;
  trackProcess(pid);
  const exited = new Promise<void>((resolve) => child.once("exit", () => resolve()));
  t.after(async () => {
    if (child.exitCode === null && child.signalCode === null) process.kill(pid, "SIGKILL");
    await exited;
    untrackProcess(pid);
  });
  for (let i = 0; !existsSync(qmpPath); i++) {
    if (child.exitCode !== null || i > 500) assert.fail(`QEMU ${qemu.version} did not start: ${stderr}`);
    await sleep(10);
  }
  const qmp = await QmpClient.connect(qmpPath);
  t.after(() => qmp.close());
  return { qmp, pid };
}

async function qemuOf(t: TestContext, version: QemuVersion): Promise<QemuBinary | null> {
  try {
    return await ensureQemu(version);
  } catch (error) {
    t.skip(`QEMU ${version} is not at hand: ${(error as Error).message}`);
    return null;
  }
}

for (const version of ["7.2", "10.0"] as const) {
  test(`source: QEMU ${version} exports its qcow2 disk read-only over NBD; reads equal qemu-img convert`, {
    timeout,
    skip,
  }, async (t) => {
    const qemu = await qemuOf(t, version);
    if (!qemu) return;
    const images = await makeImages(t);
    const vm = await startQemu(t, qemu, images.top, images.dir, "src");
    await vm.qmp.execute("cont", undefined); // running (the firmware finds no boot disk and waits): still exports

    const disks = await listDisks(vm.qmp);
    const disk = findDisk(disks, "virtio-disk1");
    assert.equal(disk.nodeName, "libvirt-1-format");
    assert.equal(disk.format, "qcow2");
    assert.equal(disk.filename, images.top);
    assert.equal(disk.backingFilename, images.base);
    assert.equal(findDisk(disks, "libvirt-1-format"), disk, "by node-name too");
    assert.throws(() => findDisk(disks, "virtio-disk9"), /no disk named "virtio-disk9".*libvirt-1-format/);

    const socketPath = join(images.dir, "export.sock");
    const exported = await exportDisk(vm.qmp, {
      disk: "virtio-disk1",
      socketPath,
      log: (l) => t.diagnostic(l),
    });
    assert.equal(exported.startedServer, true);
    const device = await NbdDevice.open(exported.address);
    assert.equal(device.sizeBytes, IMAGE_BYTES);
    assert.equal(device.info.readOnly, true);
    const pieces: Promise<Buffer>[] = [];
    for (let at = 0; at < IMAGE_BYTES; at += 256 * 1024)
      pieces.push(device.read(at, Math.min(256 * 1024, IMAGE_BYTES - at)));
    assert.ok(
      Buffer.concat(await Promise.all(pieces)).equals(images.flat),
      "the whole disk as the guest sees it",
    );
    for (const w of images.written)
      assert.ok(
        (await device.read(w.offset, w.length)).equals(images.flat.subarray(w.offset, w.offset + w.length)),
      );

    // A write through the export (QEMU's own NBD client, qemu-io) is refused; the disk is unchanged.
    const uri = formatNbdUri(exported.address);
    const write = await execFileAsync("qemu-io", ["-f", "raw", "-c", "write -P 0x55 0 4096", uri]).then(
      (r) => ({ ok: true, text: r.stdout + r.stderr }),
      (error: { stdout?: string; stderr?: string }) => ({
        ok: false,
        text: `${error.stdout}${error.stderr}`,
      }),
    );
    t.diagnostic(`qemu-io write through the read-only export: ${write.text.trim()}`);
    assert.equal(write.ok && !/failed|denied|read-only|not permitted/i.test(write.text), false);
    assert.ok((await device.read(0, 4096)).equals(images.flat.subarray(0, 4096)));
    await device.close();

    // A second export while ours runs: QEMU runs one NBD server, and this module says so.
    await assert.rejects(
      exportDisk(vm.qmp, {
        disk: "virtio-disk1",
        socketPath: join(images.dir, "other.sock"),
        exportName: "b",
      }),
      /already runs an NBD server.*runningServer/,
    );
    const second = await exportDisk(vm.qmp, {
      disk: "virtio-disk1",
      socketPath: join(images.dir, "other.sock"),
      exportName: "second",
      runningServer: { path: socketPath },
    });
    assert.equal(second.startedServer, false);
    const again = await NbdDevice.open(second.address);
    assert.ok((await again.read(0, 4096)).equals(images.flat.subarray(0, 4096)));
    await again.close();
    await second.remove();

    // The guest's device writes while the export is open (HMP qemu-io through the device's own BlockBackend):
    // the export reads the live disk, and exporting read-only did not take the writer's permission away.
    const wrote = await vm.qmp.execute("human-monitor-command", {
      "command-line": 'qemu-io -d /machine/peripheral/virtio-disk1/virtio-backend "write -P 0x77 8192 4096"',
    });
    t.diagnostic(`guest-side write while exported: ${wrote.trim()}`);
    const live = await NbdDevice.open(exported.address);
    assert.ok(
      (await live.read(8192, 4096)).equals(Buffer.alloc(4096, 0x77)),
      "the export shows the guest's write",
    );
    await live.close();

    await exported.remove();
    await exported.remove(); // idempotent
    assert.deepEqual(await vm.qmp.executeUntyped("query-block-exports"), []);
    await assert.rejects(NbdDevice.open(exported.address), StorageError);
    assert.equal((await vm.qmp.execute("query-status", undefined)).status, "running");
  });
}

test("destination: what an -incoming QEMU says to block-export-add, and qemu-nbd (force-share) reading the image", {
  timeout,
  skip,
}, async (t) => {
  const q72 = await qemuOf(t, "7.2");
  if (!q72) return;
  const q10 = await ensureQemu("10.0").catch(() => null);
  const images = await makeImages(t);
  await startQemu(t, q72, images.top, images.dir, "source");
  const answers: Record<string, string> = {};
  for (const qemu of q10 ? [q72, q10] : [q72]) {
    const dst = await startQemu(t, qemu, images.top, images.dir, `dst-${qemu.version}`, true);
    const socketPath = join(images.dir, `dst-${qemu.version}.sock`);
    await dst.qmp.executeUntyped("nbd-server-start", { addr: { type: "unix", data: { path: socketPath } } });
    const add = async (extra: Record<string, unknown>, id: string) => {
      const args = { type: "nbd", id, "node-name": "libvirt-1-format", writable: false, ...extra };
      try {
        await dst.qmp.executeUntyped("block-export-add", args);
        return "{} (accepted)";
      } catch (error) {
        return error instanceof QmpError ? `${error.errorClass}: ${error.desc}` : String(error);
      }
    };
    answers[`${qemu.version} default`] = await add({}, "plain");
    answers[`${qemu.version} allow-inactive`] = await add({ "allow-inactive": true }, "inactive");
  }
  for (const [k, v] of Object.entries(answers)) t.diagnostic(`block-export-add on QEMU ${k}: ${v}`);
  // As nbd-server.ts records: 7.2 accepts (activating the node, a lock failure ignored), and knows no
  // allow-inactive; 10.0 refuses unless allow-inactive.
  assert.equal(answers["7.2 default"], "{} (accepted)");
  assert.match(answers["7.2 allow-inactive"] ?? "", /allow-inactive.*unexpected/);
  if (q10) {
    assert.match(answers["10.0 default"] ?? "", /lock/);
    assert.equal(answers["10.0 allow-inactive"], "{} (accepted)");
  }

  // qemu-nbd reads the image the QEMUs hold: with force-share it may, without it the lock stops it.
  await assert.rejects(
    startNbdServer({
      image: images.top,
      format: "qcow2",
      socketPath: join(images.dir, "locked.sock"),
      forceShare: false,
    }),
    (error: unknown) => error instanceof StorageError && /lock/.test(error.message),
  );
  const server = await startNbdServer({
    image: images.top,
    format: "qcow2",
    socketPath: join(images.dir, "n.sock"),
  });
  trackProcess(server.pid);
  t.after(async () => {
    await server.stop();
    untrackProcess(server.pid);
  });
  const device = await NbdDevice.open(server.address);
  t.after(() => device.close());
  const whole = await device.read(0, IMAGE_BYTES);
  assert.ok(whole.equals(images.flat));
});

const sha256 = (bytes: Buffer) => createHash("sha256").update(bytes).digest();

test("receive end to end: REFs of a qcow2 disk resolved through qemu-nbd, asynchronously, stale ones NACKed", {
  timeout,
  skip,
}, async (t) => {
  const images = await makeImages(t);
  const server = await startNbdServer({
    image: images.top,
    format: "qcow2",
    socketPath: join(images.dir, "d.sock"),
  });
  trackProcess(server.pid);
  t.after(async () => {
    await server.stop();
    untrackProcess(server.pid);
  });
  const disk = await openDiskReader(formatNbdUri(server.address), { alignmentBytes: 512 });
  assert.equal(disk.canReadSync, false);
  const destination = await fakeDestination(t, join(images.dir, "qemu.sock"));
  const psk = randomBytes(32);
  const receive = await startReceive({
    listen: { path: join(images.dir, "receive.sock") },
    to: { path: join(images.dir, "qemu.sock") },
    psk,
    security: { mode: "plaintext" },
    disk,
    log: (line) => t.diagnostic(line),
  });
  t.after(async () => {
    await receive.relay.close();
    await disk.close();
  });

  // The stream send would send: DATA, and REFs of 4 KiB blocks at sector offsets of the guest-visible disk
  // (backing-only areas, rewritten ones, the last block); every 7th REF's page differs from the disk (the guest
  // rewrote the block), and is NACKed, then answered with PAGE_DATA.
  const frames: Buffer[] = [];
  const expected: Buffer[] = [];
  const pageOf = new Map<number, Buffer>();
  const header = (refId: number) => {
    const h = Buffer.alloc(8);
    h.writeBigUInt64BE(BigInt(refId * 4096) | 0x08n);
    return h;
  };
  const sectors = (IMAGE_BYTES - 4096) / 512;
  let lastRef = 0;
  for (let refId = 1; refId <= 600; refId++) {
    const sector = refId === 600 ? sectors : (refId * 2467) % sectors;
    const stale = refId % 7 === 0;
    const page = stale ? randomBytes(4096) : images.flat.subarray(sector * 512, sector * 512 + 4096);
    pageOf.set(refId, Buffer.from(page));
    const bytes = randomBytes(1 + (refId % 50));
    frames.push(encodeMessage({ type: MSG.DATA, bytes }));
    frames.push(
      encodeMessage({
        type: MSG.REF,
        refId,
        blockNumber: sector,
        hash: sha256(page),
        pageHeader: header(refId),
      }),
    );
    expected.push(bytes, header(refId), page);
    lastRef = refId;
  }
  frames.push(encodeMessage({ type: MSG.EOF }));

  const link = connect({ path: join(images.dir, "receive.sock"), allowHalfOpen: true });
  link.on("error", () => {});
  await once(link, "connect");
  const session = await clientHandshake(link, { psk, capabilities: [CAPABILITY.REF_SHA256] });
  assert.deepEqual(session.capabilities, [CAPABILITY.REF_SHA256]);
  const decoder = new LinkDecoder();
  const nacked: number[] = [];
  let acked = 0;
  const allAcked = new Promise<void>((resolve) => {
    link.on("data", (chunk: Buffer) => {
      for (const m of decoder.push(chunk) as Message[]) {
        if (m.type === MSG.NACK) {
          nacked.push(m.refId);
          link.write(
            encodeMessage({ type: MSG.PAGE_DATA, refId: m.refId, page: pageOf.get(m.refId) as Buffer }),
          );
        } else if (m.type === MSG.ACK) {
          acked = m.refId;
          if (acked === lastRef) resolve();
        }
      }
    });
  });
  link.resume(); // the handshake leaves the socket paused
  link.write(Buffer.concat(frames));
  await allAcked;
  link.end(); // rule 6: after EOF and the ACK of the last REF
  const received = await destination.received[0];
  assert.ok(received?.equals(Buffer.concat(expected)), "the destination's stream, byte for byte");
  assert.deepEqual(
    nacked.sort((a, b) => a - b),
    Array.from({ length: 600 }, (_, i) => i + 1).filter((id) => id % 7 === 0),
  );
  const report = await receive.done;
  t.diagnostic(JSON.stringify(report.refs));
  assert.equal(report.refs.refsResolved, 600 - nacked.length);
  assert.equal(report.refs.refsNacked, nacked.length);
  assert.ok(report.refs.peakPendingReads > 1, "reads were in flight together");
});

test("live migration: receive rebuilds cache pages from the shared disk read through qemu-nbd (asynchronously)", {
  timeout: 900_000,
  skip,
}, async (t) => {
  const { LabPair } = await import("../../src/lab/lab-vm.ts");
  const { CACHE_HEAVY_512M, runMixedWorkload } = await import("../../src/lab/workloads.ts");
  const { prunedRamOracle } = await import("../../src/lab/prune-oracle.ts");
  const { REF_SECTOR_BYTES } = await import("../../src/migrate/link-send.ts");
  const { startSend } = await import("../../src/migrate/send.ts");
  const migration = await import("../../src/qemu/migration.ts");

  const pair = await LabPair.boot({ kernel: "6.12", qemu: "10.0", memoryMiB: 512 });
  t.after(() => pair.stop());
  await runMixedWorkload(pair.src.agent, CACHE_HEAVY_512M);
  const disk = join(pair.diskDir, "data.img");
  const dst = await pair.startDestination({ paused: true });
  const dstUri = await migration.prepareIncoming(dst.monitor, { incomingUri: "tcp:127.0.0.1:0" });
  // Both QEMUs hold the image; qemu-nbd reads it with force-share, as on a destination host.
  const server = await startNbdServer({
    image: disk,
    format: "raw",
    socketPath: join(pair.diskDir, "nbd.sock"),
  });
  trackProcess(server.pid);
  t.after(async () => {
    await server.stop();
    untrackProcess(server.pid);
  });
  const reader = await openDiskReader(formatNbdUri(server.address), { alignmentBytes: REF_SECTOR_BYTES });
  assert.equal(reader.canReadSync, false);
  const psk = randomBytes(32);
  const receive = await startReceive({
    listen: { host: "127.0.0.1", port: 0 },
    to: migration.tcpAddress(dstUri),
    psk,
    disk: reader,
  });
  t.after(async () => {
    await receive.relay.close();
    await reader.close();
  });
  const qmp = await QmpClient.connect(pair.src.toolQmpPath);
  t.after(() => qmp.close());
  const send = await startSend({
    listen: { host: "127.0.0.1", port: 0 },
    to: receive.address,
    drop: ["free", "cache"],
    guest: { qmp: { client: qmp, path: pair.src.toolQmpPath } },
    link: { psk },
    disk,
    // References, not whole pages, whatever room loopback has: they are what this test is about.
    refsWhen: "always",
  });
  t.after(() => send.relay.close());
  const result = await migration.runMigration(pair.src.monitor, `tcp:127.0.0.1:${send.address.port}`, {
    parameters: migration.LOOPBACK_PARAMETERS,
  });
  await migration.waitDestinationState(dst.monitor, "paused");
  const [sent, received] = await Promise.all([send.done, receive.done]);
  const oracle = await prunedRamOracle(pair.src, dst);
  const p = sent.prune;
  t.diagnostic(`refs ${p?.refs}; receive ${JSON.stringify(received.refs)}; ${oracle.differing} pages differ`);
  assert.equal(result.status, "completed");
  assert.ok((p?.refs ?? 0) > 10_000, "cache pages went as references");
  assert.equal(received.refs.refsResolved, p?.refs, "receive rebuilt every reference through NBD");
  assert.equal(received.refs.refsNacked, 0);
  assert.ok(received.refs.peakPendingReads > 1, "reads were in flight together");
  assert.deepEqual(oracle.differingNotFree, [], "rebuilt cache pages are bit-exact: only free pages differ");
  await dst.monitor.execute("cont");
  assert.match(await LabPair.verify(dst), /^OK/m);
});
