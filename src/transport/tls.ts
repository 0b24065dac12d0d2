/**
 * TLS 1.3 under vmprune's link (link/protocol.ts): guest memory crosses hosts, so the link is encrypted unless an
 * operator explicitly asks for plaintext. The link protocol above only reads and writes bytes; this module turns an
 * accepted socket into a TLS server socket, and gives the options a connecting socket needs (socket.ts `connect`).
 *
 * Two modes:
 * - **psk**: TLS-PSK from the link's pre-shared key file, so a key file alone still gives an encrypted link. The
 *   TLS key is HMAC-SHA256(key file, {@link PSK_LABEL}), not the file's bytes: the same secret is not used raw in
 *   two protocols (the link's own HMAC handshake runs inside the tunnel with the file's bytes). OpenSSL 3.0 (Node
 *   20) feeds a PSK given through the classic PSK callbacks into TLS 1.3 as an external PSK bound to SHA-256: a
 *   SHA-384 suite (TLS_AES_256_GCM_SHA384) cannot use it, the server then falls back to a certificate it does not
 *   have and the handshake fails ("no suitable signature algorithm", measured). Hence the SHA-256 suites only.
 *   OpenSSL offers psk_dhe_ke, so the session keys also get an (EC)DHE share: forward secrecy.
 * - **x509**: mutual certificates in the layout QEMU and libvirt use (`/etc/pki/qemu`): `ca-cert.pem`,
 *   `server-cert.pem`/`server-key.pem` on the receiving side, `client-cert.pem`/`client-key.pem` on the sending
 *   side. Each side verifies the other's chain against the CA; the client also checks the server's name or IP.
 *
 * A peer that fails TLS (another key, another CA, an expired certificate, no certificate, plaintext) never gets
 * past {@link secureAccepted}: the relay refuses it before it connects to the destination QEMU.
 */
import { createHmac } from "node:crypto";
import { readFileSync } from "node:fs";
import type { Socket } from "node:net";
import { join } from "node:path";
import {
  type ConnectionOptions,
  checkServerIdentity,
  createSecureContext,
  type PeerCertificate,
  type SecureContext,
  TLSSocket,
  type TlsOptions,
  Server as TlsServer,
} from "node:tls";
import { type Endpoint, isUnixEndpoint } from "./endpoint.ts";

/** How the link is protected. */
export type LinkSecurity =
  | { mode: "psk"; key: Buffer }
  | {
      mode: "x509";
      /** Directory holding ca-cert.pem and this side's certificate and key (file names at the top). */
      dir: string;
      /** Client only: the name (or IP) the server's certificate must carry; default the host connected to. */
      hostname?: string;
    }
  | {
      mode: "plaintext";
      /**
       * Why no TLS is needed, when vmprune itself chose it (`vmprune migrate`: the link is a unix socket in a
       * private directory between two parts of one process). Absent: the operator asked (--insecure-plaintext),
       * and both sides warn.
       */
      why?: string;
    };

/** Domain separation between the key file and the TLS PSK derived from it. */
export const PSK_LABEL = "vmprune-link tls-psk v1";
/** TLS-PSK identity: one key per link, so the identity names only the scheme (a future scheme gets another). */
export const PSK_IDENTITY = "vmprune-link-v1";
/** TLS 1.3 suites that can carry an OpenSSL callback PSK (SHA-256; see the top). */
export const PSK_CIPHERS = "TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256";
/** A TLS handshake must be done within this, so that a stalled client does not hold the accept queue. */
export const DEFAULT_TLS_HANDSHAKE_TIMEOUT_MS = 10_000;

export const X509_FILES = {
  ca: "ca-cert.pem",
  server: { cert: "server-cert.pem", key: "server-key.pem" },
  client: { cert: "client-cert.pem", key: "client-key.pem" },
} as const;

/** TLS could not be set up or the peer failed it; the message says which and what to check. */
export class LinkTlsError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "LinkTlsError";
  }
}

/** What both sides log when the link runs without TLS. */
export const PLAINTEXT_WARNING =
  "WARNING: the link is NOT encrypted: guest memory crosses the network in cleartext (authenticated only)";

/** What a side logs about a link without TLS: the reason vmprune chose it, else {@link PLAINTEXT_WARNING}. */
export function plaintextNotice(security: LinkSecurity): string | undefined {
  if (security.mode !== "plaintext") return undefined;
  return security.why ? `the link is not encrypted: ${security.why}` : PLAINTEXT_WARNING;
}

/** The link's protection: the given one, else TLS-PSK from the key (the default a key file alone gets). */
export function linkSecurity(security: LinkSecurity | undefined, psk: Buffer | undefined): LinkSecurity {
  if (security) return security;
  if (psk) return { mode: "psk", key: psk };
  throw new LinkTlsError("the link needs a pre-shared key or x509 credentials");
}

