/**
 * A read-only NBD client: how vmprune reads guest-visible disk blocks through QEMU's own block layer (qcow2 with
 * backing files, Ceph, iSCSI: whatever QEMU opens), from `qemu-nbd`, `qemu-storage-daemon`, or a running QEMU's
 * `block-export-add` (nbd-server.ts, ../qemu/block-export.ts).
 *
 * The protocol is the NBD protocol of NetworkBlockDevice/nbd doc/proto.md (cited below as "proto.md", section
 * names in quotes):
 *
 *   client                                       server
 *     |  <-- NBDMAGIC, IHAVEOPT, u16 handshake flags       "Newstyle negotiation"
 *     |  u32 client flags -->
 *     |  IHAVEOPT, NBD_OPT_GO(name, [INFO_BLOCK_SIZE]) -->  "NBD_OPT_INFO (6) and NBD_OPT_GO (7)"
 *     |  <-- NBD_REP_INFO(EXPORT: size, flags) ... NBD_REP_ACK   (or NBD_REP_ERR_*: the export is refused)
 *     |  (NBD_REP_ERR_UNSUP: fall back to NBD_OPT_EXPORT_NAME, answered by size, flags[, 124 zeroes])
 *     |  NBD_CMD_READ(cookie, offset, length) -->  ...      "Request message", pipelined
 *     |  <-- simple reply(error, cookie)[, data]            "Simple reply message", in any order
 *     |  NBD_CMD_DISC -->                                  "Terminating the transmission phase"
 *
 * Structured replies are not negotiated, so the server must send simple replies only ("Simple reply message":
 * MUST without NBD_OPT_STRUCTURED_REPLY); TLS is not offered (loopback and unix sockets only). Reads are
 * pipelined: any number may be in flight, each matched to its reply by its cookie. Everything the server sends is
 * checked: a wrong magic, an unknown cookie, a reply with an error, a connection that closes or stays silent past
 * the request timeout fail with a StorageError that says what to check; after a protocol error or a timeout the
 * connection is failed as a whole (its byte stream can no longer be trusted to be in step) and every read on it
 * rejects, never hangs.
 */
import type { Socket } from "node:net";
import { type Endpoint, isUnixEndpoint } from "../transport/endpoint.ts";
import { connect } from "../transport/socket.ts";
import { StorageError } from "./errors.ts";

// proto.md "Newstyle negotiation": the server's first 16 bytes, and the prefix of every option the client sends.
/** ASCII "NBDMAGIC" (also the oldstyle INIT_PASSWD). */
const NBD_MAGIC = 0x4e42444d41474943n;
/** ASCII "IHAVEOPT". */
const NBD_IHAVEOPT = 0x49484156454f5054n;
/** proto.md "Oldstyle negotiation": `cliserv_magic`, where a newstyle server sends IHAVEOPT. */
const NBD_CLISERV_MAGIC = 0x00420281861253n;
/** proto.md "Fixed newstyle negotiation": magic of every option reply. */
const NBD_OPT_REPLY_MAGIC = 0x3e889045565a9n;

// proto.md "Values / Handshake phase / Flag fields".
/** Server handshake flag bit 0. */
const NBD_FLAG_FIXED_NEWSTYLE = 1 << 0;
/** Server handshake flag bit 1: the server can omit the 124 zeroes after NBD_OPT_EXPORT_NAME. */
const NBD_FLAG_NO_ZEROES = 1 << 1;
/** Client flag bit 0. */
const NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0;
/** Client flag bit 1 (only if the server set NBD_FLAG_NO_ZEROES). */
const NBD_FLAG_C_NO_ZEROES = 1 << 1;

// proto.md "Transmission flags".
/** bit 0: MUST always be 1. */
const NBD_FLAG_HAS_FLAGS = 1 << 0;
/** bit 1: the export is read-only. */
const NBD_FLAG_READ_ONLY = 1 << 1;
/** bit 8: the server serves several connections consistently. */
const NBD_FLAG_CAN_MULTI_CONN = 1 << 8;

// proto.md "Option types".
const NBD_OPT_EXPORT_NAME = 1;
const NBD_OPT_GO = 7;

