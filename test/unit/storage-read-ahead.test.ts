/**
 * receive's sequential read-ahead over a real raw file: the bytes are the file's whatever the order of reads;
 * sequential pages cost one device read per window, scattered ones one each; a window older than its age limit is
 * read again; pages are copies, never views that pin a window.
 */
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";
import { RawFileDevice } from "../../src/storage/block-device.ts";
import { StorageError } from "../../src/storage/errors.ts";
import { SequentialReadAhead } from "../../src/storage/read-ahead.ts";

const PAGE = 4096;

async function withDisk(
  bytes: Buffer,
  body: (device: RawFileDevice, path: string) => Promise<void>,
): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), "vmprune-readahead-"));
  const path = join(dir, "disk.img");
  writeFileSync(path, bytes);
  const device = await RawFileDevice.open(path);
  try {
    await body(device, path);
  } finally {
    await device.close();
    rmSync(dir, { recursive: true, force: true });
  }
}

test("sequential pages: the file's bytes, one device read per window after the first page", async () => {
  const disk = randomBytes(300 * PAGE);
  await withDisk(disk, async (device) => {
    const ahead = new SequentialReadAhead(device, 64 * PAGE, 10_000);
    for (let p = 0; p < 300; p++) {
      const page = ahead.readSync(p * PAGE, PAGE);
      assert.ok(page.equals(disk.subarray(p * PAGE, (p + 1) * PAGE)), `page ${p}`);
    }
    // Page 0 alone, then windows from page 1: 1 + ceil(299 / 64) device reads.
    assert.equal(ahead.deviceReads, 1 + Math.ceil(299 / 64));
    assert.equal(ahead.hits, 300 - ahead.deviceReads);
  });
});

test("scattered pages are read one by one (no window), and still right", async () => {
  const disk = randomBytes(256 * PAGE);
  await withDisk(disk, async (device) => {
    const ahead = new SequentialReadAhead(device, 64 * PAGE, 10_000);
    const order = [200, 3, 77, 150, 9, 255, 0, 128];
    for (const p of order)
      assert.ok(ahead.readSync(p * PAGE, PAGE).equals(disk.subarray(p * PAGE, (p + 1) * PAGE)));
    assert.equal(ahead.deviceReads, order.length);
    assert.equal(ahead.hits, 0);
  });
});

test("a page is a copy: changing it changes neither the window nor the next read", async () => {
  const disk = randomBytes(8 * PAGE);
  await withDisk(disk, async (device) => {
    const ahead = new SequentialReadAhead(device, 8 * PAGE, 10_000);
    ahead.readSync(0, PAGE);
    const second = ahead.readSync(PAGE, PAGE); // reads the window
    const third = ahead.readSync(2 * PAGE, PAGE); // from the window
    assert.equal(third.length, PAGE);
    third.fill(0xaa);
    second.fill(0x55);
    assert.ok(ahead.readSync(3 * PAGE, PAGE).equals(disk.subarray(3 * PAGE, 4 * PAGE)));
    assert.ok(ahead.readSync(2 * PAGE, PAGE).equals(disk.subarray(2 * PAGE, 3 * PAGE)));
  });
});

test("pages handed out keep their bytes while later pages fill the buffers they share", async () => {
  const disk = randomBytes(80 * PAGE);
  await withDisk(disk, async (device) => {
    const ahead = new SequentialReadAhead(device, 16 * PAGE, 10_000);
    const pages = Array.from({ length: 80 }, (_, p) => ahead.readSync(p * PAGE, PAGE));
    pages.forEach((page, p) => {
      assert.ok(page.equals(disk.subarray(p * PAGE, (p + 1) * PAGE)), `page ${p}`);
    });
    assert.ok(ahead.hits > 60, `${ahead.hits} pages from windows`);
    // Writing one page touches no other, though some share a buffer.
    pages[20]?.fill(0);
    assert.ok(pages[19]?.equals(disk.subarray(19 * PAGE, 20 * PAGE)));
    assert.ok(pages[21]?.equals(disk.subarray(21 * PAGE, 22 * PAGE)));
  });
});

test("a window older than its age limit is read again: bytes the disk changed since are seen", async () => {
  const disk = randomBytes(16 * PAGE);
  await withDisk(disk, async (device, path) => {
    const ahead = new SequentialReadAhead(device, 16 * PAGE, 20);
    ahead.readSync(0, PAGE);
    ahead.readSync(PAGE, PAGE); // window of pages 1..15
    const changed = Buffer.from(disk);
    changed.fill(0x42, 5 * PAGE, 6 * PAGE);
    writeFileSync(path, changed);
    await sleep(60);
    assert.ok(ahead.readSync(5 * PAGE, PAGE).equals(changed.subarray(5 * PAGE, 6 * PAGE)));
  });
});

test("reads past the disk are refused as the device refuses them", async () => {
  await withDisk(randomBytes(4 * PAGE), async (device) => {
    const ahead = new SequentialReadAhead(device, 64 * PAGE, 10_000);
    ahead.readSync(0, PAGE);
    // Sequential, near the end: the window stops at the disk's end.
    assert.equal(ahead.readSync(PAGE, PAGE).length, PAGE);
    assert.equal(ahead.readSync(3 * PAGE, PAGE).length, PAGE);
    assert.throws(() => ahead.readSync(4 * PAGE, PAGE), StorageError);
    assert.throws(() => ahead.readSync(-PAGE, PAGE), StorageError);
  });
});
