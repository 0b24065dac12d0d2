/**
 * The link protocol between `vmprune send` (source host, the TCP client) and `vmprune receive` (destination host,
 * the TCP server): one link connection per QEMU migration connection. It carries QEMU's stream source →
 * destination, with clean page-cache pages replaced by references to blocks of the shared disk, and QEMU's return
 * path destination → source on the same connection.
 *
 * The connection is TLS 1.3 (TLS-PSK from the key file, or mutual x509: ../transport/tls.ts) unless plaintext was
 * asked for by name; everything below runs inside the tunnel and only reads and writes bytes. The HMAC handshake
 * stays: it carries the versioning and capabilities, and keeps the key file a check of its own (with
 * certificates and no key file, its key is exported from the TLS session: link/handshake.ts handshakeKey).
 *
 * ## Framing
 * Every message is one frame: `u8 type, be32 length, payload[length]`. `length` is at most
 * {@link MAX_PAYLOAD_BYTES} (1 MiB), and each type has its own tighter bounds, checked before any payload is
 * buffered. Integers are big-endian; u64 fields must be ≤ 2^53 - 1 (JavaScript safe integers).
 *
 * ## Session
 * ```
 *  send (client)                                            receive (server)
 *   │ HELLO(magic, 1.0, role=send, caps, window=0, nonceC) ──▶ │  checks magic, major, role; else closes
 *   │ ◀── HELLO(magic, 1.0, role=receive, caps, window, nonceS) │
 *   │ AUTH(HMAC(psk, "vmprune-link send" ‖ T))            ──▶ │  verifies; wrong MAC: closes, sends nothing
 *   │ ◀── AUTH(HMAC(psk, "vmprune-link receive" ‖ T))         │
 *   │ READY                                               ──▶ │  (send verified receive's MAC first)
 *   │ ═════════ stream: DATA, REF, PAGE_DATA, EOF ═════════▶ │ ──▶ destination QEMU (DATA bytes; REF → PAGE record)
 *   │ ◀════════ RETURN, NACK, ACK, LOAD, EOF ════════════════ │ ◀── destination QEMU's return path
 *   │ ERROR (either side, any time after READY), then the sender of ERROR destroys the socket
 * ```
 * `T` (the transcript) is `be32 len(helloC) ‖ helloC ‖ be32 len(helloS) ‖ helloS` over the two HELLO payloads
 * exactly as they crossed the wire, so the MACs bind both nonces, both capability lists and both versions.
 * Each side proves the key only after seeing the other's fresh nonce; receive proves it only after send did, so a
 * peer without the key learns no MAC. Any failure in the handshake (bad magic, major version mismatch, wrong
 * role, wrong MAC, a message out of order, silence past the timeout) makes the side that sees it destroy the
 * socket without sending anything more; no QEMU byte crosses a link before READY.
 *
 * ## Versioning
 * `major` must be equal on both sides (else the connection is refused). `minor` may differ: the session uses the
 * capabilities both HELLOs list (unknown names are ignored), so a newer minor only adds capabilities, or fields
 * appended at the end of HELLO, which older readers skip. A change an older peer could misread needs a new major.
 *
 * ## Messages
 * | type | wire | direction | payload |
 * |---|---|---|---|
 * | HELLO | 0x01 | both, first | magic[8] "vmprlink", be16 major, be16 minor, u8 role, be32 windowBytes, nonce[32], u8 n, n × (u8 len, ascii name); from 1.1, send only and optional: migration[16], be16 channel, u8 len, ascii target ({@link ChannelClaim}) |
 * | AUTH | 0x02 | both, second | hmac[32] |
 * | READY | 0x03 | send → receive, third | (empty) |
 * | DATA | 0x10 | send → receive | QEMU stream bytes, forwarded as they are |
 * | ZEROS | 0x14 | send → receive | be32 pages (1..{@link MAX_ZERO_PAGES}): that many 4096-byte pages of zeros, written where they stand: free pages inside a multifd packet for a destination that reads no zero list (1.3, capability {@link CAPABILITY.ZERO_FILL}) |
 * | REF | 0x11 | send → receive | be64 refId, be64 blockNumber, sha256[32], pageHeader (8..264 bytes) |
 * | PAGE_DATA | 0x12 | send → receive | be64 refId, page[4096]: the answer to a NACK |
 * | REF_FS | 0x13 | send → receive | be64 refId, uuid[16], be64 blockNumber, sha256[32], pageHeader (8..264 bytes, or none: 1.3): a REF into the filesystem with that UUID, blockNumber in 512-byte sectors from the filesystem's first byte (1.2, capability {@link CAPABILITY.REF_FS_SHA256}) |
 * | RETURN | 0x20 | receive → send | QEMU return-path bytes, forwarded as they are |
 * | NACK | 0x21 | receive → send | be64 refId, u8 reason ({@link NACK_REASON}) |
 * | ACK | 0x22 | receive → send | be64 refId: every REF up to this id is settled |
 * | LOAD | 0x23 | receive → send | be16 busyPermille, be32 destinationQueuedBytes: how busy receive is (1.4, capability {@link CAPABILITY.LOAD_REPORT}) |
 * | EOF | 0x30 | both | (empty): no more QEMU bytes in this direction (half-close) |
 * | ERROR | 0x31 | both | be16 code ({@link ERROR_CODE}), UTF-8 message (≤ 4 KiB) |
 *
 * ## Channel claims (1.1)
 * send's HELLO names the migration this connection belongs to (16 random bytes, the same on all of one send's
 * connections), the connection's place among them (0 = QEMU's main channel, then multifd channels in the order
 * QEMU opened them), and the destination it wants (empty: receive's one destination). A receive serving many
 * migrations (migrate/receive-service.ts) reads them only after AUTH, so only a peer with the key can claim a
 * destination, and it connects only to destinations its operator allowed. A 1.0 receive skips them.
 *
 * ## Filesystem references (1.2)
 * send finds a clean cache page's place from the guest kernel's own metadata (storage/page-locator.ts): the
 * filesystem (its UUID, as the guest's superblock has it) and the page's offset in it. REF_FS names exactly that,
 * so receive needs no agreement with send on disk names or partition layouts: it finds the filesystem on the disks
 * it was given (storage/filesystem-probe.ts). A UUID it does not find, or finds twice, is a NACK. Everything else
 * (rules 1-7, the hash check) is as for REF.
 *
 * ## References inside multifd packets (1.3, capability {@link CAPABILITY.REF_FS_BARE})
 * With multifd on, QEMU sends pages in packets on the other channels: a header with the page offsets, then the
 * pages' bytes. A clean cache page there is a REF_FS whose pageHeader is empty: receive writes the 4096 bytes it
 * reads in the page's place, so the packet QEMU gets is the one QEMU sent. Only a receive that offered the
 * capability gets them; everything else (rules 1-7, the hash check, NACK and PAGE_DATA) is as for any REF_FS.
 *
 * ## Load reports (1.4, capability {@link CAPABILITY.LOAD_REPORT})
 * A reference saves the link 4096 bytes and costs both ends CPU (hashing, a disk read): it pays only while the
 * link is what holds the migration back. send sees bytes queue for the link, but a queue means only that
 * something downstream is slower: the network, or receive itself (its CPU, or a destination QEMU slow to read).
 * So receive tells: every {@link LOAD_REPORT_INTERVAL_MS} while the stream flows, a LOAD with the share of that
 * interval its event loop was busy (per mille) and the bytes waiting in it for the destination QEMU on this
 * connection. LOAD settles nothing and asks for no answer; send only weighs it (migrate/link-send.ts). Only a
 * send that listed the capability gets LOADs (an older one would take it for a protocol error).
 *
 * ## Stream rules (capability {@link CAPABILITY.REF_SHA256}; without it send sends only DATA and EOF)
 * 1. Order is sacred: receive writes DATA bytes, and for each REF `pageHeader` followed by the block's 4096
 *    bytes, to the destination QEMU in exactly the order of the frames. `pageHeader` is the PAGE record's be64
 *    offset|flags and optional idlen+idstr as QEMU wrote them; together with the page it is the record QEMU sent.
 * 2. refIds increase strictly (send numbers them 1, 2, 3, ...). receive reads block `blockNumber` (4096 bytes at
 *    blockNumber × 512 (disk sectors) of the shared disk) and checks its SHA-256 against the REF's. On any doubt (mismatch,
 *    read error, out of range) it sends NACK(refId) at once and writes nothing past that REF until PAGE_DATA for it
 *    arrives; send answers every NACK with PAGE_DATA holding the page as guest memory holds it now (later guest
 *    writes are re-sent by QEMU's dirty tracking anyway). PAGE_DATA may follow send's EOF.
 * 3. Window: receive's HELLO announces `windowBytes`. send keeps count of the output bytes (DATA length; for a REF,
 *    pageHeader + 4096) it sent from the oldest REF not yet covered by an ACK onwards, and stops reading QEMU's
 *    stream while that count is ≥ windowBytes. receive fails the link with `window-exceeded` if it would hold more
 *    than windowBytes + {@link WINDOW_SLACK_BYTES} (one read's worth) behind an unsettled REF. So receive never
 *    has to stop reading the link while it waits for PAGE_DATA, which would deadlock: PAGE_DATA travels behind
 *    the DATA that filled the buffer. Backpressure from the destination QEMU pauses reading as usual, since it
 *    does not depend on send.
 * 4. ACK(n) means every REF with refId ≤ n was written to QEMU (resolved from disk or from PAGE_DATA): send may
 *    forget them. receive sends one ACK after each batch of frames that settled at least one REF, so send's
 *    window never waits longer than a round trip.
 * 5. RETURN, NACK and ACK are sent the moment they exist, in the order they arise; send forwards RETURN to the
 *    source QEMU at once and must keep reading the link even when the source QEMU is slow to read (the return
 *    path is small), since NACKs travel the same way.
 * 6. Half-closes: source QEMU's EOF → send writes EOF (after its last stream frame); receive ends the destination
 *    QEMU's socket once everything before EOF was written. Destination QEMU's EOF → receive writes EOF; send ends
 *    the source QEMU's socket. After EOF a side may still send control messages (NACK/ACK, PAGE_DATA, ERROR);
 *    it half-closes TCP once it has nothing more to send (send: after its EOF and an ACK of its last REF).
 * 7. ERROR aborts the migration: whoever sends or receives it resets its QEMU connection (so the destination QEMU
 *    sees a failed stream and is never resumed on partial memory) and destroys the link socket.
 */