/** The TLS pre-shared key derived from the key file's bytes (domain-separated, see the top). */
export function tlsPsk(key: Buffer): Buffer {
  return createHmac("sha256", key).update(PSK_LABEL).digest();
}

function readCredential(dir: string, file: string, what: string): Buffer {
  const path = join(dir, file);
  try {
    return readFileSync(path);
  } catch (error) {
    const reason = error instanceof Error ? error.message : String(error);
    throw new LinkTlsError(
      `cannot read ${what} ${path} (${reason}): an x509 credentials directory holds ${X509_FILES.ca}, and ${X509_FILES.server.cert}/${X509_FILES.server.key} on the receiving host or ${X509_FILES.client.cert}/${X509_FILES.client.key} on the sending host`,
    );
  }
}

function x509Context(dir: string, role: "server" | "client"): SecureContext {
  const files = X509_FILES[role];
  const ca = readCredential(dir, X509_FILES.ca, "the CA certificate");
  const cert = readCredential(dir, files.cert, `the ${role} certificate`);
  const key = readCredential(dir, files.key, `the ${role} key`);
  try {
    return createSecureContext({ minVersion: "TLSv1.3", ca, cert, key });
  } catch (error) {
    const reason = error instanceof Error ? error.message : String(error);
    throw new LinkTlsError(
      `the x509 credentials in ${dir} are unusable (${reason}): ${files.cert} and ${files.key} must be a matching PEM certificate and key`,
    );
  }
}

/** What a TLS failure most likely means, for the error a user reads. */
export function tlsFailureHint(error: unknown, security: LinkSecurity): string {
  const code = (error as NodeJS.ErrnoException | undefined)?.code ?? "";
  const message = error instanceof Error ? error.message : String(error);
  let hint = "";
  if (/TIMEOUT/.test(code))
    hint =
      "the peer did not complete a TLS handshake in time: a stalled client, or one that waits to be spoken to";
  else if (security.mode === "psk") {
    if (/BINDER|ILLEGAL_PARAMETER|DECRYPT|BAD_RECORD_MAC/.test(code))
      hint = "the two sides hold different link keys";
    else if (
      /WRONG_VERSION|PACKET_LENGTH|HTTP_REQUEST|UNEXPECTED_EOF|ECONNRESET|hang up/.test(code + message)
    )
      hint = "the peer does not speak TLS (a plaintext vmprune, a QEMU, or something else)";
    else hint = "different link keys, or a peer without TLS";
  } else if (security.mode === "x509") {
    if (/EXPIRED/.test(code)) hint = "a certificate has expired";
    else if (/NOT_YET_VALID/.test(code)) hint = "a certificate is not valid yet (clock skew?)";
    else if (/VERIFY|ISSUER|SELF_SIGNED|UNKNOWN_CA|BAD_CERTIFICATE/.test(code))
      hint = "the peer's certificate is not signed by this side's CA";
    else if (/CERTIFICATE_REQUIRED|PEER_DID_NOT_RETURN/.test(code))
      hint = "the client presented no certificate";
    else if (/ALTNAME|HOSTNAME/.test(code))
      hint = "the server's certificate does not name the host connected to";
    else if (/WRONG_VERSION|PACKET_LENGTH|HTTP_REQUEST|UNEXPECTED_EOF/.test(code + message))
      hint = "the peer does not speak TLS (a plaintext vmprune, a QEMU, or something else)";
    else if (/hang up|ECONNRESET/.test(code + message))
      hint = "the peer hung up during the TLS handshake: it may have refused this side's certificate";
    else hint = "check both sides' certificates against the CA";
  }
  // OpenSSL's text is "ADDR:error:CODE:SSL routines:FUNCTION:REASON:FILE:LINE:...": REASON is what tells.
  const reason = /SSL routines:[^:]*:([^:]+)/.exec(message)?.[1] ?? message.split("\n")[0];
  return `TLS handshake failed: ${reason}${code ? ` [${code}]` : ""}${hint ? ` (${hint})` : ""}`;
}

/**
 * The server side: a function that turns an accepted socket into a verified TLS 1.3 socket, or rejects.
 *
 * Each connection goes through a tls.Server of its own (never listening: the socket is handed to it as a
 * 'connection'), not a bare `new TLSSocket(raw, { isServer: true })`: a bare server socket does NOT enforce
 * `rejectUnauthorized` (Node checks the client certificate's verification result only in tls.Server's own
 * 'secure' handler, lib/_tls_wrap.js onServerSocketSecure), so a client certificate from another CA, or an
 * expired one, would be let through (measured). A Server of its own per connection ties its 'secureConnection' and
 * 'tlsClientError' to that connection. The credential files are read once, here, when receive starts.
 */
