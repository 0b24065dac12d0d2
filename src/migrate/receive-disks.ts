/**
 * The disks receive rebuilds referenced pages from, as an operator names them (`receive --disk`, repeatable):
 *  - `PATH`: a raw image file, read directly (the fastest: synchronous 4 KiB reads from the page cache);
 *  - `FORMAT:PATH` (qcow2:, vmdk:, ...): any image QEMU opens, read through a read-only qemu-nbd that receive
 *    starts and stops (storage/nbd-server.ts: force-share, since the destination QEMU holds the image's lock);
 *    the format is given, never probed, since a guest can write any bytes at the start of a raw disk;
 *  - `nbd+unix:///EXPORT?socket=PATH` or `nbd://HOST:PORT/EXPORT`: an NBD export someone else runs.
 * The first disk answers REF (the content index's disk-wide block numbers); all of them answer REF_FS, which
 * names a filesystem by its UUID (storage/filesystem-directory.ts).
 */
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { type BlockDevice, RawFileDevice } from "../storage/block-device.ts";
import { BlockReader, isNbdUri } from "../storage/block-reader.ts";
import { FilesystemDirectory } from "../storage/filesystem-directory.ts";
import { refuseNonRaw } from "../storage/image-format.ts";
import { parseNbdUri } from "../storage/nbd-client.ts";
import { NbdDevice } from "../storage/nbd-device.ts";
import { type RunningNbdServer, startNbdServer } from "../storage/nbd-server.ts";
import { REF_SECTOR_BYTES } from "./link-send.ts";

/** Image formats `--disk FORMAT:PATH` takes (QEMU block drivers for image files). */
export const DISK_FORMATS = ["raw", "qcow2", "qed", "vmdk", "vdi", "vhdx", "vpc"] as const;

export interface ReceiveDisks {
  /** The first disk, for REF. */
  reader: BlockReader;
  /** Every disk's filesystems, for REF_FS. */
  filesystems: FilesystemDirectory;
  /** Closes the disks and stops the qemu-nbd processes started for them. */
  close(): Promise<void>;
}

interface OpenedDisk {
  device: BlockDevice;
  server?: RunningNbdServer;
}

async function openDisk(spec: string, runDir: () => Promise<string>, index: number): Promise<OpenedDisk> {
  if (isNbdUri(spec)) return { device: await NbdDevice.open(parseNbdUri(spec)) };
  const prefixed = /^([a-z0-9]+):(.+)$/.exec(spec);
  const format =
    prefixed && (DISK_FORMATS as readonly string[]).includes(prefixed[1] ?? "") ? prefixed[1] : "raw";
  const path = prefixed && format !== "raw" ? (prefixed[2] as string) : spec.replace(/^raw:/, "");
  if (format === "raw") {
    const device = await RawFileDevice.open(path);
    try {
      refuseNonRaw(path, device.readSync(0, Math.min(device.sizeBytes, 4096)));
    } catch (error) {
      await device.close();
      throw new Error(
        `${(error as Error).message} To receive from it as it is, name its format: --disk FORMAT:${path} (read through qemu-nbd).`,
      );
    }
    return { device };
  }
  const server = await startNbdServer({
    image: path,
    format: format as string,
    socketPath: join(await runDir(), `disk${index}.sock`),
  });
  try {
    return { device: await NbdDevice.open(server.address), server };
  } catch (error) {
    await server.stop();
    throw error;
  }
}

export async function openReceiveDisks(
  specs: readonly string[],
  log?: (line: string) => void,
): Promise<ReceiveDisks> {
  if (specs.length === 0) throw new Error("no disk given");
  let dir: string | undefined;
  const runDir = async () => {
    dir ??= await mkdtemp(join(tmpdir(), "vmprune-receive-"));
    return dir;
  };
  const opened: OpenedDisk[] = [];
  const close = async () => {
    for (const d of opened) {
      await d.device.close();
      await d.server?.stop();
    }
    if (dir) await rm(dir, { recursive: true, force: true });
  };
  try {
    for (const [i, spec] of specs.entries()) opened.push(await openDisk(spec, runDir, i));
    const devices = opened.map((d) => d.device);
    const filesystems = await FilesystemDirectory.open(devices);
    log?.(
      `receive disks: ${filesystems.describe().join("; ") || "no filesystem found (REF_FS will be NACKed)"}`,
    );
    const first = devices[0] as BlockDevice;
    // The reader reads through the first device; closing is ours (close() above), not the reader's.
    const reader = await BlockReader.fromDevice(unowned(first), { alignmentBytes: REF_SECTOR_BYTES });
    return { reader, filesystems, close };
  } catch (error) {
    await close();
    throw error;
  }
}

/** `device` with a close() that does nothing: for a user that must not close what others read too. */
function unowned(device: BlockDevice): BlockDevice {
  return {
    get name() {
      return device.name;
    },
    get sizeBytes() {
      return device.sizeBytes;
    },
    read: (offset, length) => device.read(offset, length),
    ...(device.readSync
      ? { readSync: (offset: number, length: number) => device.readSync?.(offset, length) as Buffer }
      : {}),
    close: async () => undefined,
  };
}
