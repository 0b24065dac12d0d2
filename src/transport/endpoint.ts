/**
 * Where a relay listens and where it connects: a TCP address (`HOST:PORT`, `[IPV6]:PORT`) or a unix socket
 * (`unix:/PATH`). These are the forms QEMU's own migration URIs take (`tcp:HOST:PORT`, `unix:/PATH`), so an
 * address can be copied from a QEMU command line; libvirt's `unix:///PATH` is accepted too. A unix socket matters
 * where QEMU is managed by someone else: libvirt migrates to `--migrateuri unix:///PATH` and KubeVirt's proxy sits
 * on unix sockets (../shared/docs/deployment.md §1-2).
 *
 * The two shapes are told apart by their fields (`path` or `host`/`port`), so the plain `{ host, port }` objects
 * the rest of the code passes around are endpoints as they are.
 */

export interface TcpEndpoint {
  readonly host: string;
  /** 0 when listening: any free port. */
  readonly port: number;
}

export interface UnixEndpoint {
  /** An absolute filesystem path. */
  readonly path: string;
}

export type Endpoint = TcpEndpoint | UnixEndpoint;

/** An endpoint that cannot be parsed or used; the message says what was wrong and what is expected. */
export class EndpointError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "EndpointError";
  }
}

/** Linux's `sizeof(sockaddr_un.sun_path)` is 108, with room for the terminating NUL (unix(7)). */
export const MAX_UNIX_PATH_BYTES = 107;

const EXPECTED = "expected HOST:PORT, [IPV6]:PORT or unix:/PATH";

export function isUnixEndpoint(endpoint: Endpoint): endpoint is UnixEndpoint {
  return "path" in endpoint;
}

/** Checks a unix socket path the way the kernel would, so that the error comes before any bind or connect. */
export function checkUnixPath(path: string): void {
  if (!path.startsWith("/"))
    throw new EndpointError(
      `unix socket path "${path}" is not absolute: give the full path (unix:/run/vmprune/migration.sock); a relative path would depend on the working directory`,
    );
  if (path.includes("\0")) throw new EndpointError(`unix socket path "${path}" contains a NUL byte`);
  const bytes = Buffer.byteLength(path);
  if (bytes > MAX_UNIX_PATH_BYTES)
    throw new EndpointError(
      `unix socket path "${path}" is ${bytes} bytes, more than the kernel's ${MAX_UNIX_PATH_BYTES}: use a shorter path`,
    );
}

/** `HOST:PORT`, `[IPV6]:PORT`, `tcp:HOST:PORT`, `unix:/PATH` or `unix:///PATH` → an endpoint. */
export function parseEndpoint(text: string): Endpoint {
  const value = text.trim();
  if (value.startsWith("unix:")) {
    let path = value.slice("unix:".length);
    // libvirt writes unix:///PATH (a URI with an empty authority); unix://HOST/... names no local socket.
    if (path.startsWith("//")) {
      if (!path.startsWith("///"))
        throw new EndpointError(`"${text}": a unix socket is unix:/PATH or unix:///PATH, with no host`);
      path = path.slice(2);
    }
    if (path === "") throw new EndpointError(`"${text}": the unix socket path is missing (unix:/PATH)`);
    checkUnixPath(path);
    return { path };
  }
  const tcp = value.startsWith("tcp:") ? value.slice("tcp:".length) : value;
  const m = /^(?:\[([^\]]+)\]|([^:[\]]+)):(\d+)$/.exec(tcp);
  if (!m) {
    if (/^[0-9a-fA-F:]+:\d+$/.test(tcp) && tcp.split(":").length > 2)
      throw new EndpointError(`"${text}": put an IPv6 address in brackets, e.g. [::1]:4444`);
    if (value.startsWith("/"))
      throw new EndpointError(`"${text}": a unix socket needs the unix: prefix, e.g. unix:${value}`);
    throw new EndpointError(`"${text}" is not an address: ${EXPECTED}`);
  }
  const host = m[1] ?? m[2] ?? "";
  const port = Number(m[3]);
  if (!Number.isInteger(port) || port > 65535)
    throw new EndpointError(`"${text}": port ${m[3]} is out of range (0-65535)`);
  return { host, port };
}

/** The text form parseEndpoint reads back: `HOST:PORT`, `[IPV6]:PORT` or `unix:/PATH`. */
export function formatEndpoint(endpoint: Endpoint): string {
  if (isUnixEndpoint(endpoint)) return `unix:${endpoint.path}`;
  return endpoint.host.includes(":")
    ? `[${endpoint.host}]:${endpoint.port}`
    : `${endpoint.host}:${endpoint.port}`;
}

/** The URI QEMU's `migrate` / `-incoming` take for this endpoint: `tcp:HOST:PORT` or `unix:/PATH`. */
export function qemuMigrationUri(endpoint: Endpoint): string {
  return isUnixEndpoint(endpoint) ? `unix:${endpoint.path}` : `tcp:${formatEndpoint(endpoint)}`;
}
