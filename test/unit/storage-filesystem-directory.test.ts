/**
 * receive's side of REF_FS on real ext4 images (mkfs.ext4 -d, debugfs bmap as the oracle for where a file's
 * bytes are): a reference names the right disk by its filesystem's UUID, and every doubt is a typed refusal.
 */
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { run } from "../../src/lab/exec.ts";
import { RawFileDevice } from "../../src/storage/block-device.ts";
import { FILESYSTEM_SECTOR_BYTES, FilesystemDirectory } from "../../src/storage/filesystem-directory.ts";
import { strongHash } from "../../src/storage/fingerprint.ts";
import { bmap } from "../support/ext4-images.ts";
import { tempDir } from "../support/fake-peers.ts";

const UUID_A = "0f0e0d0c-0b0a-4908-8706-050403020100";
const UUID_B = "11111111-2222-4333-8444-555555555555";

/** An 8 MiB ext4 image holding /f with `content`; returns the sector of f's first block in the filesystem. */
async function image(
  dir: string,
  name: string,
  uuid: string,
  content: Buffer,
): Promise<{ path: string; sector: number }> {
  const stage = join(dir, `${name}.d`);
  mkdirSync(stage);
  writeFileSync(join(stage, "f"), content);
  const path = join(dir, `${name}.img`);
  await run("mkfs.ext4", ["-q", "-F", "-b", "4096", "-U", uuid, "-d", stage, path, "8M"]);
  const [first] = await bmap(path, "/f", 1);
  assert.ok(first && first.physical > 0);
  return { path, sector: (first.physical * 4096) / FILESYSTEM_SECTOR_BYTES };
}

const hex = (uuid: string) => Buffer.from(uuid.replaceAll("-", ""), "hex");

test("REF_FS on receive's side: the filesystem found by UUID on the right disk, its page checked; every doubt refused", async (t) => {
  const dir = tempDir(t);
  const a = randomBytes(4096);
  const b = randomBytes(4096);
  const diskA = await image(dir, "a", UUID_A, a);
  const diskB = await image(dir, "b", UUID_B, b);
  const devices = [await RawFileDevice.open(diskA.path), await RawFileDevice.open(diskB.path)];
  t.after(() => Promise.all(devices.map((d) => d.close())));
  const directory = await FilesystemDirectory.open(devices);
  assert.equal(directory.describe().length, 2, directory.describe().join("; "));

  const fromA = await directory.read(hex(UUID_A), diskA.sector, strongHash(a));
  assert.ok(fromA.ok && fromA.page.equals(a), "A's page from disk A");
  const fromB = await directory.read(hex(UUID_B), diskB.sector, strongHash(b));
  assert.ok(fromB.ok && fromB.page.equals(b), "B's page from disk B");

  // A's page named in B's filesystem: the bytes there are not A's.
  const crossed = await directory.read(hex(UUID_B), diskA.sector, strongHash(a));
  assert.ok(!crossed.ok && crossed.error.code === "hash-mismatch");
  const unknown = await directory.read(Buffer.alloc(16, 0x5a), diskA.sector, strongHash(a));
  assert.ok(!unknown.ok && /no disk given to receive holds filesystem/.test(unknown.error.message));
  const beyond = await directory.read(
    hex(UUID_A),
    (8 * 1024 * 1024) / FILESYSTEM_SECTOR_BYTES,
    strongHash(a),
  );
  assert.ok(!beyond.ok && beyond.error.code === "out-of-range");
  const badHash = await directory.read(hex(UUID_A), diskA.sector, Buffer.alloc(7));
  assert.ok(!badHash.ok && badHash.error.code === "invalid-hash-length");
  const badSector = await directory.read(hex(UUID_A), -1, strongHash(a));
  assert.ok(!badSector.ok && badSector.error.code === "invalid-block");

  // A clone of disk A (same UUID on two disks): which one is meant is not known, so nothing is read from either.
  const clone = join(dir, "clone.img");
  await run("cp", [diskA.path, clone]);
  const cloneDevice = await RawFileDevice.open(clone);
  t.after(() => cloneDevice.close());
  const withClone = await FilesystemDirectory.open([...devices, cloneDevice]);
  const ambiguous = await withClone.read(hex(UUID_A), diskA.sector, strongHash(a));
  assert.ok(!ambiguous.ok && /several disks/.test(ambiguous.error.message));
  const stillB = await withClone.read(hex(UUID_B), diskB.sector, strongHash(b));
  assert.ok(stillB.ok, "the other filesystem is still found");
});
