/**
 * A private apt configuration: the system's own Debian sources plus `<codename>-backports` (and deb-src lines),
 * with its own package lists and cache under the lab's folder. The system's sources are never edited, and no
 * mirror address is written here: the backports entry reuses the URI and keyring of the system's entry for the
 * release, so the lab reaches exactly the registry the machine is configured for.
 */
import { existsSync } from "node:fs";
import { mkdir, readdir, readFile, rename, stat, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { run } from "./exec.ts";
import { labDir } from "./paths.ts";

export interface SourceEntry {
  types: string[];
  uris: string[];
  suites: string[];
  components: string[];
  signedBy?: string;
}

/** Parses a deb822 `.sources` file (stanzas separated by blank lines). */
export function parseDeb822Sources(text: string): SourceEntry[] {
  const entries: SourceEntry[] = [];
  for (const stanza of text.split(/\n\s*\n/)) {
    const fields = new Map<string, string>();
    for (const line of stanza.split("\n")) {
      if (line.startsWith("#") || !line.includes(":")) continue;
      const at = line.indexOf(":");
      fields.set(line.slice(0, at).trim().toLowerCase(), line.slice(at + 1).trim());
    }
    if (fields.get("enabled") === "no" || !fields.has("uris") || !fields.has("suites")) continue;
    const words = (key: string) => (fields.get(key) ?? "").split(/\s+/).filter(Boolean);
    const signedBy = fields.get("signed-by");
    entries.push({
      types: words("types"),
      uris: words("uris"),
      suites: words("suites"),
      components: words("components"),
      ...(signedBy ? { signedBy } : {}),
    });
  }
  return entries;
}

/** Parses one-line style `sources.list` entries (`deb [opts] URI SUITE COMPONENT...`). */
export function parseOneLineSources(text: string): SourceEntry[] {
  const entries: SourceEntry[] = [];
  for (const raw of text.split("\n")) {
    const line = raw.replace(/#.*/, "").trim();
    const match = /^(deb|deb-src)\s+(?:\[([^\]]*)\]\s+)?(\S+)\s+(\S+)\s*(.*)$/.exec(line);
    if (!match) continue;
    const [, type = "deb", options = "", uri = "", suite = "", components = ""] = match;
    const signedBy = /signed-by=(\S+)/.exec(options)?.[1];
    entries.push({
      types: [type],
      uris: [uri],
      suites: [suite],
      components: components.split(/\s+/).filter(Boolean),
      ...(signedBy ? { signedBy } : {}),
    });
  }
  return entries;
}

/** The deb822 stanza for the release's backports suite, derived from the system's entry for the release. */
export function backportsStanza(entries: readonly SourceEntry[], codename: string): string {
  const base = entries.find((e) => e.types.includes("deb") && e.suites.includes(codename));
  if (!base) {
    throw new Error(
      `no apt source for Debian '${codename}' in /etc/apt: the lab needs the system's Debian mirror to add ${codename}-backports`,
    );
  }
  const signedBy = base.signedBy ? [`Signed-By: ${base.signedBy}`] : [];
  const stanza = (types: string, suites: string) =>
    [
      `Types: ${types}`,
      `URIs: ${base.uris.join(" ")}`,
      `Suites: ${suites}`,
      "Components: main",
      ...signedBy,
    ].join("\n");
  // deb-src for the release itself too, so QEMU's and Linux's Debian sources can be read with `apt-get source`.
  return `${stanza("deb deb-src", `${codename}-backports`)}\n\n${stanza("deb-src", codename)}\n`;
}

export async function debianCodename(): Promise<string> {
  const osRelease = await readFile("/etc/os-release", "utf8");
  const codename = /^VERSION_CODENAME=(\S+)$/m.exec(osRelease)?.[1];
  if (!codename) throw new Error("cannot tell the Debian release from /etc/os-release (VERSION_CODENAME)");
  return codename;
}

const LISTS_MAX_AGE_MS = 24 * 3600_000;

/**
 * Writes a sources file only if its content changed, and then atomically (temporary file + rename): another
 * process's apt-cache may be reading it at this moment (two lab builds at once, or a benchmark and its child),
 * and a truncated sources file makes apt forget the backports release mid-run.
 */
async function writeIfChanged(path: string, text: string): Promise<void> {
  if (existsSync(path) && (await readFile(path, "utf8")) === text) return;
  const temporary = `${path}.${process.pid}.tmp`;
  await writeFile(temporary, text);
  await rename(temporary, path);
}

export class PrivateApt {
  private prepared = false;

  constructor(
    /** Folder holding the private sources, lists and cache. */
    readonly root: string,
    readonly codename: string,
  ) {}

  static async forHost(root: string): Promise<PrivateApt> {
    return new PrivateApt(root, await debianCodename());
  }

  get backports(): string {
    return `${this.codename}-backports`;
  }

  private options(defaultRelease?: string): string[] {
    const opts = [
      "-o",
      "Dir::Etc::SourceList=/dev/null",
      "-o",
      `Dir::Etc::SourceParts=${join(this.root, "sources.list.d")}`,
      "-o",
      `Dir::State::Lists=${join(this.root, "lists")}`,
      "-o",
      `Dir::Cache=${join(this.root, "cache")}`,
      "-o",
      "APT::Sandbox::User=root",
      "-o",
      "Acquire::Retries=3",
    ];
    if (defaultRelease) opts.push("-o", `APT::Default-Release=${defaultRelease}`);
    return opts;
  }

  /** Writes the private sources (system entries + backports) and refreshes lists older than a day. */
  async prepare(forceUpdate = false): Promise<void> {
    if (this.prepared && !forceUpdate) return;
    const partsDir = join(this.root, "sources.list.d");
    await mkdir(join(this.root, "lists", "partial"), { recursive: true });
    await mkdir(join(this.root, "cache", "archives", "partial"), { recursive: true });
    await mkdir(partsDir, { recursive: true });
    const entries: SourceEntry[] = [];
    const systemParts = "/etc/apt/sources.list.d";
    const files = existsSync(systemParts) ? await readdir(systemParts) : [];
    for (const name of files) {
      const text = await readFile(join(systemParts, name), "utf8");
      if (name.endsWith(".sources")) entries.push(...parseDeb822Sources(text));
      else if (name.endsWith(".list")) entries.push(...parseOneLineSources(text));
      else continue;
      await writeIfChanged(join(partsDir, `system-${name}`), text);
    }
    if (existsSync("/etc/apt/sources.list")) {
      const text = await readFile("/etc/apt/sources.list", "utf8");
      entries.push(...parseOneLineSources(text));
      await writeIfChanged(join(partsDir, "system-sources.list"), text);
    }
    await writeIfChanged(
      join(partsDir, "vmprune-backports.sources"),
      backportsStanza(entries, this.codename),
    );
    const stamp = join(this.root, "lists", "updated");
    const fresh = existsSync(stamp) && Date.now() - (await stat(stamp)).mtimeMs < LISTS_MAX_AGE_MS;
    if (forceUpdate || !fresh) {
      await run("apt-get", [...this.options(), "-q", "update"], { timeoutMs: 300_000 });
      await writeFile(stamp, new Date().toISOString());
    }
    this.prepared = true;
  }

  /** The concrete package a meta-package depends on in `release` (e.g. linux-image-cloud-amd64 → linux-image-6.1.0-NN-cloud-amd64). */
  async resolveMetaPackage(meta: string, prefix: string, release?: string): Promise<string> {
    await this.prepare();
    const out = await run("apt-cache", [...this.options(release), "depends", meta]);
    const dep = out
      .split("\n")
      .map((l) => /^\s*Depends:\s*(\S+)/.exec(l)?.[1])
      .find((name) => name?.startsWith(prefix));
    if (!dep)
      throw new Error(
        `apt: ${meta} in ${release ?? "the default release"} depends on no ${prefix}* package:\n${out}`,
      );
    return dep;
  }

  /** The candidate version of `pkg`: with `release`, as if it were the default release; else apt's usual pick. */
  async candidateVersion(pkg: string, release?: string): Promise<string> {
    await this.prepare();
    const out = await run("apt-cache", [...this.options(release), "policy", pkg]);
    const version = /Candidate:\s*(\S+)/.exec(out)?.[1];
    if (!version || version === "(none)")
      throw new Error(`apt: no candidate for ${pkg} in ${release ?? "the default release"}`);
    return version;
  }

  /** Downloads `pkg` (as `release` prefers it) into `destDir`; returns the .deb path. Retries once after an update. */
  async download(pkg: string, release: string | undefined, destDir: string): Promise<string> {
    await this.prepare();
    await mkdir(destDir, { recursive: true });
    const version = await this.candidateVersion(pkg, release);
    const fetch = () =>
      run("apt-get", [...this.options(release), "-q", "download", `${pkg}=${version}`], { cwd: destDir });
    try {
      await fetch();
    } catch {
      await this.prepare(true);
      await fetch();
    }
    const wanted = `${pkg}_${version.replace(":", "%3a")}_`;
    const deb = (await readdir(destDir)).find((f) => f.startsWith(wanted) && f.endsWith(".deb"));
    if (!deb) throw new Error(`apt: downloaded ${pkg}=${version} but found no ${wanted}*.deb in ${destDir}`);
    return join(destDir, deb);
  }
}

/** Extracts a .deb's files (not its maintainer scripts) into `destDir`. */
export async function extractDeb(debPath: string, destDir: string): Promise<void> {
  await mkdir(destDir, { recursive: true });
  await run("dpkg-deb", ["-x", debPath, destDir]);
}

let labAptPromise: Promise<PrivateApt> | undefined;

/** The lab's private apt configuration, under the lab folder. */
export function labApt(): Promise<PrivateApt> {
  labAptPromise ??= PrivateApt.forHost(join(labDir(), "apt"));
  return labAptPromise;
}
