/**
 * Listening and connecting on an {@link Endpoint}: the one place that binds vmprune's relays to sockets, so that
 * the relay and the link know only a `net.Server` and `net.Socket` whatever carries them.
 *
 * Unix-socket listeners, and why:
 * 1. A stale socket file (left by a process that died without closing, e.g. by SIGKILL) is removed, so a restart
 *    needs no manual cleanup. Only a socket file nothing accepts on is stale: a regular file or any other kind is
 *    never touched, and a live socket (another vmprune, a QEMU's `-incoming unix:`) is never deleted, since its
 *    owner could then no longer be reached. Liveness is read from /proc/net/unix first, so that a live QEMU
 *    listening there is not disturbed by a probe connection (a destination QEMU takes any connection as a
 *    migration channel); only a socket not listed there is probed with a connect.
 * 2. Mode and owner are on the socket before anyone can connect: it is bound under a temporary name in the same
 *    directory, chmod/chown-ed, then renamed over the path (rename is atomic; the socket keeps working, since a
 *    connect resolves the path to the inode). QEMU started by libvirt runs as another user and must be able to
 *    connect; nobody else should.
 * 3. Closing the server removes the file, and only if the path still names the socket it created (someone may
 *    have replaced it since).
 */
import { randomBytes } from "node:crypto";
import { chmodSync, chownSync, lstatSync, readFileSync, renameSync, type Stats, unlinkSync } from "node:fs";
import { createServer, isIPv4, connect as netConnect, type Server, type Socket } from "node:net";
import { networkInterfaces } from "node:os";
import { basename, dirname, join } from "node:path";
import { type ConnectionOptions, TLSSocket, connect as tlsConnect } from "node:tls";
import { checkUnixPath, type Endpoint, EndpointError, formatEndpoint, isUnixEndpoint } from "./endpoint.ts";

export interface UnixSocketOptions {
  /** Permission bits of the socket file (e.g. 0o660: connecting needs write permission). */
  mode?: number;
  /** Owner of the socket file; an absent field is left as it is (chown(2)'s -1). */
  owner?: { uid?: number; gid?: number };
}

export interface ListenOptions extends UnixSocketOptions {
  allowHalfOpen?: boolean;
  /** Accepted sockets are paused until read from (net.createServer's pauseOnConnect). */
  pauseOnConnect?: boolean;
  /** TCP_NODELAY on accepted TCP sockets (no meaning on unix sockets). */
  noDelay?: boolean;
  /** How long a probe of an existing socket file may take before it counts as live (default 2 s). */
  probeTimeoutMs?: number;
}

export interface ConnectOptions {
  allowHalfOpen?: boolean;
  noDelay?: boolean;
  /** Connect over TLS with these options (tls.ts): the socket is ready on 'secureConnect', not 'connect'. */
  tls?: ConnectionOptions;
}

/** What /proc/net/unix's Flags column holds for a listening socket (__SO_ACCEPTCON, include/linux/net.h). */
const SO_ACCEPTCON = 0x10000;

function errnoCode(error: unknown): string | undefined {
  return (error as NodeJS.ErrnoException | undefined)?.code;
}