// proto.md "Option reply types".
const NBD_REP_ACK = 1;
const NBD_REP_INFO = 3;
/** Error replies have bit 31 set. */
const NBD_REP_FLAG_ERROR = 2 ** 31;
const NBD_REP_ERR_UNSUP = NBD_REP_FLAG_ERROR + 1;
const NBD_REP_ERR_POLICY = NBD_REP_FLAG_ERROR + 2;
const NBD_REP_ERR_INVALID = NBD_REP_FLAG_ERROR + 3;
const NBD_REP_ERR_PLATFORM = NBD_REP_FLAG_ERROR + 4;
const NBD_REP_ERR_TLS_REQD = NBD_REP_FLAG_ERROR + 5;
const NBD_REP_ERR_UNKNOWN = NBD_REP_FLAG_ERROR + 6;
const NBD_REP_ERR_SHUTDOWN = NBD_REP_FLAG_ERROR + 7;
const NBD_REP_ERR_BLOCK_SIZE_REQD = NBD_REP_FLAG_ERROR + 8;
const NBD_REP_ERR_TOO_BIG = NBD_REP_FLAG_ERROR + 9;

const OPTION_ERRORS: Record<number, string> = {
  [NBD_REP_ERR_UNSUP]: "NBD_REP_ERR_UNSUP",
  [NBD_REP_ERR_POLICY]: "NBD_REP_ERR_POLICY (refused by the server's policy)",
  [NBD_REP_ERR_INVALID]: "NBD_REP_ERR_INVALID",
  [NBD_REP_ERR_PLATFORM]: "NBD_REP_ERR_PLATFORM",
  [NBD_REP_ERR_TLS_REQD]: "NBD_REP_ERR_TLS_REQD (the server requires TLS, which vmprune does not offer)",
  [NBD_REP_ERR_UNKNOWN]: "NBD_REP_ERR_UNKNOWN (no such export)",
  [NBD_REP_ERR_SHUTDOWN]: "NBD_REP_ERR_SHUTDOWN (the server is shutting down)",
  [NBD_REP_ERR_BLOCK_SIZE_REQD]: "NBD_REP_ERR_BLOCK_SIZE_REQD",
  [NBD_REP_ERR_TOO_BIG]: "NBD_REP_ERR_TOO_BIG",
};

// proto.md "NBD_REP_INFO (3)": information types.
const NBD_INFO_EXPORT = 0;
const NBD_INFO_BLOCK_SIZE = 3;
/** NBD_INFO_EXPORT's reply length: u16 type, u64 size, u16 flags. */
const INFO_EXPORT_BYTES = 12;
/** NBD_INFO_BLOCK_SIZE's reply length: u16 type, u32 minimum, u32 preferred, u32 maximum payload. */
const INFO_BLOCK_SIZE_BYTES = 14;

// proto.md "Request message" / "Simple reply message" / "Structured reply chunk message".
const NBD_REQUEST_MAGIC = 0x25609513;
const NBD_SIMPLE_REPLY_MAGIC = 0x67446698;
const NBD_STRUCTURED_REPLY_MAGIC = 0x668e33ef;
/** u32 magic, u16 flags, u16 type, u64 cookie, u64 offset, u32 length. */
const REQUEST_BYTES = 28;
/** u32 magic, u32 error, u64 cookie. */
const SIMPLE_REPLY_BYTES = 16;

// proto.md "Request types".
const NBD_CMD_READ = 0;
const NBD_CMD_DISC = 2;

/** proto.md "Error values" (the numbers are the Linux errno values of the same names). */
const NBD_ERRORS: Record<number, string> = {
  1: "NBD_EPERM (operation not permitted)",
  5: "NBD_EIO (input/output error)",
  12: "NBD_ENOMEM (cannot allocate memory)",
  22: "NBD_EINVAL (invalid argument)",
  28: "NBD_ENOSPC (no space left on device)",
  75: "NBD_EOVERFLOW (value too large)",
  95: "NBD_ENOTSUP (operation not supported)",
  108: "NBD_ESHUTDOWN (the server is shutting down)",
};

/**
 * proto.md "Size constraints": without NBD_INFO_BLOCK_SIZE, "a server SHOULD support a default minimum block size
 * of 1, a preferred block size of 2^12 (4,096), and a maximum payload size that is at least 2^25".
 */