import { LinkError } from "./errors.ts";

/** HELLO's first 8 bytes. */
export const LINK_MAGIC = Buffer.from("vmprlink", "latin1");
export const PROTOCOL_MAJOR = 1;
/**
 * 1.1: send's HELLO carries a {@link ChannelClaim}. 1.2: REF_FS. 1.3: bare REF_FS and ZEROS (multifd packets).
 * 1.4: LOAD (receive's load reports).
 */
export const PROTOCOL_MINOR = 4;

/** Frame header: u8 type, be32 length. */
export const FRAME_HEADER_BYTES = 5;
/** Largest payload of any frame. */
export const MAX_PAYLOAD_BYTES = 1024 * 1024;
/** Bytes receive tolerates past its announced window: what send may have taken in one read before it stops. */
export const WINDOW_SLACK_BYTES = 1024 * 1024;
/**
 * The window receive announces unless told otherwise (stream rule 3): what receive may have to hold while one REF
 * waits for its PAGE_DATA. It must exceed what can be in flight between send's relay and receive (send reads up
 * to 64 MiB ahead of the link, migrate/send.ts GUARDED_READ_AHEAD_BYTES, plus a few MiB of socket buffers), or
 * the window, not the link, would stall send after a free stretch.
 */
export const DEFAULT_WINDOW_BYTES = 96 * 1024 * 1024;
/** Guest page = disk block size that REF and PAGE_DATA describe (x86-64 TARGET_PAGE_SIZE). */
export const PAGE_BYTES = 4096;
export const NONCE_BYTES = 32;
export const MAC_BYTES = 32;
export const HASH_BYTES = 32;
/** be64 offset|flags, then (when CONTINUE is clear) u8 idlen and up to 255 idstr bytes. */
export const MIN_PAGE_HEADER_BYTES = 8;
export const MAX_PAGE_HEADER_BYTES = 8 + 1 + 255;
export const MAX_ERROR_MESSAGE_BYTES = 4096;
export const MAX_CAPABILITIES = 32;
export const MAX_CAPABILITY_NAME_BYTES = 64;

