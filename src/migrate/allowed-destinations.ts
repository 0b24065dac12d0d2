/**
 * Which destination QEMUs a receive service may connect to, and the name → address rule (link/protocol.ts
 * "Channel claims"). send names a destination; the service connects only to one its operator allowed: a socket
 * in an allowed directory (`-incoming unix:DIR/NAME` on the destination QEMU, as libvirt's `--migrateuri
 * unix:///PATH` gives), or an address on the operator's list. Whoever holds the link's key can ask; only the
 * operator decides where guest memory may go.
 */
import { lstat } from "node:fs/promises";
import { join } from "node:path";
import { TARGET_NAME } from "../link/protocol.ts";
import {
  checkUnixPath,
  type Endpoint,
  EndpointError,
  formatEndpoint,
  isUnixEndpoint,
  parseEndpoint,
} from "../transport/endpoint.ts";

export interface AllowedDestinations {
  /** A directory of destination QEMUs' unix sockets: send names a socket file in it. */
  dir?: string;
  /** Addresses (TCP or unix:/PATH) send may name as they are written here. */
  addresses?: readonly Endpoint[];
}

export type Resolution = { endpoint: Endpoint } | { refused: string };

/** The allowed destinations as one line for errors and logs. */
export function describeAllowed(allowed: AllowedDestinations): string {
  const parts: string[] = [];
  if (allowed.dir) parts.push(`sockets in ${allowed.dir}`);
  if (allowed.addresses?.length) parts.push(allowed.addresses.map(formatEndpoint).join(", "));
  return parts.join("; ") || "none";
}

/**
 * The address for the destination send named, or why it is refused. A name in the directory must be a socket
 * there now (lstat: a symlink is refused, since it could point anywhere); a listed address is taken as it is.
 */
export async function resolveDestination(allowed: AllowedDestinations, target: string): Promise<Resolution> {
  const offer = `allowed here: ${describeAllowed(allowed)}`;
  if (target === "") return { refused: `send named no destination (give send --target NAME; ${offer})` };
  if (!TARGET_NAME.test(target)) return { refused: `${JSON.stringify(target)} is not a destination name` };
  for (const address of allowed.addresses ?? []) {
    const written = formatEndpoint(address);
    if (target === written || (isUnixEndpoint(address) && target === address.path))
      return { endpoint: address };
  }
  if (allowed.dir && target !== "." && target !== ".." && !looksLikeAddress(target)) {
    const path = join(allowed.dir, target);
    try {
      checkUnixPath(path);
    } catch (error) {
      return { refused: error instanceof EndpointError ? error.message : String(error) };
    }
    const stat = await lstat(path).catch(() => undefined);
    if (!stat)
      return {
        refused: `no socket ${path}: is the destination QEMU listening there (-incoming unix:${path})?`,
      };
    if (!stat.isSocket())
      return { refused: `${path} is not a socket (a symlink or a file is never followed); ${offer}` };
    return { endpoint: { path } };
  }
  return { refused: `destination ${JSON.stringify(target)} is not allowed; ${offer}` };
}

/** HOST:PORT or [IPV6]:PORT (not a socket file name). */
function looksLikeAddress(target: string): boolean {
  try {
    return !isUnixEndpoint(parseEndpoint(target));
  } catch {
    return false;
  }
}
