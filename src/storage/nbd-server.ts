/**
 * The destination host's read-only NBD export of the shared disk: a `qemu-nbd` child process that vmprune owns
 * (started here, stopped by its PID in stop(), never --fork'ed away), serving the image through QEMU's block
 * layer on a unix socket, so that receive reads what the guest sees (qcow2 with its backing chain, or any format
 * qemu-nbd opens) with nbd-device.ts.
 *
 * Why qemu-nbd and not the destination QEMU itself: a QEMU started with -incoming holds its disks inactive until
 * the migration completes (the source QEMU owns them meanwhile), and `block-export-add` on such a node (tried
 * with the source QEMU holding the image, test/integration/storage-nbd.test.ts records the answers):
 *  - QEMU 7.2 answers {} (success): block/export/export.c activates the node for the export and ignores a
 *    failure to; on shared storage that is the destination taking over an image the running source still writes.
 *  - QEMU 10.0 answers `Failed to get "write" lock` (activation is no longer silently skipped); with the new
 *    `allow-inactive: true` it exports the inactive node (7.2: "Parameter 'allow-inactive' is unexpected").
 * So only 10.0 could, and libvirt owns the destination QEMU's QMP socket anyway; qemu-nbd works alike for both
 * versions, with or without libvirt, and is the way chosen.
 *
 * --read-only: vmprune never writes the disk. force-share=on: the destination QEMU holds the image's lock
 * (and the source QEMU writes it, on shared storage), so qemu-nbd must open it without taking the lock. That is
 * safe for correctness here because every block read is checked against the sender's SHA-256 before use: a stale
 * qcow2 mapping (qemu-nbd caches metadata that the source's writes change) yields a hash mismatch, hence a NACK,
 * never a wrong page.
 */
import { type ChildProcess, spawn } from "node:child_process";
import { existsSync, rmSync, statSync } from "node:fs";
import { resolve as resolvePath } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { formatEndpoint, type TcpEndpoint } from "../transport/endpoint.ts";
import { StorageError } from "./errors.ts";
import { type NbdAddress, NbdClient } from "./nbd-client.ts";

const SETPRIV = "/usr/bin/setpriv";

export interface NbdServerOptions {
  /** The image file (or anything qemu-nbd takes as a filename). */
  image: string;
  /** Its format ("raw", "qcow2", ...): given explicitly, never probed (probing a guest-writable raw image is unsafe). */
  format: string;
  /** The unix socket to serve on (created by qemu-nbd, removed by stop()). */
  socketPath?: string;
  /** Or a TCP address (loopback, or a trusted network: NBD here is unauthenticated and unencrypted). */
  tcp?: TcpEndpoint;
  /** Default "disk". */
  exportName?: string;
  /** Open without the image lock (default true: the destination QEMU holds it). */
  forceShare?: boolean;
  /** Clients served at once (default 8). */
  maxClients?: number;
  /** The qemu-nbd binary (default "qemu-nbd" from PATH). */
  qemuNbd?: string;
  /** How long to wait for the socket to accept (default 10 s). */
  readyTimeoutMs?: number;
  log?: (line: string) => void;
}

export interface RunningNbdServer {
  address: NbdAddress;
  pid: number;
  /** Resolves when qemu-nbd has exited (with what it wrote to stderr). */
  exited: Promise<{ code: number | null; signal: string | null; stderr: string }>;
  /** SIGTERM by PID, then SIGKILL after 5 s; removes the socket. Idempotent. */
  stop(): Promise<void>;
}

/**
 * The qemu-nbd command line for `options` (exported for logs and tests). The image is given as --image-opts so
 * that `force-share=on` can be set: qemu-nbd 7.2 has no --force-share/-U switch (10.0 has), while the generic
 * block option works in both, and QEMU passes it down to the image's file and backing children. qemu-nbd changes
 * its directory to / at start, so the path is made absolute here.
 */
export function qemuNbdArgs(options: NbdServerOptions): string[] {
  const image = resolvePath(options.image);
  const fileDriver = isBlockDevice(image) ? "host_device" : "file";
  // QEMU's option syntax: a comma inside a value is written as two commas.
  const opts = [
    `driver=${options.format}`,
    "read-only=on",
    ...((options.forceShare ?? true) ? ["force-share=on"] : []),
    `file.driver=${fileDriver}`,
    `file.filename=${image.replaceAll(",", ",,")}`,
  ].join(",");
  return [
    "--read-only",
    ...listenArgs(options),
    `--export-name=${options.exportName ?? "disk"}`,
    "--persistent",
    `--shared=${options.maxClients ?? 8}`,
    "--image-opts",
    opts,
  ];
}