export const MSG = {
  HELLO: 0x01,
  AUTH: 0x02,
  READY: 0x03,
  DATA: 0x10,
  REF: 0x11,
  PAGE_DATA: 0x12,
  REF_FS: 0x13,
  ZEROS: 0x14,
  RETURN: 0x20,
  NACK: 0x21,
  ACK: 0x22,
  LOAD: 0x23,
  EOF: 0x30,
  ERROR: 0x31,
} as const;
export type MessageType = (typeof MSG)[keyof typeof MSG];

export const ROLE = { SEND: 1, RECEIVE: 2 } as const;
export type Role = (typeof ROLE)[keyof typeof ROLE];

/** Capability names (HELLO). */
export const CAPABILITY = {
  /** REF/PAGE_DATA/NACK/ACK with 4096-byte blocks and SHA-256 hashes. */
  REF_SHA256: "ref-sha256",
  /** REF_FS: references into a filesystem named by its UUID (receive finds it on its disks). */
  REF_FS_SHA256: "ref-fs-sha256",
  /** REF_FS with an empty pageHeader: a page inside a multifd packet, whose bytes alone the reference stands for (1.3). */
  REF_FS_BARE: "ref-fs-bare",
  /** ZEROS: pages of zeros receive writes in place (free pages in a 7.2 source's multifd packets, 1.3). */
  ZERO_FILL: "zero-fill",
  /** LOAD: receive reports how busy it is, so send makes references only while the link holds things back (1.4). */
  LOAD_REPORT: "load-report",
} as const;

/** How often receive sends a LOAD while the stream flows (link "Load reports"). */
export const LOAD_REPORT_INTERVAL_MS = 100;
/** LOAD's busyPermille is a share: 0..1000. */
export const MAX_BUSY_PERMILLE = 1000;

/** Why receive could not rebuild a REF'd page. */
export const NACK_REASON = {
  /** The block's bytes do not hash to the REF's hash (the guest rewrote it), or the block is out of range. */
  UNVERIFIED: 1,
  /** Reading the block failed. */
  READ_FAILED: 2,
} as const;

/** ERROR codes. */
export const ERROR_CODE = {
  /** The peer broke a protocol rule (the message says which). */
  PROTOCOL: 1,
  /** receive could not connect to, or lost, the destination QEMU. */
  DESTINATION: 2,
  /** send lost the source QEMU. */
  SOURCE: 3,
  /** A local failure (disk, memory, a bug). */
  INTERNAL: 4,
  /** An operator or a signal stopped vmprune. */
  ABORTED: 5,
} as const;

