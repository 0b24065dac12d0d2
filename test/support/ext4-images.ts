/**
 * Real ext4 images for tests, made and read back with e2fsprogs (mkfs.ext4, debugfs): the oracle for where ext4
 * put a file's blocks is debugfs's own `bmap`, and a file's extent root (i_block) comes from `inode_dump -b`.
 */
import { writeFile } from "node:fs/promises";
import { join } from "node:path";
import { run } from "../../src/lab/exec.ts";

/** Runs debugfs commands in one process (`-f`), returning each command's output lines. */
export async function debugfs(image: string, commands: readonly string[], write = false): Promise<string[]> {
  const script = `${image}.debugfs-${process.pid}-${Math.random().toString(36).slice(2)}`;
  await writeFile(script, `${commands.join("\n")}\n`);
  const out = await run("debugfs", [...(write ? ["-w"] : []), "-f", script, image]);
  await run("rm", ["-f", script]);
  // With -f, debugfs echoes each command as "debugfs: CMD" before its output.
  const results: string[] = [];
  let current: string[] | null = null;
  for (const line of out.split("\n")) {
    if (line.startsWith("debugfs: ")) {
      if (current) results.push(current.join("\n"));
      current = [];
    } else current?.push(line);
  }
  if (current) results.push(current.join("\n"));
  return results;
}

/** debugfs's physical block of each logical block (0 = hole); `unwritten` marks "(uninit)" answers. */
export async function bmap(
  image: string,
  file: string,
  blocks: number,
): Promise<{ physical: number; unwritten: boolean }[]> {
  const cmds = Array.from({ length: blocks }, (_, i) => `bmap ${file} ${i}`);
  return (await debugfs(image, cmds)).map((text) => {
    const m = /^(\d+)( \(uninit\))?/.exec(text.trim());
    if (!m) throw new Error(`debugfs bmap printed ${JSON.stringify(text)}`);
    return { physical: Number(m[1]), unwritten: m[2] !== undefined };
  });
}

/** The inode's 60 bytes of i_block (the extent root or block map), from `debugfs inode_dump -b`. */
export async function iBlock(image: string, file: string): Promise<Buffer> {
  const [text = ""] = await debugfs(image, [`inode_dump -b ${file}`]);
  // hexdump style: octal offsets, 16 bytes a line, "*" for lines repeating the one before.
  const bytes: number[] = [];
  let previous: number[] = [];
  let repeating = false;
  for (const line of text.split("\n")) {
    if (line.trim() === "*") {
      repeating = true;
      continue;
    }
    const m = /^([0-7]{4})\s{2}((?:[0-9a-f]{4} ?)+)/.exec(line);
    if (!m?.[1] || !m[2]) continue;
    const offset = Number.parseInt(m[1], 8);
    while (repeating && bytes.length < offset) bytes.push(...previous);
    repeating = false;
    previous = [];
    for (const group of m[2].trim().split(" "))
      previous.push(Number.parseInt(group.slice(0, 2), 16), Number.parseInt(group.slice(2, 4), 16));
    bytes.push(...previous);
  }
  while (repeating && bytes.length < 60) bytes.push(...previous);
  bytes.length = Math.min(bytes.length, 60);
  if (bytes.length !== 60) throw new Error(`inode_dump -b ${file} gave ${bytes.length} bytes`);
  return Buffer.from(bytes);
}

/** Physical blocks of a file's extent tree's index and leaf nodes (debugfs `ex`, levels above the leaves). */
export async function extentTreeDepth(image: string, file: string): Promise<number> {
  const [text = ""] = await debugfs(image, [`ex ${file}`]);
  const m = /^\s*\d+\/\s*(\d+)/m.exec(text);
  return m ? Number(m[1]) : 0;
}

/**
 * A filesystem image with a fragmented file: small files are written, every other one is removed, and a large
 * file fills the holes (an extent tree of depth >= 1); plus a file with an unwritten (fallocated) extent.
 */
export async function makeFragmentedExt4(
  dir: string,
  name: string,
  options: { blockSize: number; sizeMiB: number; mkfs?: string; features?: string; bigBlocks?: number },
): Promise<{ image: string; files: Map<string, Buffer> }> {
  const image = join(dir, name);
  await run("truncate", ["-s", `${options.sizeMiB}M`, image]);
  await run(options.mkfs ?? "mkfs.ext4", [
    "-q",
    "-F",
    "-b",
    String(options.blockSize),
    ...(options.features ? ["-O", options.features] : []),
    image,
  ]);
  const files = new Map<string, Buffer>();
  const cmds: string[] = [];
  const small = 3 * options.blockSize - 100;
  for (let i = 0; i < 80; i++) {
    const host = join(dir, `${name}-s${i}`);
    const bytes = Buffer.alloc(small, i + 1);
    await writeFile(host, bytes);
    cmds.push(`write ${host} s${i}`);
    files.set(`s${i}`, bytes);
  }
  for (let i = 0; i < 80; i += 2) {
    cmds.push(`rm s${i}`);
    files.delete(`s${i}`);
  }
  const bigBytes = Buffer.alloc((options.bigBlocks ?? 120) * options.blockSize + 1236);
  for (let i = 0; i < bigBytes.length; i += 4) bigBytes.writeUInt32LE((i * 2654435761) >>> 0, i);
  const bigHost = join(dir, `${name}-big`);
  await writeFile(bigHost, bigBytes);
  cmds.push(`write ${bigHost} big`);
  files.set("big", bigBytes);
  const fallocated = Buffer.alloc(5 * options.blockSize, 0x5a);
  const fallocHost = join(dir, `${name}-falloc`);
  await writeFile(fallocHost, fallocated);
  cmds.push(`write ${fallocHost} falloc`, "fallocate falloc 5 40");
  files.set("falloc", fallocated);
  await debugfs(image, cmds, true);
  return { image, files };
}
