/**
 * The guest's ext4 data disk: files of known content (the workload pattern, seeded by each file's name, written
 * by `vmwork gen` on the host) so that the guest can verify what it reads, made with `mkfs.ext4 -d`.
 * Source and destination VM share one copy of it, as they would share storage in production.
 */
import { mkdir } from "node:fs/promises";
import { join } from "node:path";
import { run } from "./exec.ts";

export interface DataDiskLayout {
  /** Files under /data/files in the guest. */
  fileCount: number;
  fileSizeMiB: number;
  /** Image size; the rest is room for `dirty-files`. */
  imageSizeMiB: number;
}

export const DATA_DISK_LAYOUT: DataDiskLayout = { fileCount: 12, fileSizeMiB: 16, imageSizeMiB: 384 };

/** Guest paths of the data files, e.g. /data/files/f00. */
export function dataFilePaths(layout: DataDiskLayout = DATA_DISK_LAYOUT): string[] {
  return Array.from({ length: layout.fileCount }, (_, i) => `/data/files/f${String(i).padStart(2, "0")}`);
}

export async function buildDataDisk(
  vmwork: string,
  outPath: string,
  layout: DataDiskLayout = DATA_DISK_LAYOUT,
): Promise<void> {
  const stage = `${outPath}.stage`;
  await run("rm", ["-rf", stage]);
  await mkdir(join(stage, "files"), { recursive: true });
  await mkdir(join(stage, "scratch"), { recursive: true });
  for (const guestPath of dataFilePaths(layout)) {
    await run(vmwork, ["gen", join(stage, guestPath.replace(/^\/data\//, "")), `${layout.fileSizeMiB}M`]);
  }
  await run("mkfs.ext4", [
    "-q",
    "-F",
    "-L",
    "vmdata",
    "-E",
    "root_owner=0:0",
    "-d",
    stage,
    outPath,
    `${layout.imageSizeMiB}M`,
  ]);
  await run("rm", ["-rf", stage]);
}
