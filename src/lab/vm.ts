/**
 * One QEMU process running the lab guest: guest RAM in a shared memory-backend file under /dev/shm (so vmprune
 * can read it from outside), QMP and the guest agent on unix sockets, the serial console in a file.
 * `stop()` always ends the process (QMP quit, then SIGKILL by PID) and removes its files.
 */
import { spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import {
  closeSync,
  existsSync,
  mkdirSync,
  openSync,
  readdirSync,
  readFileSync,
  rmSync,
  writeFileSync,
} from "node:fs";
import { readFile } from "node:fs/promises";
import { dirname, join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { QmpClient } from "../qemu/qmp.ts";
import { processAlive, trackPath, trackProcess, untrackPath, untrackProcess } from "./cleanup.ts";
import { GuestAgent } from "./guest-agent.ts";
import type { GuestImage } from "./guest-image.ts";
import { DISK_SERIAL } from "./initramfs.ts";
import type { QemuBinary } from "./qemu-binaries.ts";

export type Accelerator = "kvm" | "tcg";

export interface VmConfig {
  /** Short name used in file names and logs ("src", "dst"). */
  name: string;
  qemu: QemuBinary;
  image: GuestImage;
  accel: Accelerator;
  memoryMiB: number;
  vcpus: number;
  /** CPU model; default: "host" under KVM, "qemu64" under TCG ("max" exposes LA57, i.e. 5-level paging). */
  cpu?: string;
  /** Machine type; default "q35" (QEMU resolves it to its own versioned q35). */
  machine?: string;
  /**
   * The id of the guest RAM's memory backend, which is also its RAMBlock's idstr in the migration stream (page
   * records name it); default "ram0". Source and destination must agree.
   */
  ramBackendId?: string;
  /**
   * Disk images (raw unless a format is given): `data` is the ext4 data disk (mounted at /data), `spare` a raw
   * scratch disk (kpageflags dumps), `data2` a second ext4 data disk (the guest does not mount it by itself).
   */
  disks: Partial<Record<keyof typeof DISK_SERIAL, string | { path: string; format: "raw" | "qcow2" }>>;
  /**
   * A second RAM block: a pc-dimm of this size backed by its own shared file (`<ramPath>.dimm0`), as memory
   * hot-plugged into the guest. Its RAMBlock's idstr is the backend id "dimm0".
   */
  dimmMiB?: number;
  /**
   * Guest RAM in anonymous memory (memory-backend-ram), as most production guests have it, instead of the shared
   * /dev/shm file: nothing outside QEMU can read it then (no RAM-compare oracle, no pruning with this VM as the
   * source). For destinations whose cost to load should be a production one: a read of an untouched shmem page
   * allocates and clears it, where anonymous memory maps the shared zero page, and QEMU reads every page a ZERO
   * record names (ram_handle_zero): in bench:link (cache-heavy, free+cache) that was half the destination QEMU's
   * CPU (perf), and most of the guest's pause.
   */
  anonymousRam?: boolean;
  /**
   * Fault in and clear all guest RAM when QEMU starts (the backend's `prealloc=on`), not on first write. For a
   * destination, this moves the kernel's clearing of the pages the stream lands in from the migration to before
   * it. On this lab's host that clearing is slow and uneven: perf on a cache-heavy destination QEMU found 87% of
   * its CPU in clear_page_erms; bench:link's destination QEMUs used 1.0-3.7 s of CPU per 512 MiB cache-heavy
   * migration and up to 6.2 s per mixed one on one day, 0.5-1.2 s on another, where a bare-metal host clears
   * 512 MiB in well under 0.1 s. Preallocated, they used 0.17-0.29 s.
   */
  preallocateRam?: boolean;
  /**
   * A virtio-balloon device. "free-page-hint": with VIRTIO_BALLOON_F_FREE_PAGE_HINT (QEMU's `free-page-hint=on`,
   * which needs an iothread), so during precopy QEMU asks the guest's virtio_balloon driver for free page blocks
   * and skips them (QEMU's own alternative to pruning). Source and destination must both have it: it is migrated
   * device state.
   */
  balloon?: "free-page-hint";
  /** Start with `-incoming defer`: the VM waits for `migrate-incoming`. */
  incoming?: boolean;
  /**
   * Run QEMU inside this named network namespace (`ip netns exec NAME`, see src/lab/netns.ts): its migration
   * sockets live there. QMP, the agent and the RAM file are filesystem paths, reachable from any namespace.
   * Absent: the caller's namespace.
   */
  netns?: string;
  extraArgs?: string[];
}

/** Folder for per-VM run folders (sockets must stay under 108 bytes of path). */
export const RUN_ROOT = "/tmp/vmprune-run";
/** Prefix of RAM files in /dev/shm; the owner's PID follows, so stale files can be attributed. */
export const SHM_PREFIX = "vmprune-";

/**
 * The guest CPU when none is asked for: the host's under KVM; under TCG `qemu64`, and on QEMU 7.2 without
 * CMPXCHG16B. QEMU 7.2's TCG emulation of `cmpxchg16b %gs:(...)` (the per-CPU fast path of the guest kernel's
 * SLUB allocator) corrupts guest state: Debian's 6.12 kernel panicked in kmem_cache_alloc with garbage in
 * EFLAGS during boot or the lab workloads (seen here, 2 of 2 runs); 10.0 runs it cleanly. Without the CPUID
 * bit the kernel takes its locked fallback.
 */
export function defaultCpu(config: Pick<VmConfig, "accel" | "qemu">): string {
  if (config.accel === "kvm") return "host";
  return config.qemu.version === "7.2" ? "qemu64,-cx16" : "qemu64";
}

/**
 * virtio-balloon with free page hinting (hw/virtio/virtio-balloon.c: `free-page-hint` requires `iothread`; the
 * hints are requested from the precopy notifier at each dirty-bitmap sync and processed on that iothread).
 */
export const BALLOON_FREE_PAGE_HINT_ARGS = [
  "-object",
  "iothread,id=iothread0",
  "-device",
  "virtio-balloon-pci,id=balloon0,free-page-hint=on,iothread=iothread0",
] as const;

export function dimmPath(ramPath: string): string {
  return `${ramPath}.dimm0`;
}

/** The lab VM's second QMP socket, free for tools while the lab's client holds the first. */
export function toolQmpPath(qmpPath: string): string {
  return join(dirname(qmpPath), "tools.sock");
}

export function qemuArgs(
  config: VmConfig,
  files: { ramPath: string; qmpPath: string; agentPath: string; consolePath: string },
): string[] {
  const ramSize = `${config.memoryMiB}M`;
  const ramId = config.ramBackendId ?? "ram0";
  const prealloc = config.preallocateRam ? ",prealloc=on" : "";
  const backend = (id: string, size: string, path: string) =>
    config.anonymousRam
      ? `memory-backend-ram,id=${id},size=${size}${prealloc}`
      : `memory-backend-file,id=${id},size=${size},mem-path=${path},share=on${prealloc}`;
  const cpu = config.cpu ?? defaultCpu(config);
  const args = [
    ...config.qemu.firmwareDirs.flatMap((d) => ["-L", d]),
    "-name",
    config.name,
    "-machine",
    `${config.machine ?? "q35"},accel=${config.accel},memory-backend=${ramId}`,
    "-cpu",
    cpu,
    "-smp",
    String(config.vcpus),
    "-m",
    config.dimmMiB ? `${ramSize},slots=1,maxmem=${config.memoryMiB + config.dimmMiB}M` : ramSize,
    "-object",
    backend(ramId, ramSize, files.ramPath),
    ...(config.dimmMiB
      ? [
          "-object",
          backend("dimm0", `${config.dimmMiB}M`, dimmPath(files.ramPath)),
          "-device",
          "pc-dimm,id=dimm0dev,memdev=dimm0",
        ]
      : []),
    "-nodefaults",
    "-no-user-config",
    "-display",
    "none",
    "-no-reboot",
    "-kernel",
    config.image.kernel.vmlinuz,
    "-initrd",
    config.image.initrd,
    "-append",
    config.image.cmdline,
    "-chardev",
    `file,id=console,path=${files.consolePath}`,
    "-serial",
    "chardev:console",
    "-chardev",
    `socket,id=agent,path=${files.agentPath},server=on,wait=off`,
    "-serial",
    "chardev:agent",
    "-qmp",
    `unix:${files.qmpPath},server=on,wait=off`,
    // A second monitor for tools (`vmprune inspect|migrate --qmp`): QEMU serves one client per QMP socket, and
    // the lab's own client holds the first for the VM's lifetime.
    "-qmp",
    `unix:${toolQmpPath(files.qmpPath)},server=on,wait=off`,
  ];
  for (const [role, disk] of Object.entries(config.disks) as [
    keyof typeof DISK_SERIAL,
    VmConfig["disks"][keyof typeof DISK_SERIAL],
  ][]) {
    if (!disk) continue;
    const { path, format } = typeof disk === "string" ? { path: disk, format: "raw" } : disk;
    args.push("-drive", `if=none,id=${role},file=${path},format=${format}`);
    args.push("-device", `virtio-blk-pci,drive=${role},serial=${DISK_SERIAL[role]}`);
  }
  if (config.balloon === "free-page-hint") args.push(...BALLOON_FREE_PAGE_HINT_ARGS);
  if (config.incoming) args.push("-incoming", "defer");
  args.push(...(config.extraArgs ?? []));
  return args;
}

export class Vm {
  private stopped = false;
  private exitInfo: { code: number | null; signal: string | null } | undefined;
  readonly exited: Promise<{ code: number | null; signal: string | null }>;
  readonly agent: GuestAgent;

  private constructor(
    readonly config: VmConfig,
    readonly pid: number,
    readonly runDir: string,
    readonly ramPath: string,
    exited: Promise<{ code: number | null; signal: string | null }>,
    public qmp: QmpClient | undefined,
  ) {
    this.exited = exited.then((info) => {
      this.exitInfo = info;
      return info;
    });
    this.agent = new GuestAgent(this.agentPath, () => this.deathReport());
  }

  get qmpPath(): string {
    return join(this.runDir, "qmp.sock");
  }
  /** A QMP socket no lab client holds: for `vmprune` commands run against this VM. */
  get toolQmpPath(): string {
    return toolQmpPath(this.qmpPath);
  }
  get agentPath(): string {
    return join(this.runDir, "agent.sock");
  }
  get consolePath(): string {
    return join(this.runDir, "console.log");
  }
  get logPath(): string {
    return join(this.runDir, "qemu.log");
  }
  get running(): boolean {
    return this.exitInfo === undefined;
  }

  /** Starts QEMU and connects QMP; the guest is still booting (see waitBooted). */
  static async start(config: VmConfig): Promise<Vm> {
    const id = `${process.pid}-${config.name}-${randomBytes(3).toString("hex")}`;
    const runDir = join(RUN_ROOT, id);
    const ramPath = join("/dev/shm", `${SHM_PREFIX}${id}.ram`);
    mkdirSync(runDir, { recursive: true });
    trackPath(runDir);
    trackPath(ramPath);
    if (config.dimmMiB) trackPath(dimmPath(ramPath));
    const files = {
      ramPath,
      qmpPath: join(runDir, "qmp.sock"),
      agentPath: join(runDir, "agent.sock"),
      consolePath: join(runDir, "console.log"),
    };
    const args = qemuArgs(config, files);
    writeFileSync(join(runDir, "cmdline"), [config.qemu.binary, ...args].join("\n"));
    const logFd = openSync(join(runDir, "qemu.log"), "a");
    // setpriv --pdeathsig: QEMU dies with this process even if it is SIGKILLed (util-linux). `ip netns exec`
    // execs its command without forking, so with a namespace the PID is still QEMU's and pdeathsig carries over.
    const netns = config.netns ? ["ip", "netns", "exec", config.netns] : [];
    const child = spawn("setpriv", ["--pdeathsig", "KILL", "--", ...netns, config.qemu.binary, ...args], {
      stdio: ["ignore", logFd, logFd],
      env: { ...process.env, ...config.qemu.env },
    });
    closeSync(logFd);
    const pid = child.pid;
    if (pid === undefined) throw new Error(`cannot start ${config.qemu.binary}: spawn failed`);
    trackProcess(pid);
    writeFileSync(join(runDir, "qemu.pid"), String(pid));
    const exited = new Promise<{ code: number | null; signal: string | null }>((resolve) =>
      child.once("exit", (code, signal) => {
        untrackProcess(pid);
        resolve({ code, signal });
      }),
    );
    const vm = new Vm(config, pid, runDir, ramPath, exited, undefined);
    try {
      vm.qmp = await vm.connectQmp(15_000);
    } catch (error) {
      const log = await vm.log();
      await vm.stop();
      throw new Error(
        `QEMU ${config.qemu.version} (${config.name}) did not start: ${log.trim() || String(error)}`,
      );
    }
    return vm;
  }

  private async connectQmp(timeoutMs: number): Promise<QmpClient> {
    const deadline = Date.now() + timeoutMs;
    while (Date.now() < deadline) {
      if (!this.running) throw new Error(`QEMU exited (${JSON.stringify(this.exitInfo)})`);
      if (existsSync(this.qmpPath)) {
        try {
          return await QmpClient.connect(
            this.qmpPath,
            5_000,
            () => `VM ${this.config.name}: ${this.deathReport()}`,
          );
        } catch {
          // socket not listening yet
        }
      }
      await sleep(50);
    }
    throw new Error(`no QMP socket at ${this.qmpPath} after ${timeoutMs} ms`);
  }

  /** QMP, which exists once start() returned. */
  get monitor(): QmpClient {
    if (!this.qmp) throw new Error(`VM ${this.config.name}: no QMP connection`);
    return this.qmp;
  }

  /** Waits until the guest agent answers; fails early if QEMU exits. */
  async waitBooted(timeoutMs = 120_000): Promise<void> {
    const exitedEarly = this.exited.then((info) => {
      throw new Error(
        `VM ${this.config.name}: QEMU exited during boot (${JSON.stringify(info)}); console: ${this.consoleTail()}`,
      );
    });
    try {
      await Promise.race([this.agent.waitReady(timeoutMs), exitedEarly]);
    } catch (error) {
      throw new Error(
        `VM ${this.config.name} did not boot: ${error instanceof Error ? error.message : String(error)}; console: ${this.consoleTail()}`,
      );
    }
    exitedEarly.catch(() => undefined);
  }

  /** Why the VM may have gone: QEMU's exit status (if it exited), its log and the console's last lines. */
  deathReport(): string {
    const status = this.exitInfo
      ? `QEMU exited: ${JSON.stringify(this.exitInfo)}`
      : "QEMU still running or exiting";
    let log = "";
    try {
      log = readFileSync(this.logPath, "utf8").trim().split("\n").slice(-5).join("\n");
    } catch {
      // no log
    }
    return `${status}; qemu.log: ${log || "(empty)"}; console: ${this.consoleTail()}`;
  }

  consoleTail(lines = 15): string {
    try {
      return readFileSync(this.consolePath, "utf8").trim().split("\n").slice(-lines).join("\n");
    } catch {
      return "(no console output)";
    }
  }

  async log(): Promise<string> {
    return readFile(this.logPath, "utf8").catch(() => "");
  }

  /** Ends QEMU (quit, then SIGKILL) and removes its RAM file and run folder. Safe to call twice. */
  async stop(): Promise<void> {
    if (this.stopped) return;
    this.stopped = true;
    this.agent.disconnect();
    if (this.running) {
      if (this.qmp && !this.qmp.closed) {
        await this.qmp.execute("quit", undefined, 2_000).catch(() => undefined);
      }
      const quitInTime = await Promise.race([this.exited.then(() => true), sleep(5_000).then(() => false)]);
      if (!quitInTime) {
        try {
          process.kill(this.pid, "SIGKILL");
        } catch {
          // exited meanwhile
        }
        await this.exited;
      }
    }
    this.qmp?.close();
    for (const file of [this.ramPath, dimmPath(this.ramPath)]) {
      rmSync(file, { force: true });
      untrackPath(file);
    }
    rmSync(this.runDir, { recursive: true, force: true });
    untrackPath(this.runDir);
  }
}

/**
 * Removes what crashed earlier runs left: for every run folder whose owner process is gone, kill its QEMU (only
 * if that PID still runs a command line naming the folder, so a reused PID is never hit) and delete its files.
 */
export function sweepStaleRuns(): { killed: number[]; removed: string[] } {
  const killed: number[] = [];
  const removed: string[] = [];
  const owners = new Set<number>();
  for (const entry of existsSync(RUN_ROOT) ? readdirSync(RUN_ROOT) : []) {
    const owner = Number.parseInt(entry, 10);
    if (!Number.isFinite(owner) || processAlive(owner)) continue;
    owners.add(owner);
    const dir = join(RUN_ROOT, entry);
    const qemuPid = Number.parseInt(readFileSafe(join(dir, "qemu.pid")), 10);
    if (Number.isFinite(qemuPid) && readFileSafe(`/proc/${qemuPid}/cmdline`).includes(dir)) {
      try {
        process.kill(qemuPid, "SIGKILL");
        killed.push(qemuPid);
      } catch {
        // gone
      }
    }
    rmSync(dir, { recursive: true, force: true });
    removed.push(dir);
  }
  for (const file of readdirSync("/dev/shm")) {
    if (!file.startsWith(SHM_PREFIX)) continue;
    const owner = Number.parseInt(file.slice(SHM_PREFIX.length), 10);
    if (Number.isFinite(owner) && !processAlive(owner)) {
      rmSync(join("/dev/shm", file), { force: true });
      removed.push(join("/dev/shm", file));
    }
  }
  return { killed, removed };
}

function readFileSafe(path: string): string {
  try {
    return readFileSync(path, "utf8");
  } catch {
    return "";
  }
}
