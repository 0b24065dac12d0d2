/**
 * send's view of the source VM's disks, for the cache page locator: each writable disk of the running source
 * QEMU exported read-only over NBD by QEMU itself (qemu/block-export.ts), so the locator reads superblocks and
 * extent blocks as the guest sees them, whatever the image format (qcow2 with backing files, Ceph, iSCSI), with
 * nothing but the QMP socket send already has. The exports go when the migration ends, failed or not.
 */
import { randomBytes } from "node:crypto";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { type DiskExport, exportDisk, listDisks } from "../qemu/block-export.ts";
import type { QmpClient } from "../qemu/qmp.ts";
import { NbdDevice } from "../storage/nbd-device.ts";
import type { LocatorDisk } from "../storage/page-locator.ts";

/**
 * Where QEMU's NBD server socket goes: a directory as QEMU sees it (it creates the socket there, so it must be able
 * to write it) and the same directory as send reaches it. They differ when QEMU runs in a mount namespace of its
 * own (libvirt: /proc/PID/root/...). Default: a fresh directory under the temporary directory, the same for both.
 */
export interface ExportSocketDir {
  qemu: string;
  local: string;
}

export interface SourceDisks {
  disks: LocatorDisk[];
  /** Closes the NBD connections and removes the exports (the ones that did not start QEMU's server first). */
  close(): Promise<void>;
}

export async function exportSourceDisks(
  qmp: QmpClient,
  log: (line: string) => void,
  where?: ExportSocketDir,
): Promise<SourceDisks> {
  const dir = where ? undefined : await mkdtemp(join(tmpdir(), "vmprune-send-"));
  const name = `vmprune-nbd-${randomBytes(4).toString("hex")}.sock`;
  const socketPath = join(where?.qemu ?? (dir as string), name);
  const localPath = join(where?.local ?? (dir as string), name);
  const exports: DiskExport[] = [];
  const disks: LocatorDisk[] = [];
  const close = async () => {
    for (const d of disks) await d.device.close();
    // The export that started QEMU's NBD server stops it: remove it last.
    for (const e of [...exports].sort((a, b) => Number(a.startedServer) - Number(b.startedServer)))
      await e
        .remove()
        .catch((error: unknown) => log(`block export ${e.exportId} not removed: ${String(error)}`));
    await rm(dir ?? localPath, { recursive: true, force: true });
  };
  try {
    for (const disk of (await listDisks(qmp)).filter((d) => !d.readOnly)) {
      const exported = await exportDisk(qmp, {
        disk: disk.nodeName,
        socketPath,
        runningServer: { path: socketPath },
        log,
      });
      exports.push(exported);
      const id = disk.qdev ?? (disk.device || disk.nodeName);
      // The server's socket as send reaches it (the export names it as QEMU sees it).
      const address = { ...exported.address, server: { path: localPath } };
      disks.push({ id, device: await NbdDevice.open(address) });
    }
    return { disks, close };
  } catch (error) {
    await close();
    throw error;
  }
}
