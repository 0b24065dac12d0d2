/**
 * The link handshake (protocol.ts, "Session"): HELLO both ways, AUTH both ways, READY from send. Mutual
 * authentication by HMAC-SHA256 with a pre-shared key over both HELLOs; a failure of any kind destroys the socket
 * without sending anything more, so no QEMU byte crosses an unauthenticated link.
 *
 * On success the socket is paused, its listeners removed, and any bytes that arrived after the handshake were put
 * back with `unshift`: attach the link's 'data' listener and call `socket.resume()`.
 */
import { createHmac, randomBytes, timingSafeEqual } from "node:crypto";
import type { Socket } from "node:net";
import { TLSSocket } from "node:tls";
import { decodeFrame, type Frame, LinkDecoder } from "./decoder.ts";
import { LinkError } from "./errors.ts";
import {
  type ChannelClaim,
  DEFAULT_WINDOW_BYTES,
  encodeMessage,
  FRAME_HEADER_BYTES,
  type Hello,
  type Message,
  MSG,
  messageName,
  NONCE_BYTES,
  PROTOCOL_MAJOR,
  PROTOCOL_MINOR,
  ROLE,
  type Role,
} from "./protocol.ts";

export const DEFAULT_HANDSHAKE_TIMEOUT_MS = 10_000;
/** Shorter keys are refused: a PSK is meant to be random bytes from a key file. */
export const MIN_PSK_BYTES = 16;

/** TLS exporter label (RFC 8446 §7.5) for a handshake key bound to the TLS session ({@link handshakeKey}). */
export const EXPORTER_LABEL = "EXPORTER-vmprune-link-handshake";

/**
 * The key the handshake's MACs use: the pre-shared key when there is one; over TLS with certificates and no key
 * file, 32 bytes exported from the TLS session, which only its two verified endpoints can compute. The handshake
 * then still carries the versioning and capabilities, and binds them to this TLS session.
 */
export function handshakeKey(psk: Buffer | undefined, socket: Socket): Buffer {
  if (psk) return psk;
  if (socket instanceof TLSSocket && socket.encrypted)
    return socket.exportKeyingMaterial(32, EXPORTER_LABEL, Buffer.alloc(0));
  throw new LinkError(
    "bad-key",
    "no pre-shared key, and the connection is not TLS: the link needs a key file, or TLS with certificates",
  );
}

export interface HandshakeOptions {
  /** The pre-shared key (≥ 16 bytes), the same on both hosts. */
  psk: Buffer;
  /** Capabilities this side supports (protocol.ts CAPABILITY). */
  capabilities: readonly string[];
  /** The whole handshake must complete within this (default 10 s). */
  timeoutMs?: number;
  /** receive only: the window it announces (stream rule 3; default DEFAULT_WINDOW_BYTES). */
  windowBytes?: number;
  /** send only: which migration, channel and destination this connection is (protocol.ts "Channel claims"). */
  claim?: ChannelClaim;
  /** For test doubles of a newer or broken peer: override this side's HELLO fields. */
  helloOverride?: Partial<Pick<Hello, "major" | "minor" | "role">>;
}

export interface LinkSession {
  /** Capabilities both sides listed: what this session may use. */
  capabilities: string[];
  peerVersion: { major: number; minor: number };
  /** The window receive announced (the bound send must keep; receive enforces it plus WINDOW_SLACK_BYTES). */
  windowBytes: number;
  /** receive only: what send's HELLO claimed (absent from a 1.0 send); authenticated, since the MACs cover it. */
  peerClaim?: ChannelClaim;
}

/** send's side: connect first, then call this. */
export function clientHandshake(socket: Socket, options: HandshakeOptions): Promise<LinkSession> {
  return handshake(socket, ROLE.SEND, options);
}

/** receive's side: call this on an accepted socket before connecting to the destination QEMU. */
export function serverHandshake(socket: Socket, options: HandshakeOptions): Promise<LinkSession> {
  return handshake(socket, ROLE.RECEIVE, options);
}

