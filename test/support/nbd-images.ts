/**
 * Disk images for the NBD tests, made with QEMU's own tools: a raw base, a qcow2 overlay on it with some blocks
 * rewritten (qemu-io), and the overlay flattened (qemu-img convert -O raw): what the guest sees, byte for byte.
 */
import { execFileSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import { existsSync } from "node:fs";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";

export const QEMU_TOOLS = ["qemu-img", "qemu-io", "qemu-nbd"] as const;

/** Why the tests cannot run here, or null. */
export function missingQemuTools(): string | null {
  const missing = QEMU_TOOLS.filter(
    (tool) => !["/usr/bin", "/usr/local/bin"].some((d) => existsSync(join(d, tool))),
  );
  return missing.length > 0 ? `${missing.join(", ")} not installed (apt-get install qemu-utils)` : null;
}

export interface NbdImages {
  dir: string;
  base: string;
  /** qcow2, backing file `base` (raw). */
  top: string;
  /** `top` as the guest sees it. */
  flat: Buffer;
  /** Byte ranges written into `top` (the rest comes from `base`). */
  written: { offset: number; length: number }[];
  sizeBytes: number;
}

/** 4 MiB + 3 pages + 512 bytes: not a whole number of 64 KiB clusters, and a last block that is a sector. */
export const IMAGE_BYTES = 4 * 1024 * 1024 + 3 * 4096 + 512;

export async function makeImages(t: { after: (fn: () => Promise<void>) => void }): Promise<NbdImages> {
  const dir = await mkdtemp(join(tmpdir(), "vmprune-nbd-"));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const base = join(dir, "base.raw");
  const top = join(dir, "top.qcow2");
  await writeFile(base, randomBytes(IMAGE_BYTES));
  execFileSync("qemu-img", ["create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", top]);
  // A whole cluster, a page inside a cluster, a sector-aligned odd run across a cluster boundary, the last sector.
  const written = [
    { offset: 1024 * 1024, length: 65536 },
    { offset: 2 * 1024 * 1024 + 8192, length: 4096 },
    { offset: 3 * 65536 - 1536, length: 3584 },
    { offset: IMAGE_BYTES - 512, length: 512 },
  ];
  const commands = written.flatMap((w, i) => [
    "-c",
    `write -P 0x${(0xa1 + i).toString(16)} ${w.offset} ${w.length}`,
  ]);
  execFileSync("qemu-io", ["-f", "qcow2", ...commands, top], { stdio: "ignore" });
  const flatPath = join(dir, "flat.raw");
  execFileSync("qemu-img", ["convert", "-f", "qcow2", "-O", "raw", top, flatPath]);
  const flat = await readFile(flatPath);
  return { dir, base, top, flat, written, sizeBytes: IMAGE_BYTES };
}