export function tlsServer(
  security: LinkSecurity,
  timeoutMs = DEFAULT_TLS_HANDSHAKE_TIMEOUT_MS,
): ((raw: Socket) => Promise<Socket>) | undefined {
  if (security.mode === "plaintext") return undefined;
  let options: TlsOptions;
  if (security.mode === "psk") {
    const psk = tlsPsk(security.key);
    options = {
      minVersion: "TLSv1.3",
      ciphers: PSK_CIPHERS,
      pskCallback: (_socket: TLSSocket, identity: string) => (identity === PSK_IDENTITY ? psk : null),
    };
  } else {
    const files = X509_FILES.server;
    options = {
      minVersion: "TLSv1.3",
      ca: readCredential(security.dir, X509_FILES.ca, "the CA certificate"),
      cert: readCredential(security.dir, files.cert, "the server certificate"),
      key: readCredential(security.dir, files.key, "the server key"),
      requestCert: true,
      rejectUnauthorized: true,
    };
    x509Context(security.dir, "server"); // fails now, with the reason, if the files do not go together
  }
  return (raw) => secureAccepted(raw, { ...options, handshakeTimeout: timeoutMs }, security);
}

function secureAccepted(raw: Socket, options: TlsOptions, security: LinkSecurity): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const server = new TlsServer(options);
    // Half-open only once secured: a peer that hangs up mid-handshake must end it now (tls.Server then reports
    // "socket hang up"), not leave a half-open socket waiting for the handshake timeout.
    const halfOpen = raw.allowHalfOpen;
    raw.allowHalfOpen = false;
    server.once("secureConnection", (socket: TLSSocket) => {
      server.removeAllListeners("tlsClientError");
      socket.allowHalfOpen = halfOpen;
      // TLS 1.3 is the floor set in the options; check anyway, since a downgrade would otherwise be silent.
      const protocol = socket.getProtocol();
      if (protocol !== "TLSv1.3") {
        socket.destroy();
        reject(
          new LinkTlsError(`TLS handshake failed: negotiated ${protocol ?? "no protocol"}, not TLSv1.3`),
        );
        return;
      }
      resolve(socket);
    });
    server.once("tlsClientError", (error: Error, socket: TLSSocket) => {
      server.removeAllListeners("secureConnection");
      socket.on("error", () => {}); // a late alert or reset must not become an uncaught 'error'
      socket.destroy();
      raw.destroy();
      // A client certificate that failed verification: tls.Server destroys the socket without an error, so the
      // error here is a mere "socket hang up"; the reason (e.g. CERT_HAS_EXPIRED) is in authorizationError.
      const verify = socket.authorizationError;
      const cause = verify
        ? Object.assign(new Error(`client certificate refused: ${String(verify)}`), { code: String(verify) })
        : error;
      reject(new LinkTlsError(tlsFailureHint(cause, security)));
    });
    server.emit("connection", raw);
  });
}

/** Options for tls.connect to `endpoint` (socket.ts `connect`), or undefined for a plaintext link. */
export function tlsClientOptions(security: LinkSecurity, endpoint: Endpoint): ConnectionOptions | undefined {
  if (security.mode === "plaintext") return undefined;
  if (security.mode === "psk") {
    const psk = tlsPsk(security.key);
    return {
      minVersion: "TLSv1.3",
      ciphers: PSK_CIPHERS,
      pskCallback: () => ({ psk, identity: PSK_IDENTITY }),
      // No certificate in PSK mode: the key proves the server (a binder only the key's holder can produce).
      checkServerIdentity: () => undefined,
    };
  }
  const expected = security.hostname ?? (isUnixEndpoint(endpoint) ? undefined : endpoint.host);
  return {
    secureContext: x509Context(security.dir, "client"),
    minVersion: "TLSv1.3",
    rejectUnauthorized: true,
    // SNI takes names only, not IP addresses (RFC 6066 §3).
    ...(expected && !/^[\d.]+$|:/.test(expected) ? { servername: expected } : {}),
    // Over a unix socket there is no host to check unless one is named: the CA alone vouches for the server.
    checkServerIdentity: (_host: string, cert: PeerCertificate) =>
      expected === undefined ? undefined : checkServerIdentity(expected, cert),
  };
}

/** The protocol and cipher a secured socket negotiated, for logs (undefined for a plain socket). */
export function describeTls(socket: Socket): string | undefined {
  if (!(socket instanceof TLSSocket)) return undefined;
  return `${socket.getProtocol() ?? "?"} ${socket.getCipher()?.standardName ?? "?"}`;
}
