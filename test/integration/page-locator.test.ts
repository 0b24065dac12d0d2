/**
 * The page locator on live guests (kernels 6.12 and 6.1, QEMU 10.0, 1 vCPU, 512 MiB): the guest writes two files
 * page by page in turn with fsync (so ext4 interleaves them: extent trees of depth >= 1, whose index blocks are
 * on disk), drops its caches, runs the mixed workload (clean cache of data files, mapped files, tmpfs, dirty files
 * then synced, anon, churn) and reads the interleaved files back. Paused, its RAM is classified from outside and
 * every page with a file mapping is located:
 *
 * - at least 99% of the clean cache pages of regular files on the data disk's ext4 are located;
 * - every located page (of any category) equals, byte for byte, the 4096 bytes of the disk image at its offset;
 * - pages of other filesystems (tmpfs/shmem, the initramfs) and ext4's in-memory-only inodes get a reason;
 * - below an index level (depth >= 1), blocks are mapped by ext4's in-memory extent status cache; a locator that
 *   reads the tree's blocks from the disk instead gives the same offsets, and with a device that cannot read
 *   synchronously it first misses with "extent-index-pending", then locates the same pages after the reads.
 */
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { join } from "node:path";
import { test } from "node:test";
import { CATEGORY, CATEGORY_NAMES } from "../../src/introspect/classifier.ts";
import { openRawSnapshot } from "../../src/introspect/guest-memory.ts";
import { classifyPresent, openClassifier } from "../../src/introspect/inspect.ts";
import { LabPair } from "../../src/lab/lab-vm.ts";
import { runMixedWorkload } from "../../src/lab/workloads.ts";
import { type BlockDevice, RawFileDevice } from "../../src/storage/block-device.ts";
import { PageLocator } from "../../src/storage/page-locator.ts";

const PAGE = 4096;
const INTERLEAVED_PAGES = 48;

/**
 * Guest shell: two files written one 4 KiB page at a time in turn, each write fsynced. mb_stream_req is raised so
 * that mballoc serves both files from the per-CPU group preallocation (fs/ext4/mballoc.c ext4_mb_group_or_file)
 * instead of a per-inode one: their blocks interleave and each file gets ~48 extents (> 4: an index level).
 * Then /data is remounted read-only and back: that checkpoints ext4's journal (ext4_mark_recovery_complete flushes
 * it), so the inodes and extent blocks are at their home places when debugfs reads the image below (`sync` alone
 * only commits them to the journal).
 */
const WRITE_INTERLEAVED = [
  "for f in /sys/fs/ext4/*/mb_stream_req; do echo 1000000 > $f; done",
  "mkdir -p /data/scratch",
  "i=0",
  `while [ $i -lt ${INTERLEAVED_PAGES} ]; do for n in A B; do dd if=/dev/urandom of=/data/scratch/frag$n bs=4k count=1 seek=$i conv=notrunc,fsync 2>/dev/null || exit 1; done; i=$((i+1)); done`,
  "sync",
  "sync",
  "mount -o remount,ro /data && mount -o remount,rw /data",
].join("\n");

/**
 * debugfs's answer to one request on `image`, its standard output and error together (it prints its errors on
 * stderr and exits 0). `-c` (catastrophic mode: bitmaps not read, read-only): the image is a mounted ext4's, whose
 * block bitmaps and their checksums in the group descriptors reach the disk at different times, so a plain open
 * now and then fails "Block bitmap checksum does not match bitmap" (seen under load, 1 run in 6), and every
 * request then answers "Filesystem not open". Reading inodes and extent trees needs no bitmap.
 */
function debugfs(image: string, request: string): Promise<string> {
  return new Promise((resolve, reject) =>
    execFile("debugfs", ["-c", "-R", request, image], { encoding: "utf8" }, (error, stdout, stderr) =>
      error ? reject(error) : resolve(`${stdout}${stderr}`),
    ),
  );
}

