/**
 * The source host's way to read a guest disk through QEMU's own block layer: the running source QEMU exports the
 * disk read-only over NBD on a unix socket (QMP `nbd-server-start` + `block-export-add`, qapi/block-export.json),
 * and vmprune reads it with storage/nbd-device.ts. The export reads what the guest sees (qcow2 with backing
 * files, Ceph, iSCSI), while the guest runs and writes it (a read-only export takes no write permission from the
 * guest's device, and reads what it wrote: test/integration/storage-nbd.test.ts); removing it (`block-export-del`, then `nbd-server-stop`
 * if this module started the server) leaves QEMU as it was.
 *
 * Both QEMU 7.2 and 10.0 take the same arguments: `nbd-server-start` with a SocketAddressLegacy address
 * ({type: "unix", data: {path}}), `block-export-add` with type "nbd" (since 5.2), `writable: false`. QEMU has one
 * NBD server per process: if one already runs (libvirt's, for a pull-mode backup), nbd-server-start fails with
 * "NBD server already running" and the export can only be added to that server, whose socket the caller must
 * then name (`runningServer`); this module never stops a server it did not start.
 *
 * Disks are named as query-block shows them: `device` (the -drive id; empty with -blockdev, as libvirt runs
 * QEMU), `qdev` (the guest device's id, e.g. libvirt's "virtio-disk1", or its QOM path), or the node-name of the
 * top (format) node, e.g. libvirt's "libvirt-1-format".
 */
import type { NbdAddress } from "../storage/nbd-client.ts";
import type { Endpoint } from "../transport/endpoint.ts";
import { type QmpClient, QmpError } from "./qmp.ts";

export class BlockExportError extends Error {
  override readonly name = "BlockExportError";
}

/** One disk of the running QEMU (query-block, qapi/block-core.json BlockInfo). */
export interface QemuDisk {
  /** The -drive id; "" for disks attached with -blockdev. */
  device: string;
  /** The guest device's id, or its QOM path when it has none; absent for a drive without a device. */
  qdev?: string;
  /** The top node (what the guest device reads), e.g. "libvirt-1-format" or QEMU's "#block123". */
  nodeName: string;
  /** The image file of the top node. */
  filename: string;
  /** Its format driver ("qcow2", "raw", ...). */
  format: string;
  /** The top node's backing file, as recorded in the image, if any. */
  backingFilename?: string;
  readOnly: boolean;
}

interface BlockInfoReply {
  device: string;
  qdev?: string;
  inserted?: {
    "node-name"?: string;
    file: string;
    drv: string;
    ro: boolean;
    backing_file?: string;
    image?: { filename: string; format: string; "backing-filename"?: string };
  };
}

/** The disks with a medium (query-block). */
export async function listDisks(qmp: QmpClient): Promise<QemuDisk[]> {
  const blocks = (await qmp.executeUntyped("query-block")) as BlockInfoReply[];
  const disks: QemuDisk[] = [];
  for (const block of blocks) {
    const inserted = block.inserted;
    if (!inserted?.["node-name"]) continue;
    const backing = inserted.image?.["backing-filename"] ?? inserted.backing_file;
    disks.push({
      device: block.device,
      ...(block.qdev ? { qdev: block.qdev } : {}),
      nodeName: inserted["node-name"],
      filename: inserted.image?.filename ?? inserted.file,
      format: inserted.image?.format ?? inserted.drv,
      ...(backing ? { backingFilename: backing } : {}),
      readOnly: inserted.ro,
    });
  }
  return disks;
}

/**
 * The disk named `name`: its -drive id, its device's id (also as the QOM path /machine/peripheral/ID/...), or
 * its node-name. Throws a BlockExportError listing the disks when none or several match.
 */
export function findDisk(disks: readonly QemuDisk[], name: string): QemuDisk {
  const matches = disks.filter(
    (d) =>
      (d.device !== "" && d.device === name) ||
      d.nodeName === name ||
      d.qdev === name ||
      d.qdev === `/machine/peripheral/${name}` ||
      d.qdev?.startsWith(`/machine/peripheral/${name}/`),
  );
  const listed = disks
    .map((d) => `${d.device || "(no drive id)"} / ${d.qdev ?? "(no device)"} / ${d.nodeName} (${d.filename})`)
    .join("; ");
  if (matches.length === 1) return matches[0] as QemuDisk;
  throw new BlockExportError(
    matches.length === 0
      ? `QEMU has no disk named ${JSON.stringify(name)}: give a drive id, device id or node-name of query-block (${listed || "no disks"})`
      : `${JSON.stringify(name)} names ${matches.length} disks of QEMU: give the node-name (${listed})`,
  );
}