/** Bytes of a migration id in a {@link ChannelClaim}. */
export const MIGRATION_ID_BYTES = 16;
/** Longest destination name a claim carries (u8 length). */
export const MAX_TARGET_BYTES = 255;
/**
 * A destination name: a socket file name in receive's allowed directory, or HOST:PORT / [IPV6]:PORT. No "/", so
 * a name can never leave the allowed directory; the empty name means "receive's one destination".
 */
export const TARGET_NAME = /^[A-Za-z0-9._:@+[\]-]*$/;

/** What send's HELLO says about its connection (1.1; see "Channel claims"). */
export interface ChannelClaim {
  /** The same 16 random bytes on every connection of one migration. */
  migration: Buffer;
  /** 0 = QEMU's main channel, then multifd channels in the order QEMU opened them. */
  channel: number;
  /** The destination send wants; "" = receive's one destination. */
  target: string;
}

export interface Hello {
  type: typeof MSG.HELLO;
  major: number;
  minor: number;
  role: Role;
  /** receive: the most output bytes it holds behind an unsettled REF (stream rule 3); send: 0. */
  windowBytes: number;
  nonce: Buffer;
  capabilities: string[];
  /** send, from 1.1: which migration, which channel, which destination. */
  claim?: ChannelClaim;
}
export interface Auth {
  type: typeof MSG.AUTH;
  mac: Buffer;
}
export interface Ready {
  type: typeof MSG.READY;
}
export interface Data {
  type: typeof MSG.DATA;
  bytes: Buffer;
}
export interface Zeros {
  type: typeof MSG.ZEROS;
  /** Pages of 4096 zero bytes. */
  pages: number;
}
export interface Ref {
  type: typeof MSG.REF;
  refId: number;
  blockNumber: number;
  hash: Buffer;
  pageHeader: Buffer;
}
/** Bytes of a filesystem UUID in REF_FS. */
export const FILESYSTEM_UUID_BYTES = 16;

export interface RefFs {
  type: typeof MSG.REF_FS;
  refId: number;
  /** The filesystem's UUID as the guest's superblock holds it. */
  filesystem: Buffer;
  /** 512-byte sectors from the filesystem's first byte. */
  blockNumber: number;
  hash: Buffer;
  pageHeader: Buffer;
}
export interface PageData {
  type: typeof MSG.PAGE_DATA;
  refId: number;
  page: Buffer;
}
export interface Return {
  type: typeof MSG.RETURN;
  bytes: Buffer;
}
export interface Nack {
  type: typeof MSG.NACK;
  refId: number;
  reason: number;
}
export interface Ack {
  type: typeof MSG.ACK;
  refId: number;
}
export interface Load {
  type: typeof MSG.LOAD;
  /** The share of the last interval receive's event loop was busy, in 1/1000 (0..1000). */
  busyPermille: number;
  /** Bytes waiting in receive for the destination QEMU on this connection (capped at 2^32 - 1). */
  destinationQueuedBytes: number;
}
export interface Eof {
  type: typeof MSG.EOF;
}
export interface ErrorMessage {
  type: typeof MSG.ERROR;
  code: number;
  message: string;
}

export type Message =
  | Hello
  | Auth
  | Ready
  | Data
  | Zeros
  | Ref
  | RefFs
  | PageData
  | Return
  | Nack
  | Ack
  | Load
  | Eof
  | ErrorMessage;
/** What send may send after READY. */
export type SendMessage = Data | Zeros | Ref | RefFs | PageData | Eof | ErrorMessage;
/** What receive may send after READY. */
export type ReceiveMessage = Return | Nack | Ack | Load | Eof | ErrorMessage;

/** One message type: its wire value, its payload bounds, and how it reads and writes its payload. */
export interface MessageCodec<M extends Message> {
  readonly type: M["type"];
  readonly name: string;
  readonly minPayloadBytes: number;
  readonly maxPayloadBytes: number;
  /** The payload (the frame without its header). */
  encode(message: M): Buffer;
  /**
   * Reads a payload whose length is within the bounds. Buffers in the result are views into `payload`.
   * `at` is the frame's offset in the link stream, for errors.
   */
  decode(payload: Buffer, at: number): M;
}

function badPayload(name: string, at: number, detail: string): LinkError {
  return new LinkError("bad-payload", `${name}: ${detail}`, at);
}

function readSafeU64(payload: Buffer, offset: number, name: string, field: string, at: number): number {
  const value = payload.readBigUInt64BE(offset);
  if (value > BigInt(Number.MAX_SAFE_INTEGER))
    throw badPayload(name, at, `${field} ${value} is above 2^53 - 1`);
  return Number(value);
}

function writeSafeU64(buffer: Buffer, value: number, offset: number, field: string): void {
  if (!Number.isSafeInteger(value) || value < 0)
    throw new RangeError(`${field} ${value} is not a u64 below 2^53`);
  buffer.writeBigUInt64BE(BigInt(value), offset);
}

const CAPABILITY_NAME = /^[a-z0-9][a-z0-9.-]*$/;

const HELLO_FIXED_BYTES = LINK_MAGIC.length + 2 + 2 + 1 + 4 + NONCE_BYTES + 1;