function listenArgs(options: NbdServerOptions): string[] {
  if (options.socketPath !== undefined && options.tcp === undefined)
    return [`--socket=${options.socketPath}`];
  if (options.tcp !== undefined && options.socketPath === undefined)
    return [`--bind=${options.tcp.host}`, `--port=${options.tcp.port}`];
  throw new StorageError(
    "give qemu-nbd either a unix socket path or a TCP address to listen on, not both or neither",
  );
}

function isBlockDevice(path: string): boolean {
  try {
    return statSync(path).isBlockDevice();
  } catch {
    return false; // qemu-nbd reports a missing image in its own words
  }
}

/** Starts qemu-nbd and resolves once its socket accepts connections; rejects with qemu-nbd's own message. */
export async function startNbdServer(options: NbdServerOptions): Promise<RunningNbdServer> {
  const binary = options.qemuNbd ?? "qemu-nbd";
  const args = qemuNbdArgs(options);
  const socketPath = options.socketPath;
  const removeSocket = () => {
    if (socketPath !== undefined) rmSync(socketPath, { force: true });
  };
  removeSocket();
  // Under setpriv --pdeathsig (util-linux), qemu-nbd dies with this process even if stop() never runs; setpriv
  // execs qemu-nbd, so the PID is qemu-nbd's.
  const child: ChildProcess = existsSync(SETPRIV)
    ? spawn(SETPRIV, ["--pdeathsig", "SIGKILL", "--", binary, ...args], {
        stdio: ["ignore", "ignore", "pipe"],
      })
    : spawn(binary, args, { stdio: ["ignore", "ignore", "pipe"] });
  let stderr = "";
  child.stderr?.setEncoding("utf8");
  child.stderr?.on("data", (text: string) => {
    stderr += text;
    for (const line of text.split("\n")) if (line.trim() !== "") options.log?.(`qemu-nbd: ${line}`);
  });
  let exitedNow: { code: number | null; signal: string | null; stderr: string } | undefined;
  const exited = new Promise<{ code: number | null; signal: string | null; stderr: string }>((resolve) => {
    child.on("error", (error) => {
      exitedNow = { code: null, signal: null, stderr: `${stderr}${error.message}` };
      resolve(exitedNow);
    });
    child.on("exit", (code, signal) => {
      exitedNow = { code, signal, stderr };
      resolve(exitedNow);
    });
  });
  const stop = async () => {
    if (!exitedNow && child.pid !== undefined) {
      process.kill(child.pid, "SIGTERM");
      const timer = setTimeout(() => {
        if (!exitedNow && child.pid !== undefined) process.kill(child.pid, "SIGKILL");
      }, 5000);
      await exited;
      clearTimeout(timer);
    }
    removeSocket();
  };
  const address: NbdAddress = {
    server: options.tcp ?? { path: socketPath as string },
    exportName: options.exportName ?? "disk",
  };
  const deadline = performance.now() + (options.readyTimeoutMs ?? 10_000);
  for (;;) {
    if (exitedNow) {
      removeSocket();
      throw new StorageError(
        `qemu-nbd could not export ${options.image} (${binary} ${args.join(" ")}): ` +
          `${exitedNow.stderr.trim() || `exit ${exitedNow.code ?? exitedNow.signal}`}`,
      );
    }
    const ready = await handshakes(address);
    if (ready === true) break;
    if (ready !== false) {
      await stop();
      throw ready;
    }
    if (performance.now() > deadline) {
      await stop();
      throw new StorageError(
        `qemu-nbd did not listen on ${formatEndpoint(address.server)} within ${options.readyTimeoutMs ?? 10_000} ms ` +
          `(${binary} ${args.join(" ")}): ${stderr.trim() || "no message"}`,
      );
    }
    await sleep(20);
  }
  options.log?.(
    `qemu-nbd (pid ${child.pid}) exports ${options.image} read-only on ${formatEndpoint(address.server)}`,
  );
  return {
    address,
    pid: child.pid as number,
    exited,
    stop,
  };
}

/**
 * True once the export answers a whole NBD handshake (a bare connect would make qemu-nbd log a failed
 * negotiation); false while the socket is not there yet; the error if the server refuses the export.
 */
async function handshakes(address: NbdAddress): Promise<boolean | Error> {
  try {
    const client = await NbdClient.connect(address, { connectTimeoutMs: 2000 });
    await client.close();
    return true;
  } catch (error) {
    const code = ((error as Error).cause as NodeJS.ErrnoException | undefined)?.code;
    return code === "ENOENT" || code === "ECONNREFUSED" || code === "ECONNRESET" ? false : (error as Error);
  }
}
