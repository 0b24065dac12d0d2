/**
 * Certificates for tests, made by the `openssl` command in QEMU's and libvirt's directory layout (ca-cert.pem,
 * server-cert.pem/server-key.pem, client-cert.pem/client-key.pem): one good pair, and the ways a peer can be
 * wrong (another CA, expired, another name, no certificate).
 */
import { execFileSync } from "node:child_process";
import { copyFileSync, mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";

function openssl(cwd: string, ...args: string[]): void {
  execFileSync("openssl", args, { cwd, stdio: ["ignore", "ignore", "pipe"] });
}

const EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];

/** A certificate signed by CA `ca` (files ca-key.pem/ca-cert.pem style names in `dir`); days < 0: expired. */
function makeCert(dir: string, ca: string, out: string, cn: string, ext: string, days: number): void {
  writeFileSync(join(dir, `${out}.ext`), ext);
  openssl(dir, "req", "-new", ...EC, "-keyout", `${out}-key.pem`, "-out", `${out}.csr`, "-subj", `/CN=${cn}`);
  openssl(
    dir,
    "x509",
    "-req",
    "-in",
    `${out}.csr`,
    "-CA",
    `${ca}-cert.pem`,
    "-CAkey",
    `${ca}-key.pem`,
    "-CAcreateserial",
    "-out",
    `${out}-cert.pem`,
    "-days",
    String(days),
    "-extfile",
    `${out}.ext`,
  );
}

export interface Pki {
  /** Directories in QEMU's layout. */
  server: string;
  client: string;
  /** A client whose certificate another CA signed. */
  otherCaClient: string;
  /** A client whose certificate has expired. */
  expiredClient: string;
  /** A server whose certificate another CA signed. */
  otherCaServer: string;
  /** A server whose certificate names another host. */
  wrongNameServer: string;
  /** Only ca-cert.pem: for a client that presents no certificate. */
  caOnly: string;
}

const SERVER_EXT = "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n";
const CLIENT_EXT = "extendedKeyUsage=clientAuth\n";

/** All directories under `root`; the server certificates name localhost and 127.0.0.1. */
export function makePki(root: string): Pki {
  const work = join(root, "work");
  mkdirSync(work);
  // -subj for the CAs: req -x509 without it would prompt.
  openssl(
    work,
    "req",
    "-x509",
    ...EC,
    "-keyout",
    "ca-key.pem",
    "-out",
    "ca-cert.pem",
    "-days",
    "2",
    "-subj",
    "/CN=vmprune test CA",
  );
  openssl(
    work,
    "req",
    "-x509",
    ...EC,
    "-keyout",
    "other-key.pem",
    "-out",
    "other-cert.pem",
    "-days",
    "2",
    "-subj",
    "/CN=another CA",
  );
  makeCert(work, "ca", "server", "localhost", SERVER_EXT, 2);
  makeCert(work, "ca", "client", "source-host", CLIENT_EXT, 2);
  makeCert(work, "other", "other-client", "intruder", CLIENT_EXT, 2);
  makeCert(work, "other", "other-server", "localhost", SERVER_EXT, 2);
  makeCert(work, "ca", "expired-client", "source-host", CLIENT_EXT, -1);
  makeCert(work, "ca", "wrong-name-server", "elsewhere", "subjectAltName=DNS:elsewhere.example\n", 2);
  const layout = (name: string, files: Record<string, string>, ca = "ca-cert.pem"): string => {
    const dir = join(root, name);
    mkdirSync(dir);
    copyFileSync(join(work, ca), join(dir, "ca-cert.pem"));
    for (const [to, from] of Object.entries(files)) copyFileSync(join(work, from), join(dir, to));
    return dir;
  };
  const server = (prefix: string) => ({
    "server-cert.pem": `${prefix}-cert.pem`,
    "server-key.pem": `${prefix}-key.pem`,
  });
  const client = (prefix: string) => ({
    "client-cert.pem": `${prefix}-cert.pem`,
    "client-key.pem": `${prefix}-key.pem`,
  });
  return {
    server: layout("server", server("server")),
    client: layout("client", client("client")),
    // Trusts receive (our CA), so that the refusal tested is receive's: its own certificate is the other CA's.
    otherCaClient: layout("other-client", client("other-client")),
    expiredClient: layout("expired-client", client("expired-client")),
    otherCaServer: layout("other-server", server("other-server"), "other-cert.pem"),
    wrongNameServer: layout("wrong-name-server", server("wrong-name-server")),
    caOnly: layout("ca-only", {}),
  };
}
