/**
 * A unix socket's owner and mode as an operator writes them (`qemu:kvm`, `0660`), turned into what chown(2) and
 * chmod(2) take. Names are resolved with getent(1), so users from NSS (LDAP, systemd's DynamicUser) count as well
 * as /etc/passwd's.
 */
import { execFileSync } from "node:child_process";
import { EndpointError } from "./endpoint.ts";

/** Looks a name up in an NSS database ("passwd" or "group"); its numeric id, or null if unknown. */
function lookUp(database: "passwd" | "group", name: string): number | null {
  let line: string;
  try {
    line = execFileSync("getent", [database, name], {
      encoding: "utf8",
      stdio: ["ignore", "pipe", "ignore"],
    });
  } catch (error) {
    // getent exits with 2 for "not found"; anything else (getent missing) is reported.
    if ((error as { status?: number }).status === 2) return null;
    throw new EndpointError(
      `cannot look up ${database === "passwd" ? "user" : "group"} "${name}": ${String(error)}`,
    );
  }
  const id = Number(line.split(":")[2]);
  return Number.isInteger(id) && id >= 0 ? id : null;
}

function resolveId(database: "passwd" | "group", text: string): number {
  if (/^\d+$/.test(text)) return Number(text);
  const id = lookUp(database, text);
  const what = database === "passwd" ? "user" : "group";
  if (id === null)
    throw new EndpointError(
      `unknown ${what} "${text}": give an existing ${what} name or a numeric ${what === "user" ? "uid" : "gid"}`,
    );
  return id;
}

/**
 * `USER`, `USER:GROUP` or `:GROUP` (names or numbers), as chown(1) reads them → the ids to set; a part left out
 * stays as it is.
 */
export function parseSocketOwner(text: string): { uid?: number; gid?: number } {
  const [user = "", group, ...rest] = text.split(":");
  if (rest.length > 0 || (user === "" && !group))
    throw new EndpointError(`"${text}" is not an owner: expected USER, USER:GROUP or :GROUP`);
  return {
    ...(user !== "" ? { uid: resolveId("passwd", user) } : {}),
    ...(group ? { gid: resolveId("group", group) } : {}),
  };
}

/** An octal mode such as `0660` or `660` (permission bits only) → its number. */
export function parseSocketMode(text: string): number {
  if (!/^0?[0-7]{3}$/.test(text))
    throw new EndpointError(`"${text}" is not a socket mode: expected octal permission bits such as 0660`);
  return Number.parseInt(text, 8);
}