/** A BlockDevice that counts what is read through it (the locator must never read the whole disk). */
function counting(device: BlockDevice): BlockDevice & { bytesRead: number } {
  const counted = {
    name: device.name,
    sizeBytes: device.sizeBytes,
    bytesRead: 0,
    read: (offset: number, length: number) => {
      counted.bytesRead += length;
      return device.read(offset, length);
    },
    readSync: (offset: number, length: number) => {
      counted.bytesRead += length;
      const bytes = device.readSync?.(offset, length);
      if (!bytes) throw new Error(`${device.name} cannot read synchronously`);
      return bytes;
    },
    close: async () => {},
  };
  return counted;
}

/** A BlockDevice that, like the NBD one, reads only asynchronously. */
function asyncOnly(device: BlockDevice): BlockDevice {
  return {
    name: `${device.name} (async only)`,
    sizeBytes: device.sizeBytes,
    read: (offset, length) => device.read(offset, length),
    close: async () => {},
  };
}

for (const kernel of ["6.12", "6.1"] as const) {
  test(`kernel ${kernel}: clean cache pages of the data disk are located from the guest's metadata, byte-exact`, async (t) => {
    const pair = await LabPair.boot({ kernel, qemu: "10.0", memoryMiB: 512 });
    t.after(() => pair.stop());
    const agent = pair.src.agent;
    await agent.run(WRITE_INTERLEAVED, 300_000);
    await agent.run("sync; echo 3 > /proc/sys/vm/drop_caches");
    await runMixedWorkload(agent);
    await agent.run("cat /data/scratch/fragA /data/scratch/fragB > /dev/null; sync; sleep 1");
    const guestView = await agent.run("ls -li /data/scratch");
    await pair.src.monitor.execute("stop");

    const image = join(pair.diskDir, "data.img");
    // debugfs prints its errors (a file not found, a bad checksum) on stderr and exits 0: both streams go into
    // the message, with the guest's own view of the directory, so a failure here says which of them varied.
    const extents = await debugfs(image, "ex /scratch/fragA");
    const depth = /^\s*\d+\/\s*(\d+)/m.exec(extents)?.[1];
    if (depth === undefined || Number(depth) < 1) {
      assert.fail(
        `the interleaved file's extent tree has an index level: debugfs says\n${extents}\n` +
          `debugfs stat: ${await debugfs(image, "stat /scratch/fragA")}\n` +
          `debugfs ls: ${await debugfs(image, "ls -l /scratch")}\nthe guest before its stop: ${guestView}`,
      );
    }

    const memory = openRawSnapshot(pair.src.ramPath);
    t.after(() => memory.close());
    const opened = openClassifier(memory);
    assert.ok(opened.types, opened.btf);
    const pfns = Math.ceil(memory.end / PAGE);
    const { categories } = classifyPresent(opened, pfns);
    const device = await RawFileDevice.open(image);
    t.after(() => device.close());
    const guest = { kernel: opened.kernel, types: opened.types, layout: opened.layout };
    const metered = counting(device);
    const locator = await PageLocator.open({ ...guest, disks: [{ id: "data", device: metered }] });
    const uuids = [...locator.filesystems.keys()];
    assert.equal(uuids.length, 1, "one filesystem on the data disk");
    const dataUuid = uuids[0];

    const fileBacked = [CATEGORY.cache, CATEGORY.inode, CATEGORY.shmem] as number[];
    const candidates: number[] = [];
    for (let pfn = 0; pfn < pfns; pfn++) if (fileBacked.includes(categories[pfn] ?? 0)) candidates.push(pfn);
    const ram = Buffer.alloc(PAGE);
    let dataCache = 0;
    let dataCacheLocated = 0;
    let located = 0;
    let otherFs = 0;
    const locatedByCategory: Record<string, number> = {};
    const dataCacheMisses: Record<string, number> = {};
    const locatedPfns: number[] = [];
    const started = performance.now();
    const results = candidates.map((pfn) => locator.locate(pfn));
    const firstPassMs = performance.now() - started;
    candidates.forEach((pfn, i) => {
      const result = results[i];
      assert.ok(result);
      const owner = locator.owners.owner(pfn);
      const onData = owner.ok && owner.owner.superBlock.uuid === dataUuid;
      const regular = owner.ok && (owner.owner.mode & 0o170000) === 0o100000;
      if (categories[pfn] === CATEGORY.cache && onData && regular) {
        dataCache++;
        if (result.ok) dataCacheLocated++;
        else dataCacheMisses[result.reason] = (dataCacheMisses[result.reason] ?? 0) + 1;
      }
      if (owner.ok && !onData && owner.owner.superBlock.type !== "bdev") {
        otherFs++;
        assert.ok(!result.ok, `pfn ${pfn} of ${owner.owner.superBlock.type} is not located`);
      }
      if (categories[pfn] === CATEGORY.shmem) assert.deepEqual(result, { ok: false, reason: "shmem" });
      if (!result.ok) return;
      located++;
      locatedPfns.push(pfn);
      const name = CATEGORY_NAMES[categories[pfn] ?? 0] ?? "?";
      locatedByCategory[name] = (locatedByCategory[name] ?? 0) + 1;
      assert.equal(result.disk, "data");
      memory.readInto(pfn * PAGE, ram, 0, PAGE);
      const onDisk = device.readSync(result.byteOffset, PAGE);
      assert.ok(onDisk.equals(ram), `pfn ${pfn} equals the disk at ${result.byteOffset}`);
    });
    const stats = locator.stats();
    // A second pass: every inode, super_block and extent block is cached now.
    const again = performance.now();
    for (const pfn of candidates) locator.locate(pfn);
    const cachedUs = ((performance.now() - again) * 1000) / candidates.length;
    t.diagnostic(
      `${candidates.length} file-backed pages (cache ${categories.filter((c) => c === CATEGORY.cache).length}); ` +
        `located ${located} (${JSON.stringify(locatedByCategory)}), misses ${JSON.stringify(stats.misses)}; ` +
        `data-disk clean cache ${dataCacheLocated}/${dataCache}, its misses ${JSON.stringify(dataCacheMisses)}; ` +
        `${otherFs} pages of other filesystems; below index levels ${stats.extentStatusHits} blocks mapped by the ` +
        `extent status cache, ${stats.diskIndexWalks} by tree blocks from disk (${stats.blockReads} read); ` +
        `first pass ${((firstPassMs * 1000) / candidates.length).toFixed(2)} µs/page, ` +
        `again with everything cached ${cachedUs.toFixed(2)} µs/page (${cachedUs.toFixed(2)} ms per 1000 pages); ` +
        `the locator read ${metered.bytesRead} bytes of the ${device.sizeBytes}-byte disk`,
    );
    assert.ok(dataCache > 10_000, `many clean cache pages of the data disk (${dataCache})`);
    assert.ok(metered.bytesRead < 64 * 1024, `the locator read ${metered.bytesRead} bytes of the disk`);
    assert.ok(dataCacheLocated >= 0.99 * dataCache, `${dataCacheLocated} of ${dataCache} located`);
    assert.ok(
      stats.extentStatusHits > 0,
      "blocks below an index level were mapped by ext4's extent status cache",
    );
    assert.ok(otherFs + (stats.misses.shmem ?? 0) > 1000, "pages of other filesystems were judged");

    // The tree's blocks read from the disk give the same answers as the kernel's extent status cache; without
    // readSync, pages under an index level first miss as pending, then are located after the reads.
    const slow = await PageLocator.open({
      ...guest,
      disks: [{ id: "data", device: asyncOnly(device) }],
      useExtentStatus: false,
    });
    const first = locatedPfns.map((pfn) => slow.locate(pfn));
    const pending = first.filter((r) => !r.ok && r.reason === "extent-index-pending").length;
    assert.ok(pending > 0, "some pages wait for an index block");
    assert.ok(first.every((r) => r.ok || r.reason === "extent-index-pending"));
    await slow.settle();
    const second = locatedPfns.map((pfn) => slow.locate(pfn));
    const byPfn = new Map(candidates.map((pfn, i) => [pfn, results[i]]));
    assert.deepEqual(
      second,
      locatedPfns.map((pfn) => byPfn.get(pfn)),
    );
    assert.ok(slow.stats().diskIndexWalks > 0);
    t.diagnostic(
      `disk-only tree walk, async-only device: ${pending} pending on the first pass, then the same ${second.length} ` +
        `offsets as with the extent status cache after ${slow.stats().blockReads} block reads`,
    );
  });
}
