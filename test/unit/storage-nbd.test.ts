/**
 * Reading guest disks through NBD (src/storage/nbd-client.ts, nbd-device.ts, nbd-server.ts) against a real
 * qemu-nbd: a qcow2 overlay on a raw base reads as `qemu-img convert` flattens it, at every kind of offset;
 * hundreds of pipelined reads come back right; failures (wrong export, a server killed mid-read, a range beyond
 * the disk, a peer that is not an NBD server, one that answers out of step or not at all) are StorageErrors,
 * never hangs. Every qemu-nbd is stopped by its PID, also on failure.
 */
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { mkdtemp, rm } from "node:fs/promises";
import { createServer, type Server, type Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { RawFileDevice } from "../../src/storage/block-device.ts";
import { BlockReader, openDiskReader } from "../../src/storage/block-reader.ts";
import { StorageError } from "../../src/storage/errors.ts";
import { strongHash } from "../../src/storage/fingerprint.ts";
import { formatNbdUri, NbdClient, parseNbdUri } from "../../src/storage/nbd-client.ts";
import { NbdDevice } from "../../src/storage/nbd-device.ts";
import { type RunningNbdServer, startNbdServer } from "../../src/storage/nbd-server.ts";
import { IMAGE_BYTES, makeImages, missingQemuTools } from "../support/nbd-images.ts";

const skip = missingQemuTools() ?? false;
const PAGE = 4096;

type After = { after: (fn: () => Promise<void>) => void };

async function serve(
  t: After,
  image: string,
  format: string,
  dir: string,
  name = "disk",
): Promise<RunningNbdServer> {
  const server = await startNbdServer({
    image,
    format,
    socketPath: join(dir, `${name}.sock`),
    exportName: name,
  });
  t.after(() => server.stop());
  return server;
}

async function open(t: After, server: RunningNbdServer): Promise<NbdDevice> {
  const device = await NbdDevice.open(server.address);
  t.after(() => device.close());
  return device;
}

/** Offsets that cover the backing-only areas, the rewritten ones and their edges, and the last block. */
function offsetsToCheck(written: { offset: number; length: number }[]): number[] {
  const offsets = new Set<number>([0, 512, IMAGE_BYTES - PAGE, IMAGE_BYTES - PAGE - 512]);
  for (const w of written)
    for (const delta of [-PAGE, -512, 0, 512, w.length - PAGE, w.length - 512, w.length])
      offsets.add(Math.max(0, Math.min(IMAGE_BYTES - PAGE, w.offset + delta - (delta % 512))));
  for (let i = 0; i < 200; i++) offsets.add(Math.floor(Math.random() * ((IMAGE_BYTES - PAGE) / 512)) * 512);
  return [...offsets].map((o) => o - (o % 512));
}

test("NBD URIs: nbd+unix and nbd forms, round trip, refusals", () => {
  assert.deepEqual(parseNbdUri("nbd+unix:///disk?socket=/run/x.sock"), {
    server: { path: "/run/x.sock" },
    exportName: "disk",
  });
  assert.deepEqual(parseNbdUri("nbd://127.0.0.1:10810/vda"), {
    server: { host: "127.0.0.1", port: 10810 },
    exportName: "vda",
  });
  assert.deepEqual(parseNbdUri("nbd://[::1]/"), { server: { host: "::1", port: 10809 }, exportName: "" });
  for (const a of [
    { server: { path: "/tmp/a b.sock" }, exportName: "x y" },
    { server: { host: "::1", port: 1 }, exportName: "e" },
  ])
    assert.deepEqual(parseNbdUri(formatNbdUri(a)), a);
  assert.throws(() => parseNbdUri("nbd+unix:///disk"), /names its socket/);
  assert.throws(() => parseNbdUri("nbds://h/e"), /no TLS/);
  assert.throws(() => parseNbdUri("/var/lib/disk.raw"), /not an NBD URI/);
});

test("a qcow2 overlay on a raw base reads through qemu-nbd as qemu-img convert flattens it", {
  skip,
}, async (t) => {
  const images = await makeImages(t);
  const server = await serve(t, images.top, "qcow2", images.dir);
  const device = await open(t, server);
  assert.equal(device.sizeBytes, IMAGE_BYTES);
  assert.equal(device.info.readOnly, true, "qemu-nbd --read-only announces NBD_FLAG_READ_ONLY");
  assert.equal(device.info.negotiatedWith, "go");
  const offsets = offsetsToCheck(images.written);
  const reads = await Promise.all(offsets.map((o) => device.read(o, PAGE)));
  offsets.forEach((o, i) => {
    assert.ok(reads[i]?.equals(images.flat.subarray(o, o + PAGE)), `4 KiB at ${o}`);
  });
  // The whole disk in uneven pieces (the last one ends at the disk's end), and odd lengths within sectors.
  const pieces: Promise<Buffer>[] = [];
  for (let at = 0; at < IMAGE_BYTES; at += 300_000)
    pieces.push(device.read(at, Math.min(300_000, IMAGE_BYTES - at)));
  assert.ok(Buffer.concat(await Promise.all(pieces)).equals(images.flat), "the whole disk, byte for byte");
  assert.ok(
    (await device.read(3 * 65536 - 1537, 3)).equals(images.flat.subarray(3 * 65536 - 1537, 3 * 65536 - 1534)),
  );
  // The rewritten areas really differ from the base (the test would not see a backing-only read otherwise).
  const base = await RawFileDevice.open(images.base);
  t.after(() => base.close());
  const w = images.written[0] as { offset: number; length: number };
  assert.ok(!(await base.read(w.offset, PAGE)).equals(await device.read(w.offset, PAGE)));
});

test("a raw image reads through qemu-nbd as the file holds it; BlockReader verifies blocks from it", {
  skip,
}, async (t) => {
  const images = await makeImages(t);
  const server = await serve(t, images.base, "raw", images.dir);
  const device = await open(t, server);
  const file = await RawFileDevice.open(images.base);
  t.after(() => file.close());
  for (const o of offsetsToCheck(images.written))
    assert.ok((await device.read(o, PAGE)).equals(file.readSync(o, PAGE)), `4 KiB at ${o}`);

  const reader = await openDiskReader(formatNbdUri(server.address), { alignmentBytes: 512 });
  t.after(() => reader.close());
  assert.equal(reader.canReadSync, false);
  const block = 2048 + 3; // byte 1 MiB + 1.5 KiB
  const good = strongHash(file.readSync(block * 512, PAGE));
  const ok = await reader.read(block, good);
  assert.ok(ok.ok && ok.page.equals(file.readSync(block * 512, PAGE)));
  const mismatch = await reader.read(block + 1, good);
  assert.equal(!mismatch.ok && mismatch.error.code, "hash-mismatch");
  const beyond = await reader.read(IMAGE_BYTES / 512, good);
  assert.equal(!beyond.ok && beyond.error.code, "out-of-range");
  assert.throws(() => reader.readSync(block, good), /read asynchronously only/);
  // The same reader over the raw file keeps its synchronous path.
  const rawReader = await openDiskReader(images.base, { alignmentBytes: 512 });
  t.after(() => rawReader.close());
  assert.equal(rawReader.canReadSync, true);
  assert.ok(rawReader.readSync(block, good).ok);
  const sharedRaw = await BlockReader.fromDevice(await RawFileDevice.open(images.base), {
    alignmentBytes: 512,
  });
  t.after(() => sharedRaw.close());
  assert.ok((await sharedRaw.read(block, good)).ok);
});

test("over TCP (loopback) as over a unix socket", { skip }, async (t) => {
  const images = await makeImages(t);
  const probe = createServer();
  await new Promise<void>((resolve) => probe.listen(0, "127.0.0.1", resolve));
  const port = (probe.address() as { port: number }).port;
  await new Promise<void>((resolve) => probe.close(() => resolve()));
  const server = await startNbdServer({
    image: images.top,
    format: "qcow2",
    tcp: { host: "127.0.0.1", port },
  });
  t.after(() => server.stop());
  assert.equal(formatNbdUri(server.address), `nbd://127.0.0.1:${port}/disk`);
  const device = await NbdDevice.open(parseNbdUri(`nbd://127.0.0.1:${port}/disk`));
  t.after(() => device.close());
  const offsets = offsetsToCheck(images.written);
  const pages = await Promise.all(offsets.map((o) => device.read(o, PAGE)));
  offsets.forEach((o, i) => {
    assert.ok(pages[i]?.equals(images.flat.subarray(o, o + PAGE)), `4 KiB at ${o}`);
  });
});

test("hundreds of pipelined reads in flight on one connection come back right", { skip }, async (t) => {
  const images = await makeImages(t);
  const server = await serve(t, images.top, "qcow2", images.dir);
  const device = await open(t, server);
  const offsets = Array.from(
    { length: 800 },
    () => Math.floor(Math.random() * ((IMAGE_BYTES - PAGE) / 512)) * 512,
  );
  const reads = offsets.map((o) => device.read(o, PAGE));
  assert.equal(device.client.inFlight, offsets.length, "every request is sent before any reply is awaited");
  const pages = await Promise.all(reads);
  offsets.forEach((o, i) => {
    assert.ok(pages[i]?.equals(images.flat.subarray(o, o + PAGE)), `read #${i} at ${o}`);
  });
  assert.equal(device.client.inFlight, 0);
  // close() lets the reads in flight finish, then disconnects (NBD_CMD_DISC); later reads are refused.
  const last = offsets.slice(0, 50).map((o) => device.read(o, PAGE));
  const closing = device.close();
  const lastPages = await Promise.all(last);
  offsets.slice(0, 50).forEach((o, i) => {
    assert.ok(lastPages[i]?.equals(images.flat.subarray(o, o + PAGE)));
  });
  await closing;
  await assert.rejects(device.read(0, PAGE), /closed/);
});

test("failures are StorageErrors: wrong export, range beyond the disk, server killed mid-read", {
  skip,
}, async (t) => {
  const images = await makeImages(t);
  const server = await serve(t, images.top, "qcow2", images.dir);
  await assert.rejects(
    NbdDevice.open({ server: server.address.server, exportName: "no-such-export" }),
    (error: unknown) =>
      error instanceof StorageError &&
      /refused the export: NBD_REP_ERR_UNKNOWN.*export name/s.test(error.message),
  );
  await assert.rejects(
    NbdDevice.open({ server: { path: join(images.dir, "nobody.sock") }, exportName: "" }),
    /cannot reach/,
  );

  const device = await open(t, server);
  for (const [offset, length] of [
    [IMAGE_BYTES - PAGE + 512, PAGE],
    [IMAGE_BYTES, 1],
    [-512, PAGE],
    [0, 0],
  ] as const) {
    await assert.rejects(device.read(offset, length), StorageError);
    await assert.rejects(device.client.read(offset, length), StorageError);
    assert.equal(device.client.inFlight, 0, `nothing sent for ${length} bytes at ${offset}`);
  }
  assert.ok(
    (await device.read(0, PAGE)).equals(images.flat.subarray(0, PAGE)),
    "still usable after refusals",
  );

  // Killed while hundreds of reads are in flight: all settle (rejected), later reads fail at once.
  const reads = Array.from({ length: 400 }, (_, i) => device.read((i * 8192) % (IMAGE_BYTES - 65536), 65536));
  process.kill(server.pid, "SIGKILL");
  const settled = await Promise.allSettled(reads);
  const failed = settled.filter((s) => s.status === "rejected");
  assert.ok(failed.length > 0, "the server died before answering everything");
  for (const f of failed)
    assert.ok(f.reason instanceof StorageError && /closed the connection|failed/.test(f.reason.message));
  await assert.rejects(device.read(0, PAGE), /reads fail/);
  await server.exited;
});

/** A peer on a unix socket that runs `behave` on each connection (not QEMU: a server that breaks the rules). */
async function peer(t: After, dir: string, behave: (socket: Socket) => void): Promise<string> {
  const path = join(dir, `peer-${Math.random().toString(16).slice(2)}.sock`);
  const server: Server = createServer(behave);
  const sockets = new Set<Socket>();
  server.on("connection", (s) => {
    sockets.add(s);
    s.on("error", () => {});
  });
  await new Promise<void>((resolve) => server.listen(path, resolve));
  t.after(async () => {
    for (const s of sockets) s.destroy();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  });
  return path;
}

/** The server's half of a good handshake (proto.md): greeting; after the client's flags and NBD_OPT_GO, INFO + ACK. */
function goodHandshake(socket: Socket, size: number, then: (socket: Socket) => void): void {
  const greeting = Buffer.alloc(18);
  greeting.write("NBDMAGIC", 0, "latin1");
  greeting.write("IHAVEOPT", 8, "latin1");
  greeting.writeUInt16BE(3, 16); // FIXED_NEWSTYLE | NO_ZEROES
  socket.write(greeting);
  let got = Buffer.alloc(0);
  const onData = (chunk: Buffer) => {
    got = Buffer.concat([got, chunk]);
    if (got.length < 4 + 16) return;
    const optLength = got.readUInt32BE(4 + 12);
    if (got.length < 4 + 16 + optLength) return;
    socket.off("data", onData);
    const reply = (type: number, data: Buffer) => {
      const header = Buffer.alloc(20);
      header.writeBigUInt64BE(0x3e889045565a9n, 0);
      header.writeUInt32BE(7, 8);
      header.writeUInt32BE(type, 12);
      header.writeUInt32BE(data.length, 16);
      return Buffer.concat([header, data]);
    };
    const info = Buffer.alloc(12);
    info.writeUInt16BE(0, 0);
    info.writeBigUInt64BE(BigInt(size), 2);
    info.writeUInt16BE(1 | 2, 10);
    socket.write(Buffer.concat([reply(3, info), reply(1, Buffer.alloc(0))]));
    then(socket);
  };
  socket.on("data", onData);
}

test("a peer that is not an NBD server, or breaks the protocol, fails with a StorageError, never a hang", {
  skip,
}, async (t) => {
  const images = await makeImages(t);
  const dir = images.dir;
  const junk = await peer(t, dir, (s) => s.end("HTTP/1.1 400 Bad Request\r\n\r\nthis is not NBD at all"));
  await assert.rejects(NbdClient.connect({ server: { path: junk }, exportName: "" }), /not an NBD server/);
  const silent = await peer(t, dir, () => {});
  await assert.rejects(
    NbdClient.connect({ server: { path: silent }, exportName: "" }, { connectTimeoutMs: 200 }),
    /no NBD handshake .* within 200 ms/,
  );
  const oldstyle = await peer(t, dir, (s) => {
    const b = Buffer.alloc(16);
    b.write("NBDMAGIC", 0, "latin1");
    b.writeBigUInt64BE(0x00420281861253n, 8);
    s.write(Buffer.concat([b, Buffer.alloc(8 + 4 + 124)]));
  });
  await assert.rejects(NbdClient.connect({ server: { path: oldstyle }, exportName: "" }), /oldstyle/);
  const hugeReply = await peer(t, dir, (s) => {
    const greeting = Buffer.alloc(18);
    greeting.write("NBDMAGIC", 0, "latin1");
    greeting.write("IHAVEOPT", 8, "latin1");
    greeting.writeUInt16BE(1, 16);
    s.write(greeting);
    s.once("data", () => {
      const header = Buffer.alloc(20);
      header.writeBigUInt64BE(0x3e889045565a9n, 0);
      header.writeUInt32BE(7, 8);
      header.writeUInt32BE(3, 12);
      header.writeUInt32BE(2 ** 30, 16); // 1 GiB of "information"
      s.write(header);
    });
  });
  await assert.rejects(
    NbdClient.connect({ server: { path: hugeReply }, exportName: "" }),
    /1073741824-byte option reply/,
  );

  // Handshake fine, then a reply with a cookie nobody sent.
  const wrongCookie = await peer(t, dir, (s) =>
    goodHandshake(s, 1 << 20, (sock) =>
      sock.on("data", () => {
        const r = Buffer.alloc(16);
        r.writeUInt32BE(0x67446698, 0);
        r.writeBigUInt64BE(0xdeadn, 8);
        sock.write(r);
      }),
    ),
  );
  const out = await NbdClient.connect({ server: { path: wrongCookie }, exportName: "" });
  t.after(() => out.close());
  assert.equal(out.info.sizeBytes, 1 << 20);
  await assert.rejects(out.read(0, PAGE), /answered cookie 57005, which no read in flight has/);
  await assert.rejects(out.read(0, PAGE), /reads fail/);

  // Handshake fine, then an error reply: that read fails, the connection stays usable.
  const eio = await peer(t, dir, (s) =>
    goodHandshake(s, 1 << 20, (sock) => {
      let pending = Buffer.alloc(0);
      sock.on("data", (chunk: Buffer) => {
        pending = Buffer.concat([pending, chunk]);
        while (pending.length >= 28) {
          const request = pending.subarray(0, 28);
          pending = pending.subarray(28);
          const r = Buffer.alloc(16);
          r.writeUInt32BE(0x67446698, 0);
          const offset = Number(request.readBigUInt64BE(16));
          r.writeUInt32BE(offset === 0 ? 5 : 0, 4);
          request.copy(r, 8, 8, 16);
          sock.write(offset === 0 ? r : Buffer.concat([r, Buffer.alloc(request.readUInt32BE(24), 7)]));
        }
      });
    }),
  );
  const client = await NbdClient.connect({ server: { path: eio }, exportName: "" });
  t.after(() => client.close());
  await assert.rejects(client.read(0, PAGE), /failed a read of 4096 bytes at 0: NBD_EIO/);
  assert.ok((await client.read(PAGE, PAGE)).equals(Buffer.alloc(PAGE, 7)));

  // Handshake fine, then silence: the request timeout fails the read.
  const mute = await peer(t, dir, (s) => goodHandshake(s, 1 << 20, () => {}));
  const slow = await NbdClient.connect({ server: { path: mute }, exportName: "" }, { requestTimeoutMs: 150 });
  t.after(() => slow.close());
  await assert.rejects(slow.read(0, PAGE), /did not answer a read of 4096 bytes at 0 within 150 ms/);
});

test("figure: 4 KiB reads per second, NbdDevice from qemu-nbd (1 and 32 in flight) vs RawFileDevice.readSync", {
  skip,
}, async (t) => {
  const images = await makeImages(t);
  const server = await serve(t, images.base, "raw", images.dir);
  const device = await open(t, server);
  const file = await RawFileDevice.open(images.base);
  t.after(() => file.close());
  const blocks = (IMAGE_BYTES - PAGE) / PAGE;
  const at = (i: number) => ((i * 7919) % blocks) * PAGE;
  const count = 4000;
  const rate = (ms: number) => Math.round((count / ms) * 1000);
  let start = performance.now();
  for (let i = 0; i < count; i++) await device.read(at(i), PAGE);
  const one = rate(performance.now() - start);
  start = performance.now();
  let next = 0;
  await Promise.all(
    Array.from({ length: 32 }, async () => {
      while (next < count) await device.read(at(next++), PAGE);
    }),
  );
  const many = rate(performance.now() - start);
  start = performance.now();
  for (let i = 0; i < count; i++) file.readSync(at(i), PAGE);
  const raw = rate(performance.now() - start);
  t.diagnostic(
    `4 KiB reads/s (unix socket, page cache warm): NbdDevice 1 in flight ${one}, 32 in flight ${many}; RawFileDevice.readSync ${raw}`,
  );
});

/**
 * A peer that serves `disk` by the protocol's rules, strictly: `go` false answers NBD_OPT_GO with
 * NBD_REP_ERR_UNSUP (an old server: the client must fall back to NBD_OPT_EXPORT_NAME); `blockSizes` is announced
 * with NBD_INFO_BLOCK_SIZE and every read that breaks it is answered NBD_EINVAL. Records the reads it served.
 */
function strictPeer(
  disk: Buffer,
  options: { go: boolean; blockSizes?: { min: number; preferred: number; max: number } },
  served: { offset: number; length: number }[],
) {
  return (socket: Socket) => {
    const greeting = Buffer.alloc(18);
    greeting.write("NBDMAGIC", 0, "latin1");
    greeting.write("IHAVEOPT", 8, "latin1");
    greeting.writeUInt16BE(1, 16); // FIXED_NEWSTYLE, zeroes after EXPORT_NAME
    socket.write(greeting);
    let got = Buffer.alloc(0);
    let phase: "flags" | "options" | "transmission" = "flags";
    const optionReply = (option: number, type: number, data: Buffer) => {
      const header = Buffer.alloc(20);
      header.writeBigUInt64BE(0x3e889045565a9n, 0);
      header.writeUInt32BE(option, 8);
      header.writeUInt32BE(type, 12);
      header.writeUInt32BE(data.length, 16);
      return Buffer.concat([header, data]);
    };
    socket.on("data", (chunk: Buffer) => {
      got = Buffer.concat([got, chunk]);
      for (;;) {
        if (phase === "flags") {
          if (got.length < 4) return;
          got = got.subarray(4);
          phase = "options";
        } else if (phase === "options") {
          if (got.length < 16 || got.length < 16 + got.readUInt32BE(12)) return;
          const option = got.readUInt32BE(8);
          got = got.subarray(16 + got.readUInt32BE(12));
          if (option === 7 && !options.go) socket.write(optionReply(7, 2 ** 31 + 1, Buffer.alloc(0)));
          else if (option === 7) {
            const info = Buffer.alloc(12);
            info.writeBigUInt64BE(BigInt(disk.length), 2);
            info.writeUInt16BE(1 | 2, 10);
            const replies = [optionReply(7, 3, info)];
            if (options.blockSizes) {
              const sizes = Buffer.alloc(14);
              sizes.writeUInt16BE(3, 0);
              sizes.writeUInt32BE(options.blockSizes.min, 2);
              sizes.writeUInt32BE(options.blockSizes.preferred, 6);
              sizes.writeUInt32BE(options.blockSizes.max, 10);
              replies.push(optionReply(7, 3, sizes));
            }
            socket.write(Buffer.concat([...replies, optionReply(7, 1, Buffer.alloc(0))]));
            phase = "transmission";
          } else if (option === 1) {
            const info = Buffer.alloc(10 + 124);
            info.writeBigUInt64BE(BigInt(disk.length), 0);
            info.writeUInt16BE(1 | 2, 8);
            socket.write(info);
            phase = "transmission";
          } else socket.write(optionReply(option, 2 ** 31 + 1, Buffer.alloc(0)));
        } else {
          if (got.length < 28) return;
          const offset = Number(got.readBigUInt64BE(16));
          const length = got.readUInt32BE(24);
          const reply = Buffer.alloc(16);
          reply.writeUInt32BE(0x67446698, 0);
          got.copy(reply, 8, 8, 16);
          got = got.subarray(28);
          const sizes = options.blockSizes;
          const bad =
            offset + length > disk.length ||
            (sizes !== undefined &&
              (offset % sizes.min !== 0 || length % sizes.min !== 0 || length > sizes.max));
          reply.writeUInt32BE(bad ? 22 : 0, 4);
          served.push({ offset, length });
          socket.write(bad ? reply : Buffer.concat([reply, disk.subarray(offset, offset + length)]));
        }
      }
    });
  };
}

test("NBD_OPT_EXPORT_NAME fallback, and reads aligned and split to the server's announced block sizes", async (t) => {
  const dir = await mkdtemp(join(tmpdir(), "vmprune-nbd-peer-"));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const disk = randomBytes(1024 * 1024);
  const oldServed: { offset: number; length: number }[] = [];
  const old = await peer(t, dir, strictPeer(disk, { go: false }, oldServed));
  const viaName = await NbdDevice.open({ server: { path: old }, exportName: "x" });
  t.after(() => viaName.close());
  assert.equal(viaName.info.negotiatedWith, "export-name");
  assert.equal(viaName.sizeBytes, disk.length);
  assert.ok((await viaName.read(12345, 6789)).equals(disk.subarray(12345, 12345 + 6789)));

  const served: { offset: number; length: number }[] = [];
  const blockSizes = { min: 512, preferred: 4096, max: 64 * 1024 };
  const strict = await peer(t, dir, strictPeer(disk, { go: true, blockSizes }, served));
  const device = await NbdDevice.open({ server: { path: strict }, exportName: "" });
  t.after(() => device.close());
  assert.equal(device.info.minBlockBytes, 512);
  assert.equal(device.info.maxPayloadBytes, 64 * 1024);
  // Unaligned, longer than the maximum payload, ending at the disk's end.
  for (const [offset, length] of [
    [100, 200_000],
    [disk.length - 70_000, 70_000],
    [4096, 4096],
    [513, 1],
  ] as const)
    assert.ok(
      (await device.read(offset, length)).equals(disk.subarray(offset, offset + length)),
      `${length} at ${offset}`,
    );
  assert.ok(served.length > 4, "long reads were split");
  for (const s of served) {
    assert.equal(s.offset % 512, 0);
    assert.equal(s.length % 512, 0);
    assert.ok(s.length <= 64 * 1024);
  }
  // The client itself refuses what would break the constraints, before sending.
  const before = served.length;
  await assert.rejects(device.client.read(100, 512), /aligned to 512 bytes and at most 65536/);
  await assert.rejects(device.client.read(0, 128 * 1024), /aligned to 512 bytes and at most 65536/);
  assert.equal(served.length, before);
});
