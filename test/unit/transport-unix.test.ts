/**
 * Unix-socket listeners (src/transport/socket.ts) on real sockets in a private temporary directory: a stale socket
 * file is replaced, a live socket and a regular file are left alone with an error, mode and owner are set, and
 * the file goes away on close (but not a file that replaced it).
 */
import assert from "node:assert/strict";
import { once } from "node:events";
import {
  linkSync,
  lstatSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  renameSync,
  rmSync,
  statSync,
  unlinkSync,
  writeFileSync,
} from "node:fs";
import { createServer, type Server } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { type TestContext, test } from "node:test";
import { EndpointError } from "../../src/transport/endpoint.ts";
import { connect, listen } from "../../src/transport/socket.ts";

const timeout = 15_000;

function tempDir(t: TestContext): string {
  const dir = mkdtempSync(join(tmpdir(), "vmprune-unix-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

function close(server: Server): Promise<void> {
  return new Promise((resolve) => server.close(() => resolve()));
}

/** Connects, writes `text`, and resolves with what the server answered before closing. */
async function roundTrip(path: string, text: string): Promise<string> {
  const socket = connect({ path });
  await once(socket, "connect");
  const chunks: Buffer[] = [];
  socket.on("data", (chunk: Buffer) => chunks.push(chunk));
  socket.end(text);
  await once(socket, "close");
  return Buffer.concat(chunks).toString();
}

function echo(server: Server): void {
  server.on("connection", (socket) => {
    socket.on("data", (chunk: Buffer) => socket.write(chunk));
    socket.on("end", () => socket.end());
  });
}

/** A socket file with nothing behind it, as a process killed by SIGKILL leaves it. */
async function staleSocket(path: string): Promise<void> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(path, resolve));
  // Node unlinks the file when the server closes; a link under another name keeps it for the test.
  const keep = `${path}.keep`;
  linkSync(path, keep);
  await close(server);
  renameSync(keep, path);
  assert.ok(lstatSync(path).isSocket());
}

test("listen and connect on a unix socket; the file is removed on close", { timeout }, async (t) => {
  const path = join(tempDir(t), "relay.sock");
  const server = await listen({ path });
  t.after(() => close(server));
  echo(server);
  assert.ok(lstatSync(path).isSocket());
  assert.equal(await roundTrip(path, "hello"), "hello");
  await close(server);
  assert.throws(() => lstatSync(path), /ENOENT/, "the socket file is gone after close");
});

test("a stale socket file (nothing accepts on it) is replaced", { timeout }, async (t) => {
  const path = join(tempDir(t), "stale.sock");
  await staleSocket(path);
  await assert.rejects(roundTrip(path, "anyone?"), /ECONNREFUSED/, "nothing accepts on the stale file");
  const server = await listen({ path });
  t.after(() => close(server));
  echo(server);
  assert.equal(await roundTrip(path, "fresh"), "fresh", "a listening socket in its place");
});

test("a live socket is never deleted: listening there fails and the other server keeps working", {
  timeout,
}, async (t) => {
  const path = join(tempDir(t), "live.sock");
  const other = await listen({ path });
  t.after(() => close(other));
  echo(other);
  let probes = 0;
  other.on("connection", () => {
    probes += 1;
  });
  const inode = lstatSync(path).ino;
  await assert.rejects(listen({ path }), (error: unknown) => {
    assert.ok(error instanceof EndpointError);
    assert.match(
      error.message,
      new RegExp(`another process is listening on ${path}: stop it, or choose another socket path`),
    );
    return true;
  });
  assert.equal(lstatSync(path).ino, inode, "the live socket's file is untouched");
  // /proc/net/unix told it was listening: no probe connection reached the live server.
  assert.equal(probes, 0);
  assert.equal(await roundTrip(path, "still here"), "still here");
});

test("a regular file (or a directory) at the path is refused and left as it is", { timeout }, async (t) => {
  const dir = tempDir(t);
  const file = join(dir, "precious.sock");
  writeFileSync(file, "operator data");
  await assert.rejects(
    listen({ path: file }),
    new RegExp(`${file} exists and is a regular file, not a unix socket: it was left as it is`),
  );
  assert.equal(readFileSync(file, "utf8"), "operator data");
  await assert.rejects(listen({ path: dir }), /exists and is a directory, not a unix socket/);
  assert.ok(statSync(dir).isDirectory());
});

test("mode and owner are set before the socket is reachable, and no temporary file is left", {
  timeout,
}, async (t) => {
  const dir = tempDir(t);
  const path = join(dir, "qemu.sock");
  const root = process.getuid?.() === 0;
  // As root, give it away (nobody's ids on Debian); otherwise keep our own ids, which chown allows.
  const owner = root
    ? { uid: 65534, gid: 65534 }
    : { uid: process.getuid?.() ?? 0, gid: process.getgid?.() ?? 0 };
  const server = await listen({ path }, { mode: 0o660, owner });
  t.after(() => close(server));
  echo(server);
  const stats = lstatSync(path);
  assert.ok(stats.isSocket());
  assert.equal(stats.mode & 0o777, 0o660);
  assert.equal(stats.uid, owner.uid);
  assert.equal(stats.gid, owner.gid);
  assert.deepEqual(readdirSync(dir), ["qemu.sock"], "only the socket: the temporary name was renamed");
  // root passes permission checks; the connection works through the renamed path.
  if (root) assert.equal(await roundTrip(path, "renamed"), "renamed");
  await close(server);
  assert.deepEqual(readdirSync(dir), [], "removed on close");
});

test("close removes only its own socket: a file put at the path since is kept", { timeout }, async (t) => {
  const path = join(tempDir(t), "replaced.sock");
  const server = await listen({ path }, { mode: 0o600 });
  unlinkSync(path);
  writeFileSync(path, "someone else's");
  await close(server);
  assert.equal(readFileSync(path, "utf8"), "someone else's");
});

test("a socket mode for a TCP address is refused", { timeout }, async () => {
  await assert.rejects(
    listen({ host: "127.0.0.1", port: 0 }, { mode: 0o660 }),
    /a socket mode or owner applies to unix sockets only, not to the TCP address 127\.0\.0\.1:0/,
  );
});
