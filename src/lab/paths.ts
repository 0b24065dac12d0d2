import { join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

/** The repository root (this file lives in src/lab/ or, compiled, dist/lab/). */
export const REPO_ROOT = resolve(fileURLToPath(new URL("../../", import.meta.url)));

/** Where lab artefacts (apt lists, kernels, QEMU 10.0, guest images) are cached; git-ignored. */
export function labDir(): string {
  return process.env.VMPRUNE_LAB_DIR ?? join(REPO_ROOT, ".cache", "lab");
}

/** Sources of the guest programs compiled into the initramfs. */
export const GUEST_SOURCES_DIR = join(REPO_ROOT, "src", "lab", "guest");