export interface DiskExportOptions {
  /** Which disk (see findDisk). */
  disk: string;
  /** The unix socket QEMU's NBD server listens on (created by QEMU); ignored with `runningServer`. */
  socketPath: string;
  /** The export's NBD name and block export id (default "vmprune-" + the node-name). */
  exportName?: string;
  /**
   * Where an NBD server that already runs in this QEMU listens: add the export to it instead of failing. Without
   * it, a running server is an error (QEMU cannot run a second one).
   */
  runningServer?: Endpoint;
  log?: (line: string) => void;
}

export interface DiskExport {
  address: NbdAddress;
  disk: QemuDisk;
  /** The block export's id (query-block-exports). */
  exportId: string;
  /** This export started QEMU's NBD server (and remove() stops it). */
  startedServer: boolean;
  /** block-export-del (dropping any client still connected), waits for BLOCK_EXPORT_DELETED; idempotent. */
  remove(): Promise<void>;
}

/** Exports `options.disk` of the running QEMU read-only over NBD. */
export async function exportDisk(qmp: QmpClient, options: DiskExportOptions): Promise<DiskExport> {
  const disk = findDisk(await listDisks(qmp), options.disk);
  const exportName = options.exportName ?? `vmprune-${disk.nodeName.replace(/[^A-Za-z0-9_-]/g, "")}`;
  let startedServer = false;
  let server: Endpoint = { path: options.socketPath };
  try {
    await qmp.executeUntyped("nbd-server-start", {
      addr: { type: "unix", data: { path: options.socketPath } },
    });
    startedServer = true;
  } catch (error) {
    if (!(error instanceof QmpError && /already running/i.test(error.desc))) throw error;
    if (!options.runningServer)
      throw new BlockExportError(
        `QEMU already runs an NBD server (${error.desc}) and runs only one: give its socket (runningServer) to ` +
          `add the export to it, or stop what uses it`,
      );
    server = options.runningServer;
  }
  try {
    await qmp.executeUntyped("block-export-add", {
      type: "nbd",
      id: exportName,
      "node-name": disk.nodeName,
      name: exportName,
      writable: false,
    });
  } catch (error) {
    if (startedServer) await qmp.executeUntyped("nbd-server-stop").catch(() => {});
    throw error instanceof QmpError
      ? new BlockExportError(
          `QEMU refused to export ${disk.nodeName} (${disk.filename}) read-only over NBD: ${error.desc}`,
          { cause: error },
        )
      : error;
  }
  options.log?.(
    `block-export: ${disk.nodeName} (${disk.filename}) exported read-only as ${exportName}` +
      `${startedServer ? ` on ${options.socketPath}` : " on QEMU's running NBD server"}`,
  );
  let removed: Promise<void> | undefined;
  return {
    address: { server, exportName },
    disk,
    exportId: exportName,
    startedServer,
    remove: () => {
      removed ??= removeExport(qmp, exportName, startedServer, options.log);
      return removed;
    },
  };
}

async function removeExport(
  qmp: QmpClient,
  id: string,
  stopServer: boolean,
  log: ((line: string) => void) | undefined,
): Promise<void> {
  // The deletion completes asynchronously (qapi/block-export.json BLOCK_EXPORT_DELETED); a waiter armed before
  // the command also sees an event that arrives with the reply.
  const earlier = new Set(qmp.events());
  const deleted = qmp.waitEvent("BLOCK_EXPORT_DELETED", (e) => e.data.id === id && !earlier.has(e), 10_000);
  deleted.catch(() => {});
  await qmp.executeUntyped("block-export-del", { id, mode: "hard" });
  await deleted;
  if (stopServer) await qmp.executeUntyped("nbd-server-stop");
  log?.(`block-export: ${id} removed${stopServer ? ", NBD server stopped" : ""}`);
}