const DEFAULT_MIN_BLOCK_BYTES = 1;
const DEFAULT_PREFERRED_BLOCK_BYTES = 4096;
const DEFAULT_MAX_PAYLOAD_BYTES = 2 ** 25;
/** proto.md "Conventions": strings MUST be no longer than 4096 bytes; an option reply longer than this is junk. */
const MAX_OPTION_REPLY_BYTES = 64 * 1024;

export const DEFAULT_NBD_CONNECT_TIMEOUT_MS = 10_000;
export const DEFAULT_NBD_REQUEST_TIMEOUT_MS = 30_000;

/** Where an NBD export is: the server's socket and the export's name ("" is the default export). */
export interface NbdAddress {
  server: Endpoint;
  exportName: string;
}

export interface NbdClientOptions {
  /** Connecting plus the handshake (default 10 s). */
  connectTimeoutMs?: number;
  /** A read with no reply for this long fails the connection (default 30 s). */
  requestTimeoutMs?: number;
}

/** What the handshake told about the export. */
export interface NbdExportInfo {
  sizeBytes: number;
  /** Transmission flags as sent (proto.md "Transmission flags"). */
  transmissionFlags: number;
  readOnly: boolean;
  canMultiConn: boolean;
  /** Requests must be aligned to this (offset and length). */
  minBlockBytes: number;
  preferredBlockBytes: number;
  /** The longest read the server accepts. */
  maxPayloadBytes: number;
  /** "go" (NBD_OPT_GO) or "export-name" (the fallback of old servers). */
  negotiatedWith: "go" | "export-name";
}

/**
 * The NBD URI forms of NetworkBlockDevice/nbd doc/uri.md that need no TLS: `nbd+unix:///EXPORT?socket=PATH` and
 * `nbd://HOST[:PORT]/EXPORT` (port 10809 by default, the IANA port of proto.md "Newstyle negotiation").
 */