function errorText(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

function lstatOrNull(path: string): Stats | null {
  try {
    return lstatSync(path);
  } catch (error) {
    if (errnoCode(error) === "ENOENT") return null;
    throw new EndpointError(`cannot look at ${path}: ${errorText(error)}`);
  }
}

function kindOf(stats: Stats): string {
  if (stats.isFile()) return "regular file";
  if (stats.isDirectory()) return "directory";
  if (stats.isSymbolicLink()) return "symbolic link";
  if (stats.isFIFO()) return "FIFO";
  if (stats.isCharacterDevice() || stats.isBlockDevice()) return "device";
  return "file that is not a socket";
}

/** True if this network namespace lists a listening unix socket bound at `path` (false if it cannot tell). */
function listedAsListening(path: string): boolean {
  let table: string;
  try {
    table = readFileSync("/proc/net/unix", "utf8");
  } catch {
    return false;
  }
  for (const line of table.split("\n").slice(1)) {
    // Num RefCount Protocol Flags Type St Inode Path (the path may be absent, and could hold spaces)
    const fields = line.trim().split(/\s+/);
    if (fields.length < 8 || fields.slice(7).join(" ") !== path) continue;
    if ((Number.parseInt(fields[3] ?? "0", 16) & SO_ACCEPTCON) !== 0) return true;
  }
  return false;
}

/** Connects to the socket at `path` and hangs up: "live" if something accepted, "stale" if refused. */
function probe(path: string, timeoutMs: number): Promise<"live" | "stale"> {
  return new Promise((resolve, reject) => {
    const socket = netConnect({ path });
    const timer = setTimeout(() => {
      // A full accept queue delays the connect: something is there.
      socket.destroy();
      resolve("live");
    }, timeoutMs);
    socket.once("connect", () => {
      clearTimeout(timer);
      socket.destroy();
      resolve("live");
    });
    socket.once("error", (error) => {
      clearTimeout(timer);
      socket.destroy();
      if (errnoCode(error) === "ECONNREFUSED") resolve("stale");
      else if (errnoCode(error) === "EAGAIN") resolve("live");
      else reject(new EndpointError(`cannot tell whether ${path} is in use: ${errorText(error)}`));
    });
  });
}

/** Rule 1: removes `path` if it is a socket file nothing accepts on; throws if it is anything else. */
async function clearStaleSocket(path: string, probeTimeoutMs: number): Promise<void> {
  const stats = lstatOrNull(path);
  if (!stats) return;
  if (!stats.isSocket())
    throw new EndpointError(
      `${path} exists and is a ${kindOf(stats)}, not a unix socket: it was left as it is; remove it or choose another socket path`,
    );
  if (listedAsListening(path) || (await probe(path, probeTimeoutMs)) === "live")
    throw new EndpointError(
      `another process is listening on ${path}: stop it, or choose another socket path`,
    );
  // Only the inode that was found stale: a socket bound there since is someone else's.
  const now = lstatOrNull(path);
  if (!now) return;
  if (now.ino !== stats.ino || now.dev !== stats.dev)
    throw new EndpointError(
      `${path} was replaced while vmprune checked it: another process may be starting there`,
    );
  try {
    unlinkSync(path);
  } catch (error) {
    if (errnoCode(error) !== "ENOENT")
      throw new EndpointError(`cannot remove the stale socket ${path}: ${errorText(error)}`);
  }
}

function bind(server: Server, target: { path: string } | { host: string; port: number }): Promise<void> {
  return new Promise((resolve, reject) => {
    const onError = (error: Error) => reject(error);
    server.once("error", onError);
    server.listen(target, () => {
      server.off("error", onError);
      resolve();
    });
  });
}

function closeQuietly(server: Server): Promise<void> {
  return new Promise((resolve) => server.close(() => resolve()));
}

/** Rule 2 and 3: binds at a temporary name, sets mode and owner, renames it over `path`. */
async function listenUnix(server: Server, path: string, options: ListenOptions): Promise<void> {
  checkUnixPath(path);
  await clearStaleSocket(path, options.probeTimeoutMs ?? 2000);
  const wantsAttributes = options.mode !== undefined || options.owner !== undefined;
  const bindPath = wantsAttributes
    ? join(dirname(path), `.${basename(path).slice(0, 16)}.${randomBytes(4).toString("hex")}.tmp`)
    : path;
  try {
    checkUnixPath(bindPath);
  } catch {
    throw new EndpointError(
      `unix socket path ${path} leaves no room for the temporary name vmprune binds first to set the socket's mode and owner: use a path a few bytes shorter`,
    );
  }
  try {
    await bind(server, { path: bindPath });
  } catch (error) {
    throw new EndpointError(`cannot listen on unix:${path}: ${errorText(error)}`);
  }
  try {
    if (options.mode !== undefined) chmodSync(bindPath, options.mode);
    if (options.owner) chownSync(bindPath, options.owner.uid ?? -1, options.owner.gid ?? -1);
    if (bindPath !== path) renameSync(bindPath, path);
  } catch (error) {
    // Node unlinks the path it bound (bindPath) when the server closes.
    await closeQuietly(server);
    const what = options.owner ? "set the mode and owner of" : "set the mode of";
    throw new EndpointError(`cannot ${what} unix socket ${path}: ${errorText(error)}`);
  }
  const bound = lstatSync(path);
  server.once("close", () => {
    // Synchronously, so the file is gone before any close callback runs.
    const now = lstatOrNullQuiet(path);
    if (now && now.ino === bound.ino && now.dev === bound.dev) {
      try {
        unlinkSync(path);
      } catch {
        // already gone
      }
    }
  });
}

function lstatOrNullQuiet(path: string): Stats | null {
  try {
    return lstatSync(path);
  } catch {
    return null;
  }
}

/**
 * A server listening on `endpoint` (resolves once listening). A unix socket's stale file is removed, its mode and
 * owner set before it is reachable, and the file removed on close (rules at the top).
 */
export async function listen(endpoint: Endpoint, options: ListenOptions = {}): Promise<Server> {
  const server = createServer({
    allowHalfOpen: options.allowHalfOpen ?? false,
    pauseOnConnect: options.pauseOnConnect ?? false,
    noDelay: options.noDelay ?? false,
  });
  if (isUnixEndpoint(endpoint)) {
    await listenUnix(server, endpoint.path, options);
    return server;
  }
  if (options.mode !== undefined || options.owner !== undefined)
    throw new EndpointError(
      `a socket mode or owner applies to unix sockets only, not to the TCP address ${formatEndpoint(endpoint)}`,
    );
  try {
    await bind(server, { host: endpoint.host, port: endpoint.port });
  } catch (error) {
    throw new EndpointError(`cannot listen on ${formatEndpoint(endpoint)}: ${errorText(error)}`);
  }
  return server;
}

/** Where `server` actually listens (a TCP port 0 resolved to the port the kernel picked). */
export function listeningEndpoint(server: Server, requested: Endpoint): Endpoint {
  if (isUnixEndpoint(requested)) return requested;
  const address = server.address();
  if (!address || typeof address === "string") return requested;
  return { host: address.address, port: address.port };
}

/** A socket connecting to `endpoint`; listen for 'connect' and 'error' as with net.connect. */
export function connect(endpoint: Endpoint, options: ConnectOptions = {}): Socket {
  const allowHalfOpen = options.allowHalfOpen ?? false;
  if (options.tls) {
    const target = isUnixEndpoint(endpoint)
      ? { path: endpoint.path }
      : { host: endpoint.host, port: endpoint.port, noDelay: options.noDelay ?? false };
    // tls.connect hands allowHalfOpen to its TLSSocket (lib/_tls_wrap.js) though @types/node does not list it.
    const halfOpen: ConnectionOptions & { allowHalfOpen: boolean } = {
      ...options.tls,
      ...target,
      allowHalfOpen,
    };
    return tlsConnect(halfOpen);
  }
  if (isUnixEndpoint(endpoint)) return netConnect({ path: endpoint.path, allowHalfOpen });
  return netConnect({
    host: endpoint.host,
    port: endpoint.port,
    allowHalfOpen,
    noDelay: options.noDelay ?? false,
  });
}

/** The counters of a libuv stream handle (TCPWrap, PipeWrap) that {@link bytesToKernel} reads. */
interface HandleCounters {
  bytesWritten: number;
  writeQueueSize: number;
}

function counters(handle: unknown): HandleCounters | undefined {
  if (typeof handle !== "object" || handle === null) return undefined;
  const h = handle as Partial<Record<keyof HandleCounters, unknown>>;
  return typeof h.bytesWritten === "number" && typeof h.writeQueueSize === "number"
    ? (h as HandleCounters)
    : undefined;
}

/**
 * Bytes of `socket`'s writes that have left this process (the kernel took them), byte-exact as the kernel drains
 * the socket: the stream handle's bytesWritten (all handed to libuv) less its writeQueueSize (what libuv still
 * holds). Not `socket.bytesWritten - socket.writableLength`: Node hands its whole queue to libuv as one writev and
 * counts it off only once all of it went out, so that figure moves in steps of the queue's size. With the relay's
 * 64 MiB read-ahead the steps were 64 MB, and a 500 ms window over them read a 120 MB/s link as up to 225 MB/s
 * (measured over the lab's shaped veth; the handle's counters read 120-121). A TLS socket's own handle (TLSWrap)
 * counts the same steps, so for TLS this reads the TCP handle under it (`_parent`): TLS record bytes, the
 * plaintext plus ~0.1% of record framing (and the handshake's few KiB). Falls back to the socket's figure where
 * neither handle has the counters.
 */
export function bytesToKernel(socket: Socket): number {
  const handle = (socket as Socket & { _handle?: { _parent?: unknown } | null })._handle;
  const stream = counters(socket instanceof TLSSocket ? handle?._parent : handle);
  if (stream) return stream.bytesWritten - stream.writeQueueSize;
  return socket.bytesWritten - socket.writableLength;
}

/**
 * Half-closes a socket (end(): what is queued, then EOF), a TLS socket only once the I/O callback running now has
 * returned. Node's TLS socket shuts its TLS session down inside end(): TLSWrap::DoShutdown calls SSL_shutdown a
 * second time, which reads on for the peer's close_notify and discards the application data records that had
 * already arrived but were not yet decrypted. Called from the socket's own 'data' handler, end() so lost the rest
 * of that read: measured with a TLS 1.3 pair, a client ending in its first 'data' got 100 of 200,000 bytes sent
 * back to back (test/unit/transport-half-close.test.ts). In vmprune this was send ending the link while handling
 * receive's last ACK, which lost the LOAD and RETURN frames read with it and left the link's decoder out of step,
 * so receive's EOF was never seen ("receive closed the link before its EOF", issue 12). setImmediate runs after
 * the read callback, whose records are then all delivered.
 */
export function halfClose(socket: Socket): void {
  if (!(socket instanceof TLSSocket)) {
    socket.end();
    return;
  }
  setImmediate(() => {
    if (!socket.destroyed && !socket.writableEnded) socket.end();
  });
}

/**
 * Tears a socket down so that a TCP peer sees a reset, not a clean EOF: QEMU then fails at once instead of taking
 * the end for a finished stream. A unix socket has no reset (Node refuses resetAndDestroy on it): its peer sees
 * EOF, which a QEMU reading a migration stream also takes as a failure, since a complete stream ends with its own
 * EOF section, and a QEMU writing one gets EPIPE.
 */
export function resetSocket(socket: Socket): void {
  if (socket.destroyed) return;
  if (socket.connecting) socket.destroy();
  else {
    try {
      socket.resetAndDestroy();
    } catch {
      // ERR_INVALID_HANDLE_TYPE: not a TCP socket.
    }
  }
  if (!socket.destroyed) socket.destroy();
}

/** A connection's peer for logs: "ADDRESS:PORT" over TCP, "a unix-socket peer" otherwise (it has no address). */
export function describePeer(socket: Socket): string {
  if (socket.remoteAddress === undefined) return "a unix-socket peer";
  return formatEndpoint({ host: socket.remoteAddress, port: socket.remotePort ?? 0 });
}

/**
 * Whether a connected socket's peer runs on this host (in this network namespace): a unix socket, or a TCP peer
 * at an address of this host ({@link addressOnThisHost}). Bytes to such a peer cross no network, only memory.
 */
export function peerOnThisHost(socket: Socket): boolean {
  const remote = socket.remoteAddress;
  if (remote === undefined) return true; // a unix socket (as describePeer)
  return addressOnThisHost(remote, socket.localAddress);
}

/**
 * Whether an IP address is this host's: loopback, the connection's own local address, or an address of one of
 * the interfaces of this network namespace (os.networkInterfaces). IPv4-mapped IPv6 and IPv6 zones are read
 * as the plain address.
 */
export function addressOnThisHost(address: string, localAddress?: string): boolean {
  const plain = (a: string) => {
    const bare = a.split("%")[0] ?? a; // an IPv6 zone ("fe80::1%eth0")
    return bare.startsWith("::ffff:") && isIPv4(bare.slice(7)) ? bare.slice(7) : bare;
  };
  const remote = plain(address);
  if (remote === "::1" || (isIPv4(remote) && remote.startsWith("127."))) return true;
  if (localAddress !== undefined && remote === plain(localAddress)) return true;
  return Object.values(networkInterfaces()).some((list) => list?.some((i) => plain(i.address) === remote));
}
