/**
 * send's view of the source VM's disks, for the cache page locator: each writable disk of the running source
 * QEMU exported read-only over NBD by QEMU itself (qemu/block-export.ts), so the locator reads superblocks and
 * extent blocks as the guest sees them, whatever the image format (qcow2 with backing files, Ceph, iSCSI), with
 * nothing but the QMP socket send already has. The exports go when the migration ends, failed or not.
 */
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { type DiskExport, exportDisk, listDisks } from "../qemu/block-export.ts";
import type { QmpClient } from "../qemu/qmp.ts";
import { NbdDevice } from "../storage/nbd-device.ts";
import type { LocatorDisk } from "../storage/page-locator.ts";

export interface SourceDisks {
  disks: LocatorDisk[];
  /** Closes the NBD connections and removes the exports (the ones that did not start QEMU's server first). */
  close(): Promise<void>;
}

export async function exportSourceDisks(qmp: QmpClient, log: (line: string) => void): Promise<SourceDisks> {
  const dir = await mkdtemp(join(tmpdir(), "vmprune-send-"));
  const socketPath = join(dir, "nbd.sock");
  const exports: DiskExport[] = [];
  const disks: LocatorDisk[] = [];
  const close = async () => {
    for (const d of disks) await d.device.close();
    // The export that started QEMU's NBD server stops it: remove it last.
    for (const e of [...exports].sort((a, b) => Number(a.startedServer) - Number(b.startedServer)))
      await e
        .remove()
        .catch((error: unknown) => log(`block export ${e.exportId} not removed: ${String(error)}`));
    await rm(dir, { recursive: true, force: true });
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
      disks.push({ id, device: await NbdDevice.open(exported.address) });
    }
    return { disks, close };
  } catch (error) {
    await close();
    throw error;
  }
}