const LABEL: Record<Role, string> = {
  [ROLE.SEND]: "vmprune-link send",
  [ROLE.RECEIVE]: "vmprune-link receive",
};
const ROLE_NAME: Record<Role, string> = { [ROLE.SEND]: "send", [ROLE.RECEIVE]: "receive" };

/** HMAC-SHA256(psk, label(role) ‖ be32 len ‖ helloSend ‖ be32 len ‖ helloReceive). */
export function handshakeMac(psk: Buffer, role: Role, helloSend: Buffer, helloReceive: Buffer): Buffer {
  const lengths = Buffer.alloc(8);
  lengths.writeUInt32BE(helloSend.length, 0);
  lengths.writeUInt32BE(helloReceive.length, 4);
  return createHmac("sha256", psk)
    .update(LABEL[role])
    .update(lengths.subarray(0, 4))
    .update(helloSend)
    .update(lengths.subarray(4))
    .update(helloReceive)
    .digest();
}

type Step = "hello" | "auth" | "ready";

function handshake(socket: Socket, role: Role, options: HandshakeOptions): Promise<LinkSession> {
  const peerRole: Role = role === ROLE.SEND ? ROLE.RECEIVE : ROLE.SEND;
  const peerName = ROLE_NAME[peerRole];
  const timeoutMs = options.timeoutMs ?? DEFAULT_HANDSHAKE_TIMEOUT_MS;
  const decoder = new LinkDecoder();
  const hello: Hello = {
    type: MSG.HELLO,
    major: PROTOCOL_MAJOR,
    minor: PROTOCOL_MINOR,
    role,
    windowBytes: role === ROLE.RECEIVE ? (options.windowBytes ?? DEFAULT_WINDOW_BYTES) : 0,
    nonce: randomBytes(NONCE_BYTES),
    capabilities: [...options.capabilities],
    ...(role === ROLE.SEND && options.claim ? { claim: options.claim } : {}),
    ...options.helloOverride,
  };
  const ownHello = encodeMessage(hello).subarray(FRAME_HEADER_BYTES);
  let peerHello: { payload: Buffer; message: Hello } | undefined;
  let step: Step = "hello";

  return new Promise<LinkSession>((resolve, reject) => {
    let settled = false;
    const cleanup = () => {
      settled = true;
      clearTimeout(timer);
      socket.off("data", onData);
      socket.off("end", onEnd);
      socket.off("error", onError);
      socket.off("close", onClose);
    };
    const fail = (error: LinkError) => {
      if (settled) return;
      cleanup();
      socket.on("error", () => {}); // a late reset must not become an uncaught 'error'
      socket.destroy();
      reject(error);
    };
    const succeed = (session: LinkSession) => {
      cleanup();
      socket.pause();
      const rest = decoder.takeRemainder();
      if (rest.length > 0) socket.unshift(rest);
      resolve(session);
    };
    const transcript = (): [Buffer, Buffer] => {
      const theirs = peerHello?.payload ?? Buffer.alloc(0);
      return role === ROLE.SEND ? [ownHello, theirs] : [theirs, ownHello];
    };
    const session = (): LinkSession => {
      const peer = peerHello?.message;
      const theirs = new Set(peer?.capabilities ?? []);
      return {
        capabilities: hello.capabilities.filter((c) => theirs.has(c)),
        peerVersion: { major: peer?.major ?? 0, minor: peer?.minor ?? 0 },
        windowBytes: role === ROLE.RECEIVE ? hello.windowBytes : (peer?.windowBytes ?? 0),
        ...(role === ROLE.RECEIVE && peer?.claim ? { peerClaim: peer.claim } : {}),
      };
    };

    const onFrame = (frame: Frame): void => {
      let message: Message;
      try {
        message = decodeFrame(frame);
      } catch (error) {
        throw error instanceof LinkError ? error : new LinkError("bad-payload", String(error), frame.offset);
      }
      if (message.type === MSG.ERROR)
        throw new LinkError(
          "peer-error",
          `${peerName} refused the link: ${message.message} (code ${message.code})`,
        );
      const expected = step === "hello" ? MSG.HELLO : step === "auth" ? MSG.AUTH : MSG.READY;
      if (message.type !== expected)
        throw new LinkError(
          "unexpected-message",
          `${messageName(message.type)} during the handshake, expected ${messageName(expected)}`,
          frame.offset,
        );
      if (message.type === MSG.HELLO) {
        if (message.major !== PROTOCOL_MAJOR)
          throw new LinkError(
            "unsupported-version",
            `${peerName} speaks link protocol ${message.major}.${message.minor}, this side ${PROTOCOL_MAJOR}.${PROTOCOL_MINOR}: major versions must match (upgrade the older vmprune)`,
          );
        if (message.role !== peerRole)
          throw new LinkError(
            "unexpected-message",
            `the peer says it is vmprune ${ROLE_NAME[message.role]}, expected ${peerName} (send connects to receive)`,
          );
        peerHello = { payload: frame.payload, message };
        if (role === ROLE.RECEIVE) socket.write(encodeMessage(hello));
        else
          socket.write(
            encodeMessage({ type: MSG.AUTH, mac: handshakeMac(options.psk, role, ...transcript()) }),
          );
        step = "auth";
        return;
      }
      if (message.type === MSG.AUTH) {
        const expectedMac = handshakeMac(options.psk, peerRole, ...transcript());
        if (!timingSafeEqual(expectedMac, message.mac))
          throw new LinkError(
            "auth-failed",
            `${peerName} did not prove the pre-shared key (different key files on the two hosts?)`,
          );
        if (role === ROLE.RECEIVE) {
          socket.write(
            encodeMessage({ type: MSG.AUTH, mac: handshakeMac(options.psk, role, ...transcript()) }),
          );
          step = "ready";
          return;
        }
        socket.write(encodeMessage({ type: MSG.READY }));
        succeed(session());
        return;
      }
      succeed(session()); // READY (receive)
    };

    const onData = (chunk: Buffer): void => {
      try {
        decoder.write(chunk);
        for (let frame = decoder.nextFrame(); frame && !settled; frame = settled ? null : decoder.nextFrame())
          onFrame(frame);
      } catch (error) {
        fail(
          error instanceof LinkError ? error : new LinkError("bad-payload", `handshake: ${String(error)}`),
        );
      }
    };
    const closedDuring = (how: string) =>
      new LinkError(
        "closed",
        `${peerName} ${how} during the handshake (at ${step}; a wrong pre-shared key, another protocol version, or not a vmprune ${peerName}?)`,
      );
    const onEnd = () => fail(closedDuring("closed the connection"));
    const onClose = () => fail(closedDuring("closed the connection"));
    const onError = (error: Error) => fail(closedDuring(`reset the connection (${error.message})`));
    const timer = setTimeout(
      () =>
        fail(
          new LinkError(
            "timeout",
            `no complete handshake from the ${peerName} within ${timeoutMs} ms (at ${step})`,
          ),
        ),
      timeoutMs,
    );

    if (options.psk.length < MIN_PSK_BYTES) {
      fail(
        new LinkError(
          "bad-key",
          `the pre-shared key has ${options.psk.length} bytes, at least ${MIN_PSK_BYTES} are needed`,
        ),
      );
      return;
    }
    socket.on("data", onData);
    socket.on("end", onEnd);
    socket.on("error", onError);
    socket.on("close", onClose);
    if (role === ROLE.SEND) socket.write(encodeMessage(hello));
    socket.resume();
  });
}

/** How long a refused peer gets to read its ERROR before the socket is destroyed. */
const REFUSAL_LINGER_MS = 2_000;

/**
 * After a completed handshake: refuses the link with an ERROR send reports as the reason (its migration fails,
 * the source QEMU keeps running), then closes. Nothing of the peer's is read any more.
 */
export function refuseLink(socket: Socket, code: number, message: string): void {
  socket.on("error", () => {});
  socket.removeAllListeners("data");
  socket.pause();
  socket.end(encodeMessage({ type: MSG.ERROR, code, message: message.slice(0, 1000) }));
  setTimeout(() => socket.destroy(), REFUSAL_LINGER_MS).unref();
}
