/**
 * The two QEMU versions the lab runs: 7.2 (Debian 12's qemu-system-x86, installed with apt) and 10.0
 * (bookworm-backports' qemu-system-x86, extracted from its .deb into the lab folder beside 7.2, with the
 * backports SeaBIOS it requires, never installed over the system's).
 */
import { existsSync } from "node:fs";
import { join } from "node:path";
import { extractDeb, labApt } from "./apt.ts";
import { cachedBuild } from "./cache.ts";
import { run } from "./exec.ts";
import { labDir } from "./paths.ts";

export const QEMU_VERSIONS = ["7.2", "10.0"] as const;
export type QemuVersion = (typeof QEMU_VERSIONS)[number];

export function isQemuVersion(value: string): value is QemuVersion {
  return (QEMU_VERSIONS as readonly string[]).includes(value);
}

export interface QemuBinary {
  version: QemuVersion;
  /** Full version string, e.g. "10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)". */
  fullVersion: string;
  binary: string;
  /** Passed as -L, in order: firmware (SeaBIOS, option ROMs) for this binary. */
  firmwareDirs: string[];
  /** Environment for the process (module directory of an extracted QEMU). */
  env: Record<string, string>;
}

const SYSTEM_QEMU = "/usr/bin/qemu-system-x86_64";

async function versionOf(binary: string, env: Record<string, string> = {}): Promise<string> {
  const out = await run(binary, ["--version"], { env: { ...process.env, ...env } });
  const match = /QEMU emulator version (\S+(?: \([^)]*\))?)/.exec(out);
  if (!match?.[1]) throw new Error(`${binary} --version printed no QEMU version: ${out.slice(0, 200)}`);
  return match[1];
}

export async function ensureQemu(version: QemuVersion): Promise<QemuBinary> {
  if (version === "7.2") {
    if (!existsSync(SYSTEM_QEMU)) {
      throw new Error(
        `QEMU 7.2 not found at ${SYSTEM_QEMU}: install it with 'apt-get install qemu-system-x86' (or run scripts/setup.sh)`,
      );
    }
    const fullVersion = await versionOf(SYSTEM_QEMU);
    if (!fullVersion.startsWith("7.2.")) {
      throw new Error(
        `${SYSTEM_QEMU} is QEMU ${fullVersion}, not 7.2: the lab expects Debian 12's qemu-system-x86`,
      );
    }
    return { version, fullVersion, binary: SYSTEM_QEMU, firmwareDirs: [], env: {} };
  }
  const apt = await labApt();
  const release = apt.backports;
  const packages = ["qemu-system-x86", "qemu-system-data", "qemu-system-common", "seabios"];
  const versions = await Promise.all(packages.map((p) => apt.candidateVersion(p, release)));
  if (!versions[0]?.includes(":10.0.")) {
    throw new Error(`${release} offers qemu-system-x86 ${versions[0]}, not 10.0: update the lab's QEMU pin`);
  }
  const { dir } = await cachedBuild(join(labDir(), "qemu-10.0"), { packages, versions }, async (tmp) => {
    for (const p of packages) {
      const deb = await apt.download(p, release, join(tmp, "debs"));
      await extractDeb(deb, join(tmp, "root"));
    }
    await run("rm", ["-rf", join(tmp, "debs")]);
  });
  const root = join(dir, "root");
  const env = { QEMU_MODULE_DIR: join(root, "usr", "lib", "x86_64-linux-gnu", "qemu") };
  const binary = join(root, "usr", "bin", "qemu-system-x86_64");
  return {
    version,
    fullVersion: await versionOf(binary, env),
    binary,
    firmwareDirs: [join(root, "usr", "share", "seabios"), join(root, "usr", "share", "qemu")],
    env,
  };
}
