/**
 * What the benchmarks share: the median of their runs, the guest/QEMU/runs options of the lab ones, and the check
 * that setup has run before they start.
 */
import { accessSync, constants, existsSync } from "node:fs";
import { delimiter, join } from "node:path";
import { isKernelId, KERNEL_IDS, type KernelId } from "../src/lab/kernels.ts";
import { labDir } from "../src/lab/paths.ts";
import { isQemuVersion, type QemuVersion } from "../src/lab/qemu-binaries.ts";

/** The median (the mean of the middle two for an even count); 0 for no values. */
export function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  return sorted.length % 2 === 1 ? (sorted[mid] ?? 0) : ((sorted[mid - 1] ?? 0) + (sorted[mid] ?? 0)) / 2;
}

/** parseArgs options for --kernel, --qemu and --runs, with the benchmarks' defaults. */
export const LAB_OPTIONS = {
  kernel: { type: "string", default: "6.1" },
  qemu: { type: "string", default: "10.0" },
  runs: { type: "string", default: "3" },
} as const;

/** Checks --kernel, --qemu and --runs; errors name the bad value and repeat `usage`. */
export function labTarget(
  values: { kernel: string; qemu: string; runs: string },
  usage: string,
): { kernel: KernelId; qemu: QemuVersion; runs: number } {
  const runs = Number(values.runs);
  if (!isKernelId(values.kernel)) throw new Error(`unknown kernel ${values.kernel} (${usage})`);
  if (!isQemuVersion(values.qemu)) throw new Error(`unknown QEMU ${values.qemu} (${usage})`);
  if (!Number.isInteger(runs) || runs < 1) throw new Error(`--runs needs a positive integer (${usage})`);
  return { kernel: values.kernel, qemu: values.qemu, runs };
}

/**
 * What a benchmark needs before it starts. Each one checks this first (requireSetup), so that on a checkout
 * where `scripts/setup.sh` has not run it says so in one line instead of failing minutes later, deep in a build
 * or a boot. The lab's artefacts are looked for where setup builds them; they are not built here, because that
 * needs the Debian packages and the network that setup.sh provides.
 */
export interface BenchNeeds {
  /** Guest kernels it boots (their images in the lab folder); the data disk comes with them. */
  guests?: readonly KernelId[];
  /** QEMU versions it runs: 7.2 is Debian's, 10.0 is extracted into the lab folder. */
  qemu?: readonly QemuVersion[];
  /** Host commands it runs itself. */
  commands?: readonly string[];
  /** It creates network namespaces, which only root may. */
  root?: boolean;
}

/** What requireSetup looks at, apart from the host, for tests. */
export interface SetupProbe {
  labDir: string;
  exists(path: string): boolean;
  onPath(command: string): boolean;
  isRoot: boolean;
}

/** Debian 12's QEMU 7.2 (scripts/setup.sh installs qemu-system-x86). */
const SYSTEM_QEMU = "/usr/bin/qemu-system-x86_64";

/** What of `needs` is missing, named for a user ("the 6.1 guest image", "socat"); empty when all is there. */
export function missingSetup(needs: BenchNeeds, probe: SetupProbe): string[] {
  const missing: string[] = [];
  const lab = (...parts: string[]) => probe.exists(join(probe.labDir, ...parts));
  // setup.sh builds the images of KERNEL_IDS; the other kernels' are built on their first boot, which needs only
  // what setup installs (its data disk stands for that).
  for (const kernel of needs.guests ?? [])
    if (isSetupKernel(kernel) && !lab("images", kernel, "initrd.cpio"))
      missing.push(`the ${kernel} guest image`);
  if ((needs.guests ?? []).length > 0 && !lab("data-disk", "data.img")) missing.push("the guest data disk");
  for (const version of needs.qemu ?? []) {
    if (version === "7.2" && !probe.exists(SYSTEM_QEMU)) missing.push(`QEMU 7.2 (${SYSTEM_QEMU})`);
    if (version === "10.0" && !lab("qemu-10.0", "root", "usr", "bin", "qemu-system-x86_64"))
      missing.push("QEMU 10.0");
  }
  for (const command of needs.commands ?? []) if (!probe.onPath(command)) missing.push(command);
  return missing;
}

function isSetupKernel(kernel: KernelId): boolean {
  return (KERNEL_IDS as readonly string[]).includes(kernel);
}

/** The one line that says what to run first, or null when `bench` can run. */
export function setupAdvice(bench: string, needs: BenchNeeds, probe: SetupProbe): string | null {
  const missing = missingSetup(needs, probe);
  if (missing.length > 0)
    return `${bench} cannot run yet (missing: ${missing.join(", ")}): run \`bash scripts/setup.sh\` first, as root`;
  if (needs.root && !probe.isRoot) return `${bench} creates network namespaces: run it as root`;
  return null;
}

/** The host as it is: the lab folder, files, commands on PATH, the user. */
export function hostProbe(): SetupProbe {
  const executable = (path: string) => {
    try {
      accessSync(path, constants.X_OK);
      return true;
    } catch {
      return false;
    }
  };
  const path = (process.env.PATH ?? "").split(delimiter).filter((dir) => dir.length > 0);
  return {
    labDir: labDir(),
    exists: existsSync,
    onPath: (command) => path.some((dir) => executable(join(dir, command))),
    isRoot: process.getuid?.() === 0,
  };
}

/** Exits with the one line of advice when `bench` cannot run on this host yet; returns when it can. */
export function requireSetup(bench: string, needs: BenchNeeds): void {
  const advice = setupAdvice(bench, needs, hostProbe());
  if (advice === null) return;
  process.stderr.write(`${advice}\n`);
  process.exit(1);
}