export const HELLO_CODEC: MessageCodec<Hello> = {
  type: MSG.HELLO,
  name: "HELLO",
  minPayloadBytes: HELLO_FIXED_BYTES,
  maxPayloadBytes: 8192,
  encode(m) {
    if (m.nonce.length !== NONCE_BYTES) throw new RangeError(`HELLO nonce must be ${NONCE_BYTES} bytes`);
    if (m.capabilities.length > MAX_CAPABILITIES) throw new RangeError("HELLO: too many capabilities");
    const names = m.capabilities.map((name) => {
      if (!CAPABILITY_NAME.test(name) || name.length > MAX_CAPABILITY_NAME_BYTES)
        throw new RangeError(`HELLO: bad capability name ${JSON.stringify(name)}`);
      return Buffer.from(name, "latin1");
    });
    const claim = m.claim ? encodeClaim(m.claim) : Buffer.alloc(0);
    const out = Buffer.alloc(
      HELLO_FIXED_BYTES + names.reduce((sum, n) => sum + 1 + n.length, 0) + claim.length,
    );
    let o = LINK_MAGIC.copy(out, 0);
    o = out.writeUInt16BE(m.major, o);
    o = out.writeUInt16BE(m.minor, o);
    o = out.writeUInt8(m.role, o);
    o = out.writeUInt32BE(m.windowBytes, o);
    o += m.nonce.copy(out, o);
    o = out.writeUInt8(names.length, o);
    for (const name of names) {
      o = out.writeUInt8(name.length, o);
      o += name.copy(out, o);
    }
    claim.copy(out, o);
    return out;
  },
  decode(p, at) {
    if (!p.subarray(0, LINK_MAGIC.length).equals(LINK_MAGIC))
      throw new LinkError(
        "bad-magic",
        `HELLO starts with ${p.subarray(0, LINK_MAGIC.length).toString("hex")}, not "vmprlink": the peer is not a vmprune link endpoint`,
        at,
      );
    let o = LINK_MAGIC.length;
    const major = p.readUInt16BE(o);
    const minor = p.readUInt16BE(o + 2);
    const role = p.readUInt8(o + 4);
    const windowBytes = p.readUInt32BE(o + 5);
    o += 9;
    const nonce = p.subarray(o, o + NONCE_BYTES);
    o += NONCE_BYTES;
    if (role !== ROLE.SEND && role !== ROLE.RECEIVE) throw badPayload("HELLO", at, `unknown role ${role}`);
    const count = p.readUInt8(o++);
    if (count > MAX_CAPABILITIES)
      throw badPayload("HELLO", at, `${count} capabilities (at most ${MAX_CAPABILITIES})`);
    const capabilities: string[] = [];
    for (let i = 0; i < count; i++) {
      const length = p[o];
      if (length === undefined || o + 1 + length > p.length)
        throw badPayload("HELLO", at, `capability ${i} runs past the payload`);
      const name = p.toString("latin1", o + 1, o + 1 + length);
      if (!CAPABILITY_NAME.test(name) || length > MAX_CAPABILITY_NAME_BYTES)
        throw badPayload("HELLO", at, `bad capability name ${JSON.stringify(name)}`);
      capabilities.push(name);
      o += 1 + length;
    }
    // 1.1: send's claim. Bytes after what this version knows are fields of a later minor version: skipped (but
    // covered by the MACs).
    const claim = role === ROLE.SEND && minor >= 1 && o < p.length ? decodeClaim(p, o, at) : undefined;
    return {
      type: MSG.HELLO,
      major,
      minor,
      role,
      windowBytes,
      nonce,
      capabilities,
      ...(claim ? { claim } : {}),
    };
  },
};

function encodeClaim(claim: ChannelClaim): Buffer {
  if (claim.migration.length !== MIGRATION_ID_BYTES)
    throw new RangeError(`HELLO: a migration id has ${MIGRATION_ID_BYTES} bytes`);
  if (!Number.isInteger(claim.channel) || claim.channel < 0 || claim.channel > 0xffff)
    throw new RangeError(`HELLO: channel ${claim.channel} is not a u16`);
  if (!TARGET_NAME.test(claim.target) || claim.target.length > MAX_TARGET_BYTES)
    throw new RangeError(`HELLO: bad destination name ${JSON.stringify(claim.target)}`);
  const target = Buffer.from(claim.target, "latin1");
  const out = Buffer.alloc(MIGRATION_ID_BYTES + 2 + 1 + target.length);
  claim.migration.copy(out, 0);
  out.writeUInt16BE(claim.channel, MIGRATION_ID_BYTES);
  out.writeUInt8(target.length, MIGRATION_ID_BYTES + 2);
  target.copy(out, MIGRATION_ID_BYTES + 3);
  return out;
}

