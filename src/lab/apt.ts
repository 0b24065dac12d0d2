/**
 * Private apt configurations: the system's own Debian sources plus `<codename>-backports` (and deb-src lines),
 * or the suites of other Debian releases alone (the guest kernels of bullseye, trixie-backports, sid...), each
 * with its own package lists and cache under the lab's folder. The system's sources are never edited, and no
 * mirror address is written here: the added entries reuse the URI and keyring of the system's entry for the
 * release, so the lab reaches exactly the registry the machine is configured for. Packages are only downloaded
 * (and extracted by the caller), never installed.
 */
import { randomBytes } from "node:crypto";
import { existsSync } from "node:fs";
import { mkdir, readdir, readFile, rename, rm, stat, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { withLock } from "./cache.ts";
import { CommandError, run } from "./exec.ts";
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

/**
 * deb822 stanzas for suites of other Debian releases (e.g. bullseye, trixie-backports, sid): on the mirror and
 * with the keyring of the system's entry for its own release, `-security` suites on those of the system's
 * `<codename>-security` entry (Debian keeps security updates in a separate archive). The keyring is the
 * system's too: bookworm's debian-archive-keyring (2023.3+deb12u2) holds the bullseye, bookworm and trixie
 * archive keys, and testing/unstable are signed with the two newest of them.
 */
export function releaseStanzas(
  entries: readonly SourceEntry[],
  codename: string,
  suites: readonly string[],
): string {
  const entryFor = (suite: string) => {
    const base = entries.find((e) => e.types.includes("deb") && e.suites.includes(suite));
    if (!base) {
      throw new Error(
        `no apt source for Debian '${suite}' in /etc/apt: the lab reuses its mirror to reach other releases' kernels`,
      );
    }
    return base;
  };
  const stanza = (base: SourceEntry, group: readonly string[]) =>
    [
      "Types: deb",
      `URIs: ${base.uris.join(" ")}`,
      `Suites: ${group.join(" ")}`,
      "Components: main",
      ...(base.signedBy ? [`Signed-By: ${base.signedBy}`] : []),
    ].join("\n");
  const security = suites.filter((s) => s.endsWith("-security"));
  const main = suites.filter((s) => !s.endsWith("-security"));
  const stanzas = [];
  if (main.length > 0) stanzas.push(stanza(entryFor(codename), main));
  if (security.length > 0) stanzas.push(stanza(entryFor(`${codename}-security`), security));
  return `${stanzas.join("\n\n")}\n`;
}

export async function debianCodename(): Promise<string> {
  const osRelease = await readFile("/etc/os-release", "utf8");
  const codename = /^VERSION_CODENAME=(\S+)$/m.exec(osRelease)?.[1];
  if (!codename) throw new Error("cannot tell the Debian release from /etc/os-release (VERSION_CODENAME)");
  return codename;
}

/**
 * The system's apt entries (sources.list.d/*.sources and *.list, then sources.list), as apt reads them: where
 * the lab's private configurations and the Debian guest's bootstrap find the machine's mirror and keyring.
 */
export async function systemSourceEntries(systemAptDir = "/etc/apt"): Promise<SourceEntry[]> {
  const entries: SourceEntry[] = [];
  const parts = join(systemAptDir, "sources.list.d");
  for (const name of existsSync(parts) ? (await readdir(parts)).sort() : []) {
    if (name.endsWith(".sources"))
      entries.push(...parseDeb822Sources(await readFile(join(parts, name), "utf8")));
    else if (name.endsWith(".list"))
      entries.push(...parseOneLineSources(await readFile(join(parts, name), "utf8")));
  }
  const sourcesList = join(systemAptDir, "sources.list");
  if (existsSync(sourcesList)) entries.push(...parseOneLineSources(await readFile(sourcesList, "utf8")));
  return entries;
}

/** Package lists older than this are refreshed (a day: the lab follows point and security updates). */
const LISTS_MAX_AGE_MS = 24 * 3600_000;

/**
 * Writes a sources file only if its content changed, and then atomically (temporary file + rename): another
 * process's apt-cache may be reading it at this moment (two lab builds at once, or a benchmark and its child),
 * and a truncated sources file makes apt forget the backports release mid-run. The temporary name is unique
 * per call, so concurrent writers (in this process or another) never rename each other's file away.
 */
async function writeIfChanged(path: string, text: string): Promise<void> {
  if (existsSync(path) && (await readFile(path, "utf8")) === text) return;
  const temporary = `${path}.${process.pid}-${randomBytes(6).toString("hex")}.tmp`;
  try {
    await writeFile(temporary, text);
    await rename(temporary, path);
  } catch (error) {
    await rm(temporary, { force: true });
    throw error;
  }
}

/** apt-get update's failure, with what to do when the cause is a release key the system does not have. */
function updateError(root: string, error: unknown): Error {
  const text = error instanceof CommandError ? error.stderr : String(error);
  if (/NO_PUBKEY|not signed|EXPKEYSIG/.test(text)) {
    return new Error(
      `apt-get update for ${root} cannot verify a release's signature (${text.trim().split("\n").slice(-2).join(" | ")}): ` +
        "the system's debian-archive-keyring lacks that release's key; upgrade debian-archive-keyring from the " +
        "system's own release (its point releases add the keys of newer Debian releases). Signature checks stay on.",
    );
  }
  return error instanceof Error ? error : new Error(text);
}

export interface PrivateAptOptions {
  /** The system's apt folder, whose sources give the mirror and keyring (default /etc/apt). */
  systemAptDir?: string;
  /** Copy the system's own sources into the private configuration too (default true). */
  includeSystemSources?: boolean;
  /** The lab's own sources file: its name and its content, derived from the system's entries. Default: backports. */
  added?: { file: string; stanzas: (entries: readonly SourceEntry[], codename: string) => string };
  /** Refresh stale package lists with apt-get update (default true; tests that check the sources turn it off). */
  update?: boolean;
}

export class PrivateApt {
  /** The one preparation every caller of this instance shares (ensureQemu asks for four versions at once). */
  private preparation: Promise<void> | undefined;
  /** A forced list refresh under way (downloads that failed retry after one), shared the same way. */
  private refresh: Promise<void> | undefined;
  private readonly systemAptDir: string;
  private readonly includeSystemSources: boolean;
  private readonly added: NonNullable<PrivateAptOptions["added"]>;
  private readonly update: boolean;

  constructor(
    /** Folder holding the private sources, lists and cache. */
    readonly root: string,
    readonly codename: string,
    options: PrivateAptOptions = {},
  ) {
    this.systemAptDir = options.systemAptDir ?? "/etc/apt";
    this.includeSystemSources = options.includeSystemSources ?? true;
    this.added = options.added ?? { file: "vmprune-backports.sources", stanzas: backportsStanza };
    this.update = options.update ?? true;
  }

  static async forHost(root: string): Promise<PrivateApt> {
    return new PrivateApt(root, await debianCodename());
  }

  /**
   * A configuration holding only `suites` of other Debian releases (on the system's mirror), apart from the
   * host's: its lists and its default-release choices then never change what the lab's main configuration
   * (the release and its backports, QEMU 10.0) resolves.
   */
  static async forReleases(root: string, suites: readonly string[]): Promise<PrivateApt> {
    return new PrivateApt(root, await debianCodename(), {
      includeSystemSources: false,
      added: {
        file: "vmprune-releases.sources",
        stanzas: (entries, codename) => releaseStanzas(entries, codename, suites),
      },
    });
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

  /**
   * Writes the private sources (system entries and/or the added ones) and refreshes lists older than a day.
   * Concurrent callers share one preparation; `forceUpdate` refreshes the lists even if they are fresh.
   */
  prepare(forceUpdate = false): Promise<void> {
    if (forceUpdate) {
      this.refresh ??= this.writeSourcesAndUpdate(true).finally(() => {
        this.refresh = undefined;
      });
      return this.refresh;
    }
    this.preparation ??= this.writeSourcesAndUpdate(false).catch((error: unknown) => {
      // A failed preparation (mirror down) is tried again by the next caller, not remembered.
      this.preparation = undefined;
      throw error;
    });
    return this.preparation;
  }

  private async writeSourcesAndUpdate(forceUpdate: boolean): Promise<void> {
    const requested = Date.now();
    const partsDir = join(this.root, "sources.list.d");
    await mkdir(join(this.root, "lists", "partial"), { recursive: true });
    await mkdir(join(this.root, "cache", "archives", "partial"), { recursive: true });
    await mkdir(partsDir, { recursive: true });
    const entries: SourceEntry[] = [];
    const systemParts = join(this.systemAptDir, "sources.list.d");
    const files = existsSync(systemParts) ? (await readdir(systemParts)).sort() : [];
    const copy = async (name: string, text: string) => {
      if (this.includeSystemSources) await writeIfChanged(join(partsDir, `system-${name}`), text);
    };
    for (const name of files) {
      const text = await readFile(join(systemParts, name), "utf8");
      if (name.endsWith(".sources")) entries.push(...parseDeb822Sources(text));
      else if (name.endsWith(".list")) entries.push(...parseOneLineSources(text));
      else continue;
      await copy(name, text);
    }
    const sourcesList = join(this.systemAptDir, "sources.list");
    if (existsSync(sourcesList)) {
      const text = await readFile(sourcesList, "utf8");
      entries.push(...parseOneLineSources(text));
      await copy("sources.list", text);
    }
    await writeIfChanged(join(partsDir, this.added.file), this.added.stanzas(entries, this.codename));
    if (!this.update) return;
    const stamp = join(this.root, "lists", "updated");
    const updatedSince = async (ms: number) => existsSync(stamp) && (await stat(stamp)).mtimeMs >= ms;
    if (!forceUpdate && (await updatedSince(Date.now() - LISTS_MAX_AGE_MS))) return;
    // apt-get refuses to run beside another apt-get on the same lists ("could not get lock"): other processes
    // (test files run in parallel) wait here, and then find the lists fresh instead of fetching them again.
    await withLock(join(this.root, "update.lock"), async () => {
      const fresh = forceUpdate
        ? await updatedSince(requested)
        : await updatedSince(Date.now() - LISTS_MAX_AGE_MS);
      if (fresh) return;
      await run("apt-get", [...this.options(), "-q", "update"], { timeoutMs: 300_000 }).catch(
        (error: unknown) => {
          throw updateError(this.root, error);
        },
      );
      await writeFile(stamp, new Date().toISOString());
    });
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

  /** Names of the packages whose name starts with `prefix`, in any suite of this configuration. */
  async packageNames(prefix: string): Promise<string[]> {
    await this.prepare();
    const out = await run("apt-cache", [...this.options(), "pkgnames", prefix]);
    return out.split("\n").filter(Boolean).sort();
  }

  /** The versions of `pkg` this configuration's suites offer (none if it has no such package). */
  async versions(pkg: string): Promise<string[]> {
    await this.prepare();
    const out = await run("apt-cache", [...this.options(), "madison", pkg]);
    return out
      .split("\n")
      .map((line) => line.split("|").map((field) => field.trim()))
      .filter(([name]) => name === pkg)
      .map(([, version]) => version ?? "");
  }

  /** The packages `pkg` at `version` depends on (Depends and Pre-Depends, every alternative, no versions). */
  async dependencies(pkg: string, version: string): Promise<string[]> {
    await this.prepare();
    return parseDependsFields(await run("apt-cache", [...this.options(), "show", `${pkg}=${version}`]));
  }

  /**
   * Downloads `pkg` into `destDir`: `version` if given, else the candidate as `release` prefers it; returns the
   * .deb path. Retries once after an update.
   */
  async download(
    pkg: string,
    release: string | undefined,
    destDir: string,
    version?: string,
  ): Promise<string> {
    await this.prepare();
    await mkdir(destDir, { recursive: true });
    version ??= await this.candidateVersion(pkg, release);
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

/**
 * The package names in the Depends and Pre-Depends fields of `apt-cache show` output's first stanza: every
 * alternative of `a (>= 1) | b`, without version constraints or architecture qualifiers.
 */
export function parseDependsFields(showOutput: string): string[] {
  const [stanza = ""] = showOutput.split(/\n\s*\n/);
  const names: string[] = [];
  for (const line of stanza.split("\n")) {
    const match = /^(?:Pre-)?Depends:\s*(.*)$/.exec(line);
    if (!match?.[1]) continue;
    for (const alternative of match[1].split(/[,|]/)) {
      const name = /^\s*([^\s(:]+)/.exec(alternative)?.[1];
      if (name) names.push(name);
    }
  }
  return names;
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