export function parseNbdUri(text: string): NbdAddress {
  let url: URL;
  try {
    url = new URL(text);
  } catch {
    throw new StorageError(
      `${JSON.stringify(text)} is not an NBD URI: give nbd+unix:///EXPORT?socket=/PATH or nbd://HOST:PORT/EXPORT`,
    );
  }
  const exportName = decodeURIComponent(url.pathname.replace(/^\//, ""));
  if (url.protocol === "nbd+unix:") {
    const path = url.searchParams.get("socket");
    if (url.host !== "" || !path)
      throw new StorageError(
        `${JSON.stringify(text)}: an nbd+unix URI has no host and names its socket: nbd+unix:///EXPORT?socket=/PATH`,
      );
    return { server: { path }, exportName };
  }
  if (url.protocol === "nbd:") {
    if (url.hostname === "")
      throw new StorageError(`${JSON.stringify(text)}: an nbd URI needs a host: nbd://HOST:PORT/EXPORT`);
    const host = url.hostname.replace(/^\[(.*)\]$/, "$1");
    return { server: { host, port: url.port === "" ? 10809 : Number(url.port) }, exportName };
  }
  throw new StorageError(
    `${JSON.stringify(text)}: vmprune reads NBD over nbd+unix:// or nbd:// (no TLS: nbds:// is not supported)`,
  );
}

/** The address as an NBD URI (for logs, errors, and qemu-io / qemu-img command lines). */
export function formatNbdUri(address: NbdAddress): string {
  const name = encodeURIComponent(address.exportName);
  if (isUnixEndpoint(address.server)) return `nbd+unix:///${name}?socket=${address.server.path}`;
  const host = address.server.host.includes(":") ? `[${address.server.host}]` : address.server.host;
  return `nbd://${host}:${address.server.port}/${name}`;
}

interface PendingRead {
  offset: number;
  length: number;
  resolve: (data: Buffer) => void;
  reject: (error: Error) => void;
  timer: NodeJS.Timeout;
}

/** Bytes from the socket, consumed in order, waited for during the handshake. */
class Incoming {
  #chunks: Buffer[] = [];
  #length = 0;
  #waiter: (() => void) | undefined;
  #ended: Error | undefined;

  get length(): number {
    return this.#length;
  }

  push(chunk: Buffer): void {
    this.#chunks.push(chunk);
    this.#length += chunk.length;
    this.#wake();
  }

  end(error: Error): void {
    this.#ended ??= error;
    this.#wake();
  }

  /** Exactly `n` bytes, once they have arrived. */
  async take(n: number): Promise<Buffer> {
    while (this.#length < n) {
      if (this.#ended) throw this.#ended;
      await new Promise<void>((resolve) => {
        this.#waiter = resolve;
      });
    }
    return this.takeNow(n);
  }

  /** Exactly `n` bytes, which must have arrived. */
  takeNow(n: number): Buffer {
    const first = this.#chunks[0];
    let out: Buffer;
    if (first && first.length >= n) {
      out = first.subarray(0, n);
      if (first.length === n) this.#chunks.shift();
      else this.#chunks[0] = first.subarray(n);
    } else {
      const all = Buffer.concat(this.#chunks);
      out = all.subarray(0, n);
      this.#chunks = all.length > n ? [all.subarray(n)] : [];
    }
    this.#length -= n;
    return out;
  }

  /** Reads `n` bytes without consuming them (n <= length). */
  peek(n: number): Buffer {
    const first = this.#chunks[0];
    if (first && first.length >= n) return first.subarray(0, n);
    const all = Buffer.concat(this.#chunks);
    this.#chunks = [all];
    return all.subarray(0, n);
  }

  #wake(): void {
    const waiter = this.#waiter;
    this.#waiter = undefined;
    waiter?.();
  }
}

function u64(buffer: Buffer, offset: number, what: string): number {
  const value = buffer.readBigUInt64BE(offset);
  if (value > BigInt(Number.MAX_SAFE_INTEGER))
    throw new StorageError(
      `the NBD server sent ${what} ${value}, beyond 2^53: it is not an export vmprune can read`,
    );
  return Number(value);
}

/** One connection to one export. */
export class NbdClient {
  readonly #socket: Socket;
  readonly #incoming: Incoming;
  readonly #pending = new Map<number, PendingRead>();
  readonly #requestTimeoutMs: number;
  #nextCookie = 1;
  #failure: StorageError | undefined;
  #closing = false;
  #closed: Promise<void>;
  /** Reply being received: its header was read, its data has not fully arrived. */
  #current: PendingRead | undefined;
  #currentCookie = 0;
  /** close() waits for the reads in flight: called when the last one settles. */
  #onIdle: (() => void) | undefined;
  /** Requests made in this turn of the event loop, written together (one syscall for a burst of reads). */
  #outgoing: Buffer[] = [];

  private constructor(
    readonly address: NbdAddress,
    readonly info: NbdExportInfo,
    socket: Socket,
    incoming: Incoming,
    requestTimeoutMs: number,
  ) {
    this.#socket = socket;
    this.#incoming = incoming;
    this.#requestTimeoutMs = requestTimeoutMs;
    this.#closed = new Promise((resolve) => {
      if (socket.destroyed) resolve();
      else socket.once("close", () => resolve());
    });
    this.#receive(); // bytes that came with the end of the handshake
  }

  /** Connects and negotiates the export; rejects with a StorageError saying what the server refused. */
  static async connect(address: NbdAddress, options: NbdClientOptions = {}): Promise<NbdClient> {
    const where = formatNbdUri(address);
    const timeoutMs = options.connectTimeoutMs ?? DEFAULT_NBD_CONNECT_TIMEOUT_MS;
    const socket = connect(address.server, { noDelay: true });
    const incoming = new Incoming();
    const onData = (chunk: Buffer) => incoming.push(chunk);
    const onError = (error: Error) =>
      incoming.end(
        new StorageError(
          `cannot reach the NBD server of ${where} (${error.message}): is qemu-nbd / the QEMU export running there?`,
          { cause: error },
        ),
      );
    const onClose = () =>
      incoming.end(
        new StorageError(
          `the NBD server of ${where} closed the connection during the handshake: is the export name right, and ` +
            `is it an NBD server at all?`,
        ),
      );
    socket.on("data", onData);
    socket.on("error", onError);
    socket.on("close", onClose);
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(
        () =>
          reject(
            new StorageError(
              `no NBD handshake with ${where} within ${timeoutMs} ms: the server does not answer as an NBD server`,
            ),
          ),
        timeoutMs,
      );
    });
    try {
      const info = await Promise.race([handshake(socket, incoming, address.exportName, where), timeout]);
      socket.off("data", onData);
      socket.off("close", onClose);
      socket.off("error", onError);
      const client = new NbdClient(
        address,
        info,
        socket,
        incoming,
        options.requestTimeoutMs ?? DEFAULT_NBD_REQUEST_TIMEOUT_MS,
      );
      socket.on("data", (chunk: Buffer) => {
        incoming.push(chunk);
        client.#receive();
      });
      socket.on("error", (error) =>
        client.#fail(`the connection to the NBD server of ${where} failed (${error.message})`),
      );
      socket.on("close", () => client.#fail(`the NBD server of ${where} closed the connection`));
      return client;
    } catch (error) {
      socket.destroy();
      throw error instanceof StorageError
        ? error
        : new StorageError(`the NBD handshake with ${where} failed: ${(error as Error).message}`, {
            cause: error,
          });
    } finally {
      clearTimeout(timer);
    }
  }

  /** Reads in flight. */
  get inFlight(): number {
    return this.#pending.size;
  }

  /**
   * `length` bytes at `offset`, as the export holds them. The range must lie inside the export, be aligned to
   * info.minBlockBytes and be at most info.maxPayloadBytes long (NbdDevice splits and aligns): a range that is not
   * is refused here, before anything is sent.
   */
  read(offset: number, length: number): Promise<Buffer> {
    if (this.#failure) return Promise.reject(this.#failure);
    if (this.#closing)
      return Promise.reject(
        new StorageError(`the NBD connection to ${formatNbdUri(this.address)} is closed`),
      );
    const where = formatNbdUri(this.address);
    const { sizeBytes, minBlockBytes, maxPayloadBytes } = this.info;
    if (!Number.isSafeInteger(offset) || offset < 0 || !Number.isSafeInteger(length) || length <= 0)
      return Promise.reject(
        new StorageError(`cannot read ${length} bytes at ${offset} of ${where}: not a byte range`),
      );
    if (offset + length > sizeBytes)
      return Promise.reject(
        new StorageError(
          `cannot read bytes ${offset}..${offset + length} of ${where}: the export has ${sizeBytes} bytes`,
        ),
      );
    if (length > maxPayloadBytes || offset % minBlockBytes !== 0 || length % minBlockBytes !== 0)
      return Promise.reject(
        new StorageError(
          `cannot read ${length} bytes at ${offset} of ${where} in one request: the server takes reads aligned to ` +
            `${minBlockBytes} bytes and at most ${maxPayloadBytes} long (read it through NbdDevice, which splits)`,
        ),
      );
    const cookie = this.#nextCookie++;
    return new Promise<Buffer>((resolve, reject) => {
      const timer = setTimeout(
        () =>
          this.#fail(
            `the NBD server of ${where} did not answer a read of ${length} bytes at ${offset} within ` +
              `${this.#requestTimeoutMs} ms (it hangs, or its storage does)`,
          ),
        this.#requestTimeoutMs,
      );
      this.#pending.set(cookie, { offset, length, resolve, reject, timer });
      const request = Buffer.alloc(REQUEST_BYTES);
      request.writeUInt32BE(NBD_REQUEST_MAGIC, 0);
      request.writeUInt16BE(0, 4); // command flags: none
      request.writeUInt16BE(NBD_CMD_READ, 6);
      request.writeBigUInt64BE(BigInt(cookie), 8);
      request.writeBigUInt64BE(BigInt(offset), 16);
      request.writeUInt32BE(length, 24);
      if (this.#outgoing.push(request) === 1) queueMicrotask(() => this.#sendRequests());
    });
  }

  #sendRequests(): void {
    const requests = this.#outgoing;
    this.#outgoing = [];
    if (this.#failure === undefined && !this.#socket.destroyed)
      this.#socket.write(requests.length === 1 ? (requests[0] as Buffer) : Buffer.concat(requests));
  }

  /**
   * Ends the session: NBD_CMD_DISC once no read is in flight (proto.md "Terminating the transmission phase":
   * the client SHOULD wait for inflight requests first), then the socket. Idempotent.
   */
  async close(): Promise<void> {
    if (!this.#closing) {
      this.#closing = true;
      if (!this.#failure && this.#pending.size > 0)
        await new Promise<void>((resolve) => {
          this.#onIdle = resolve;
        });
      if (!this.#socket.destroyed) {
        const disc = Buffer.alloc(REQUEST_BYTES);
        disc.writeUInt32BE(NBD_REQUEST_MAGIC, 0);
        disc.writeUInt16BE(NBD_CMD_DISC, 6);
        disc.writeBigUInt64BE(BigInt(this.#nextCookie++), 8);
        this.#socket.end(disc);
        const timer = setTimeout(() => this.#socket.destroy(), 1000);
        await this.#closed;
        clearTimeout(timer);
      }
    }
    await this.#closed;
  }

  /** Parses whatever replies have arrived. */
  #receive(): void {
    const incoming = this.#incoming;
    try {
      while (!this.#failure) {
        if (this.#current) {
          const current = this.#current;
          if (incoming.length < current.length) return;
          const data = Buffer.from(incoming.takeNow(current.length)); // its own memory, not a view of a chunk
          this.#current = undefined;
          this.#settle(this.#currentCookie, current, data);
          continue;
        }
        if (incoming.length < 4) return;
        const magic = incoming.peek(4).readUInt32BE(0);
        if (magic === NBD_STRUCTURED_REPLY_MAGIC)
          throw new StorageError(
            `the NBD server of ${formatNbdUri(this.address)} sent a structured reply that was not negotiated ` +
              `(proto.md: it MUST use simple replies): it does not follow the NBD protocol`,
          );
        if (magic !== NBD_SIMPLE_REPLY_MAGIC)
          throw new StorageError(
            `the NBD server of ${formatNbdUri(this.address)} sent 0x${magic.toString(16)} where a reply's magic ` +
              `0x${NBD_SIMPLE_REPLY_MAGIC.toString(16)} belongs: the connection is out of step`,
          );
        if (incoming.length < SIMPLE_REPLY_BYTES) return;
        const header = incoming.takeNow(SIMPLE_REPLY_BYTES);
        const error = header.readUInt32BE(4);
        const cookieBig = header.readBigUInt64BE(8);
        const cookie = cookieBig < BigInt(this.#nextCookie) ? Number(cookieBig) : -1;
        const pending = this.#pending.get(cookie);
        if (!pending)
          throw new StorageError(
            `the NBD server of ${formatNbdUri(this.address)} answered cookie ${cookieBig}, which no read in ` +
              `flight has: the connection is out of step`,
          );
        if (error !== 0) {
          // proto.md "Simple reply message": data follows only if error is zero.
          this.#pending.delete(cookie);
          clearTimeout(pending.timer);
          pending.reject(
            new StorageError(
              `the NBD server of ${formatNbdUri(this.address)} failed a read of ${pending.length} bytes at ` +
                `${pending.offset}: ${NBD_ERRORS[error] ?? `error ${error}`}`,
            ),
          );
          this.#checkIdle();
          continue;
        }
        this.#current = pending;
        this.#currentCookie = cookie;
      }
    } catch (error) {
      this.#fail((error as Error).message);
    }
  }

  #settle(cookie: number, pending: PendingRead, data: Buffer): void {
    this.#pending.delete(cookie);
    clearTimeout(pending.timer);
    pending.resolve(data);
    this.#checkIdle();
  }

  #checkIdle(): void {
    if (this.#pending.size > 0 || !this.#onIdle) return;
    const onIdle = this.#onIdle;
    this.#onIdle = undefined;
    onIdle();
  }

  /** The connection can no longer be used: every read in flight, and every later one, rejects with `why`. */
  #fail(why: string): void {
    if (this.#failure) return;
    const closingCleanly = this.#closing && this.#pending.size === 0;
    this.#failure = new StorageError(
      closingCleanly ? `the NBD connection to ${formatNbdUri(this.address)} is closed` : `${why}: reads fail`,
    );
    for (const pending of this.#pending.values()) {
      clearTimeout(pending.timer);
      pending.reject(this.#failure);
    }
    this.#pending.clear();
    this.#current = undefined;
    this.#checkIdle();
    this.#socket.destroy();
  }
}

/** Fixed newstyle negotiation with NBD_OPT_GO, NBD_OPT_EXPORT_NAME for servers without it. */
async function handshake(
  socket: Socket,
  incoming: Incoming,
  exportName: string,
  where: string,
): Promise<NbdExportInfo> {
  const greeting = await incoming.take(18);
  const notNbd = (why: string) =>
    new StorageError(`${where} is not an NBD server speaking the newstyle handshake: ${why}`);
  if (greeting.readBigUInt64BE(0) !== NBD_MAGIC)
    throw notNbd(`it sent ${greeting.subarray(0, 8).toString("hex")} instead of NBDMAGIC`);
  const second = greeting.readBigUInt64BE(8);
  if (second === NBD_CLISERV_MAGIC)
    throw notNbd(
      "it offers the oldstyle handshake (withdrawn from the protocol), which vmprune does not speak",
    );
  if (second !== NBD_IHAVEOPT)
    throw notNbd(`it sent ${greeting.subarray(8, 16).toString("hex")} instead of IHAVEOPT`);
  const serverFlags = greeting.readUInt16BE(16);
  const fixed = (serverFlags & NBD_FLAG_FIXED_NEWSTYLE) !== 0;
  const noZeroes = (serverFlags & NBD_FLAG_NO_ZEROES) !== 0;
  const clientFlags = Buffer.alloc(4);
  clientFlags.writeUInt32BE((fixed ? NBD_FLAG_C_FIXED_NEWSTYLE : 0) | (noZeroes ? NBD_FLAG_C_NO_ZEROES : 0));
  socket.write(clientFlags);
  const name = Buffer.from(exportName, "utf8");
  if (name.length > 4096)
    throw new StorageError(`the export name for ${where} is longer than NBD's 4096 bytes`);

  // Non-fixed newstyle knows only NBD_OPT_EXPORT_NAME.
  if (fixed) {
    const info = await optGo(socket, incoming, name, where);
    if (info) return info;
  }
  socket.write(option(NBD_OPT_EXPORT_NAME, name));
  // proto.md "Newstyle negotiation": size, transmission flags, 124 zeroes unless NBD_FLAG_C_NO_ZEROES; a server
  // unwilling to serve the export closes the connection (the caller's 'close' turns that into an error).
  const reply = await incoming.take(10 + (noZeroes ? 0 : 124));
  const flags = reply.readUInt16BE(8);
  return exportInfo(u64(reply, 0, "an export size"), flags, undefined, "export-name", where);
}

function option(type: number, data: Buffer): Buffer {
  const header = Buffer.alloc(16);
  header.writeBigUInt64BE(NBD_IHAVEOPT, 0);
  header.writeUInt32BE(type, 8);
  header.writeUInt32BE(data.length, 12);
  return Buffer.concat([header, data]);
}

/** NBD_OPT_GO; null if the server does not know it (NBD_REP_ERR_UNSUP: use NBD_OPT_EXPORT_NAME). */
async function optGo(
  socket: Socket,
  incoming: Incoming,
  name: Buffer,
  where: string,
): Promise<NbdExportInfo | null> {
  // u32 name length, name, u16 number of info requests, u16 each (proto.md "NBD_OPT_INFO (6) and NBD_OPT_GO (7)").
  const data = Buffer.alloc(4 + name.length + 2 + 2);
  data.writeUInt32BE(name.length, 0);
  name.copy(data, 4);
  data.writeUInt16BE(1, 4 + name.length);
  data.writeUInt16BE(NBD_INFO_BLOCK_SIZE, 6 + name.length);
  socket.write(option(NBD_OPT_GO, data));
  let export_: { sizeBytes: number; flags: number } | undefined;
  let blockSizes: { min: number; preferred: number; max: number } | undefined;
  for (;;) {
    const header = await incoming.take(20);
    if (header.readBigUInt64BE(0) !== NBD_OPT_REPLY_MAGIC)
      throw new StorageError(
        `${where} sent ${header.subarray(0, 8).toString("hex")} where an NBD option reply's magic belongs: it is ` +
          `not an NBD server, or does not follow the protocol`,
      );
    const replyOption = header.readUInt32BE(8);
    const type = header.readUInt32BE(12);
    const length = header.readUInt32BE(16);
    if (replyOption !== NBD_OPT_GO)
      throw new StorageError(
        `${where} answered option ${replyOption} to NBD_OPT_GO: it does not follow the protocol`,
      );
    if (length > MAX_OPTION_REPLY_BYTES)
      throw new StorageError(
        `${where} announced a ${length}-byte option reply: it does not follow the NBD protocol`,
      );
    const payload = length > 0 ? await incoming.take(length) : Buffer.alloc(0);
    if (type === NBD_REP_ACK) {
      if (!export_)
        throw new StorageError(
          `${where} accepted the export without NBD_INFO_EXPORT (proto.md: it MUST send it)`,
        );
      return exportInfo(export_.sizeBytes, export_.flags, blockSizes, "go", where);
    }
    if (type === NBD_REP_INFO) {
      if (payload.length < 2)
        throw new StorageError(`${where} sent an NBD_REP_INFO of ${payload.length} bytes`);
      const infoType = payload.readUInt16BE(0);
      if (infoType === NBD_INFO_EXPORT) {
        if (payload.length !== INFO_EXPORT_BYTES)
          throw new StorageError(`${where} sent an NBD_INFO_EXPORT of ${payload.length} bytes, not 12`);
        export_ = { sizeBytes: u64(payload, 2, "an export size"), flags: payload.readUInt16BE(10) };
      } else if (infoType === NBD_INFO_BLOCK_SIZE) {
        if (payload.length !== INFO_BLOCK_SIZE_BYTES)
          throw new StorageError(`${where} sent an NBD_INFO_BLOCK_SIZE of ${payload.length} bytes, not 14`);
        blockSizes = {
          min: payload.readUInt32BE(2),
          preferred: payload.readUInt32BE(6),
          max: payload.readUInt32BE(10),
        };
      }
      // proto.md: "The client MUST ignore information replies it does not understand."
      continue;
    }
    if (type === NBD_REP_ERR_UNSUP) return null;
    if (type >= NBD_REP_FLAG_ERROR) {
      const message = payload.length > 0 ? `: "${payload.toString("utf8")}"` : "";
      const what = OPTION_ERRORS[type] ?? `error 0x${type.toString(16)}`;
      throw new StorageError(
        `the NBD server of ${where} refused the export: ${what}${message}. Check the export name ` +
          `(qemu-nbd -x NAME, block-export-add's name) and that the export is running`,
      );
    }
    throw new StorageError(
      `${where} sent option reply type ${type} to NBD_OPT_GO, which is not an answer to it`,
    );
  }
}

function exportInfo(
  sizeBytes: number,
  flags: number,
  blockSizes: { min: number; preferred: number; max: number } | undefined,
  negotiatedWith: NbdExportInfo["negotiatedWith"],
  where: string,
): NbdExportInfo {
  if ((flags & NBD_FLAG_HAS_FLAGS) === 0)
    throw new StorageError(
      `${where} sent transmission flags without NBD_FLAG_HAS_FLAGS (proto.md: MUST be 1)`,
    );
  const min = blockSizes?.min ?? DEFAULT_MIN_BLOCK_BYTES;
  const max = blockSizes?.max ?? DEFAULT_MAX_PAYLOAD_BYTES;
  // proto.md "NBD_INFO_BLOCK_SIZE": the minimum is a power of 2 from 1 to 64 KiB; the maximum a multiple of it.
  if (!Number.isInteger(Math.log2(min)) || min > 65536 || max < min || max % min !== 0)
    throw new StorageError(`${where} announced unusable block sizes: minimum ${min}, maximum payload ${max}`);
  return {
    sizeBytes,
    transmissionFlags: flags,
    readOnly: (flags & NBD_FLAG_READ_ONLY) !== 0,
    canMultiConn: (flags & NBD_FLAG_CAN_MULTI_CONN) !== 0,
    minBlockBytes: min,
    preferredBlockBytes: blockSizes?.preferred ?? DEFAULT_PREFERRED_BLOCK_BYTES,
    maxPayloadBytes: max,
    negotiatedWith,
  };
}