function decodeClaim(p: Buffer, o: number, at: number): ChannelClaim {
  if (o + MIGRATION_ID_BYTES + 3 > p.length)
    throw badPayload("HELLO", at, "a 1.1 send's claim runs past the payload");
  const migration = Buffer.from(p.subarray(o, o + MIGRATION_ID_BYTES));
  const channel = p.readUInt16BE(o + MIGRATION_ID_BYTES);
  const length = p.readUInt8(o + MIGRATION_ID_BYTES + 2);
  const start = o + MIGRATION_ID_BYTES + 3;
  if (start + length > p.length)
    throw badPayload("HELLO", at, "the claim's destination runs past the payload");
  const target = p.toString("latin1", start, start + length);
  if (!TARGET_NAME.test(target))
    throw badPayload("HELLO", at, `bad destination name ${JSON.stringify(target)}`);
  return { migration, channel, target };
}

export const AUTH_CODEC: MessageCodec<Auth> = {
  type: MSG.AUTH,
  name: "AUTH",
  minPayloadBytes: MAC_BYTES,
  maxPayloadBytes: MAC_BYTES,
  encode(m) {
    if (m.mac.length !== MAC_BYTES) throw new RangeError(`AUTH mac must be ${MAC_BYTES} bytes`);
    return Buffer.from(m.mac);
  },
  decode(p) {
    return { type: MSG.AUTH, mac: p };
  },
};

const EMPTY = Buffer.alloc(0);

function emptyCodec<M extends Ready | Eof>(type: M["type"], name: string, make: () => M): MessageCodec<M> {
  return {
    type,
    name,
    minPayloadBytes: 0,
    maxPayloadBytes: 0,
    encode: () => EMPTY,
    decode: make,
  };
}

export const READY_CODEC = emptyCodec<Ready>(MSG.READY, "READY", () => ({ type: MSG.READY }));
export const EOF_CODEC = emptyCodec<Eof>(MSG.EOF, "EOF", () => ({ type: MSG.EOF }));

function bytesCodec<M extends Data | Return>(type: M["type"], name: string): MessageCodec<M> {
  return {
    type,
    name,
    minPayloadBytes: 1,
    maxPayloadBytes: MAX_PAYLOAD_BYTES,
    encode: (m) => m.bytes,
    decode: (p) => ({ type, bytes: p }) as M,
  };
}

export const DATA_CODEC = bytesCodec<Data>(MSG.DATA, "DATA");
export const RETURN_CODEC = bytesCodec<Return>(MSG.RETURN, "RETURN");

/** REF's payload before the page header: refId, blockNumber, SHA-256. */
export const REF_FIXED_BYTES = 8 + 8 + HASH_BYTES;

export const REF_CODEC: MessageCodec<Ref> = {
  type: MSG.REF,
  name: "REF",
  minPayloadBytes: REF_FIXED_BYTES + MIN_PAGE_HEADER_BYTES,
  maxPayloadBytes: REF_FIXED_BYTES + MAX_PAGE_HEADER_BYTES,
  encode(m) {
    if (m.hash.length !== HASH_BYTES) throw new RangeError(`REF hash must be ${HASH_BYTES} bytes`);
    const headerBytes = m.pageHeader.length;
    if (headerBytes < MIN_PAGE_HEADER_BYTES || headerBytes > MAX_PAGE_HEADER_BYTES)
      throw new RangeError(`REF pageHeader of ${headerBytes} bytes`);
    const out = Buffer.alloc(REF_FIXED_BYTES + headerBytes);
    writeSafeU64(out, m.refId, 0, "refId");
    writeSafeU64(out, m.blockNumber, 8, "blockNumber");
    m.hash.copy(out, 16);
    m.pageHeader.copy(out, REF_FIXED_BYTES);
    return out;
  },
  decode(p, at) {
    return {
      type: MSG.REF,
      refId: readSafeU64(p, 0, "REF", "refId", at),
      blockNumber: readSafeU64(p, 8, "REF", "blockNumber", at),
      hash: p.subarray(16, 16 + HASH_BYTES),
      pageHeader: p.subarray(REF_FIXED_BYTES),
    };
  },
};

/** REF_FS's payload before the page header: refId, filesystem UUID, blockNumber, SHA-256. */
export const REF_FS_FIXED_BYTES = 8 + FILESYSTEM_UUID_BYTES + 8 + HASH_BYTES;

/** REF_FS's pageHeader: none (a bare reference) or a RAM record header (at least its be64 offset|flags). */
function refFsPageHeader(payload: Buffer, at: number): Buffer {
  const header = payload.subarray(REF_FS_FIXED_BYTES);
  if (header.length !== 0 && header.length < MIN_PAGE_HEADER_BYTES)
    throw badPayload(
      "REF_FS",
      at,
      `a pageHeader of ${header.length} bytes is neither empty nor a RAM record header`,
    );
  return header;
}

export const REF_FS_CODEC: MessageCodec<RefFs> = {
  type: MSG.REF_FS,
  name: "REF_FS",
  // An empty pageHeader is a bare reference (1.3, inside a multifd packet); else a RAM record header.
  minPayloadBytes: REF_FS_FIXED_BYTES,
  maxPayloadBytes: REF_FS_FIXED_BYTES + MAX_PAGE_HEADER_BYTES,
  encode(m) {
    if (m.hash.length !== HASH_BYTES) throw new RangeError(`REF_FS hash must be ${HASH_BYTES} bytes`);
    if (m.filesystem.length !== FILESYSTEM_UUID_BYTES)
      throw new RangeError(`REF_FS filesystem UUID must be ${FILESYSTEM_UUID_BYTES} bytes`);
    const headerBytes = m.pageHeader.length;
    if ((headerBytes !== 0 && headerBytes < MIN_PAGE_HEADER_BYTES) || headerBytes > MAX_PAGE_HEADER_BYTES)
      throw new RangeError(`REF_FS pageHeader of ${headerBytes} bytes`);
    const out = Buffer.alloc(REF_FS_FIXED_BYTES + headerBytes);
    writeSafeU64(out, m.refId, 0, "refId");
    m.filesystem.copy(out, 8);
    writeSafeU64(out, m.blockNumber, 8 + FILESYSTEM_UUID_BYTES, "blockNumber");
    m.hash.copy(out, 16 + FILESYSTEM_UUID_BYTES);
    m.pageHeader.copy(out, REF_FS_FIXED_BYTES);
    return out;
  },
  decode(p, at) {
    const uuidEnd = 8 + FILESYSTEM_UUID_BYTES;
    return {
      type: MSG.REF_FS,
      refId: readSafeU64(p, 0, "REF_FS", "refId", at),
      filesystem: p.subarray(8, uuidEnd),
      blockNumber: readSafeU64(p, uuidEnd, "REF_FS", "blockNumber", at),
      hash: p.subarray(uuidEnd + 8, uuidEnd + 8 + HASH_BYTES),
      pageHeader: refFsPageHeader(p, at),
    };
  },
};

export const PAGE_DATA_CODEC: MessageCodec<PageData> = {
  type: MSG.PAGE_DATA,
  name: "PAGE_DATA",
  minPayloadBytes: 8 + PAGE_BYTES,
  maxPayloadBytes: 8 + PAGE_BYTES,
  encode(m) {
    if (m.page.length !== PAGE_BYTES) throw new RangeError(`PAGE_DATA page must be ${PAGE_BYTES} bytes`);
    const out = Buffer.alloc(8 + PAGE_BYTES);
    writeSafeU64(out, m.refId, 0, "refId");
    m.page.copy(out, 8);
    return out;
  },
  decode(p, at) {
    return { type: MSG.PAGE_DATA, refId: readSafeU64(p, 0, "PAGE_DATA", "refId", at), page: p.subarray(8) };
  },
};

export const NACK_CODEC: MessageCodec<Nack> = {
  type: MSG.NACK,
  name: "NACK",
  minPayloadBytes: 9,
  maxPayloadBytes: 9,
  encode(m) {
    const out = Buffer.alloc(9);
    writeSafeU64(out, m.refId, 0, "refId");
    out.writeUInt8(m.reason, 8);
    return out;
  },
  decode(p, at) {
    return { type: MSG.NACK, refId: readSafeU64(p, 0, "NACK", "refId", at), reason: p.readUInt8(8) };
  },
};

/** Most pages one ZEROS stands for: as many bytes as the largest DATA payload, so receive allocates no more. */
export const MAX_ZERO_PAGES = MAX_PAYLOAD_BYTES / PAGE_BYTES;

export const ZEROS_CODEC: MessageCodec<Zeros> = {
  type: MSG.ZEROS,
  name: "ZEROS",
  minPayloadBytes: 4,
  maxPayloadBytes: 4,
  encode(m) {
    if (!Number.isInteger(m.pages) || m.pages < 1 || m.pages > MAX_ZERO_PAGES)
      throw new RangeError(`ZEROS of ${m.pages} pages (1..${MAX_ZERO_PAGES})`);
    const out = Buffer.alloc(4);
    out.writeUInt32BE(m.pages, 0);
    return out;
  },
  decode(p, at) {
    const pages = p.readUInt32BE(0);
    if (pages < 1 || pages > MAX_ZERO_PAGES)
      throw badPayload("ZEROS", at, `${pages} pages is not within 1..${MAX_ZERO_PAGES}`);
    return { type: MSG.ZEROS, pages };
  },
};

export const ACK_CODEC: MessageCodec<Ack> = {
  type: MSG.ACK,
  name: "ACK",
  minPayloadBytes: 8,
  maxPayloadBytes: 8,
  encode(m) {
    const out = Buffer.alloc(8);
    writeSafeU64(out, m.refId, 0, "refId");
    return out;
  },
  decode(p, at) {
    return { type: MSG.ACK, refId: readSafeU64(p, 0, "ACK", "refId", at) };
  },
};

export const LOAD_CODEC: MessageCodec<Load> = {
  type: MSG.LOAD,
  name: "LOAD",
  minPayloadBytes: 6,
  maxPayloadBytes: 6,
  encode(m) {
    if (!Number.isInteger(m.busyPermille) || m.busyPermille < 0 || m.busyPermille > MAX_BUSY_PERMILLE)
      throw new RangeError(`LOAD busyPermille ${m.busyPermille} (0..${MAX_BUSY_PERMILLE})`);
    if (!Number.isInteger(m.destinationQueuedBytes) || m.destinationQueuedBytes < 0)
      throw new RangeError(`LOAD destinationQueuedBytes ${m.destinationQueuedBytes}`);
    const out = Buffer.alloc(6);
    out.writeUInt16BE(m.busyPermille, 0);
    out.writeUInt32BE(Math.min(m.destinationQueuedBytes, 0xffff_ffff), 2);
    return out;
  },
  decode(p, at) {
    const busyPermille = p.readUInt16BE(0);
    if (busyPermille > MAX_BUSY_PERMILLE)
      throw badPayload("LOAD", at, `busyPermille ${busyPermille} is above ${MAX_BUSY_PERMILLE}`);
    return { type: MSG.LOAD, busyPermille, destinationQueuedBytes: p.readUInt32BE(2) };
  },
};

export const ERROR_CODEC: MessageCodec<ErrorMessage> = {
  type: MSG.ERROR,
  name: "ERROR",
  minPayloadBytes: 2,
  maxPayloadBytes: 2 + MAX_ERROR_MESSAGE_BYTES,
  encode(m) {
    let text = Buffer.from(m.message, "utf8");
    if (text.length > MAX_ERROR_MESSAGE_BYTES) text = text.subarray(0, MAX_ERROR_MESSAGE_BYTES);
    const out = Buffer.alloc(2 + text.length);
    out.writeUInt16BE(m.code, 0);
    text.copy(out, 2);
    return out;
  },
  decode(p) {
    return { type: MSG.ERROR, code: p.readUInt16BE(0), message: p.toString("utf8", 2) };
  },
};

type CodecTable = { readonly [T in MessageType]: MessageCodec<Extract<Message, { type: T }>> };

const CODECS: CodecTable = {
  [MSG.HELLO]: HELLO_CODEC,
  [MSG.AUTH]: AUTH_CODEC,
  [MSG.READY]: READY_CODEC,
  [MSG.DATA]: DATA_CODEC,
  [MSG.REF]: REF_CODEC,
  [MSG.PAGE_DATA]: PAGE_DATA_CODEC,
  [MSG.REF_FS]: REF_FS_CODEC,
  [MSG.ZEROS]: ZEROS_CODEC,
  [MSG.RETURN]: RETURN_CODEC,
  [MSG.NACK]: NACK_CODEC,
  [MSG.ACK]: ACK_CODEC,
  [MSG.LOAD]: LOAD_CODEC,
  [MSG.EOF]: EOF_CODEC,
  [MSG.ERROR]: ERROR_CODEC,
};

/** The codec of a wire type byte, or undefined for an unknown type. */
export function codecOf(type: number): MessageCodec<Message> | undefined {
  return (CODECS as Partial<Record<number, MessageCodec<Message>>>)[type];
}

/** The message type's name ("REF"), or "0x7f" for an unknown type. */
export function messageName(type: number): string {
  return codecOf(type)?.name ?? `0x${type.toString(16).padStart(2, "0")}`;
}

function frameHeader(type: number, payloadBytes: number): Buffer {
  const header = Buffer.allocUnsafe(FRAME_HEADER_BYTES);
  header.writeUInt8(type, 0);
  header.writeUInt32BE(payloadBytes, 1);
  return header;
}

/** One message as one frame (header and payload in one Buffer). */
export function encodeMessage(message: Message): Buffer {
  const codec = codecOf(message.type);
  if (!codec) throw new RangeError(`unknown message type ${message.type}`);
  const payload = codec.encode(message);
  if (payload.length < codec.minPayloadBytes || payload.length > codec.maxPayloadBytes)
    throw new RangeError(`${codec.name} payload of ${payload.length} bytes is out of bounds`);
  return Buffer.concat([frameHeader(message.type, payload.length), payload]);
}

/**
 * DATA (or RETURN) frames for `bytes` of any length (one Buffer, or several in order, e.g. views of the chunks a
 * record batch spans), split at {@link MAX_PAYLOAD_BYTES}: a header, then the payload as views of the input (no
 * copy: TLS copies what it encrypts anyway); write them corked. Empty input: none.
 */
export function encodeBytesFrames(
  type: typeof MSG.DATA | typeof MSG.RETURN,
  bytes: Buffer | readonly Buffer[],
): Buffer[] {
  const parts = Buffer.isBuffer(bytes) ? [bytes] : bytes;
  let total = 0;
  for (const part of parts) total += part.length;
  const frames: Buffer[] = [];
  /** Payload bytes the frame whose header went out last still needs. */
  let owed = 0;
  for (const part of parts) {
    for (let o = 0; o < part.length; ) {
      if (owed === 0) {
        owed = Math.min(MAX_PAYLOAD_BYTES, total);
        total -= owed;
        frames.push(frameHeader(type, owed));
      }
      const n = Math.min(owed, part.length - o);
      frames.push(o === 0 && n === part.length ? part : part.subarray(o, o + n));
      o += n;
      owed -= n;
    }
  }
  return frames;
}

/** The bytes a stream message makes receive write to the destination QEMU (stream rule 3's unit). */
export function outputBytes(message: Data | Ref): number {
  return message.type === MSG.DATA ? message.bytes.length : message.pageHeader.length + PAGE_BYTES;
}
