/**
 * Two libvirt "hosts" on this one machine, for tests of vmprune's libvirt entry point: two `libvirtd` daemons
 * (Debian 12's libvirt 9.0) in session mode under a dedicated unprivileged user, each with its own config,
 * runtime and state directories (XDG_* variables) and its own host UUID, so they never touch a system daemon and
 * libvirt accepts a migration between them. Each daemon runs in its own mount namespace (`unshare -m`) where a
 * per-host folder is bind-mounted over one shared "view" path: the domain XML names the same paths on both sides
 * (agent socket, console file, second QMP socket, `--migrateuri unix:///VIEW/mig.sock`), and each host sees its
 * own files there, as two machines would. From outside (this process, root) each host's files are under
 * `host.hostDir`. Guest RAM is a shared file-backed memory backend; the data disk is one raw image both daemons
 * open (shared storage). Everything started here is stopped by PID in `stop()`, also when a test fails.
 * Findings and commands: docs/libvirt-lab.md.
 */
import { type ChildProcess, spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import { closeSync, existsSync, openSync, readdirSync, readFileSync, rmSync } from "node:fs";
import { chmod, chown, copyFile, mkdir, readFile, rm, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { processAlive, trackPath, trackProcess, untrackPath, untrackProcess } from "./cleanup.ts";
import { run } from "./exec.ts";
import { GuestAgent } from "./guest-agent.ts";
import type { GuestImage } from "./guest-image.ts";
import { DISK_SERIAL } from "./initramfs.ts";

/**
 * Debian 12 packages the libvirt lab needs (also in scripts/setup.sh): `libvirtd` (libvirt-daemon), its QEMU
 * driver (libvirt-daemon-driver-qemu) and `virsh` (libvirt-clients). Not libvirt-daemon-system: that one brings
 * the system daemon's service units, which the lab must not start.
 */
export const LIBVIRT_PACKAGES = ["libvirt-daemon", "libvirt-daemon-driver-qemu", "libvirt-clients"] as const;

/** The unprivileged user both session daemons (and so their QEMUs) run as; created on first use. */
export const LAB_USER = "vmprune-lab";

/** Root of the lab's folders; short, since unix socket paths stay under 108 bytes. */
export const LIBVIRT_LAB_ROOT = "/tmp/vmprune-lv";

/** The QEMU libvirt runs for lab domains: Debian 12's 7.2 (libvirt probes its capabilities once per binary). */
export const LAB_EMULATOR = "/usr/bin/qemu-system-x86_64";

/** Host UUIDs libvirt puts in its migration cookie; equal ones are refused ("Attempt to migrate guest to the same host"). */
const HOST_UUIDS = {
  src: "11111111-1111-4111-8111-111111111111",
  dst: "22222222-2222-4222-8222-222222222222",
} as const;

export type HostRole = keyof typeof HOST_UUIDS;

/** Installs LIBVIRT_PACKAGES that are missing (dpkg-query first: a second run only checks). */
export async function ensureLibvirtPackages(log: (line: string) => void = () => undefined): Promise<void> {
  const missing: string[] = [];
  for (const name of LIBVIRT_PACKAGES) {
    const status = await run("dpkg-query", ["-W", `-f=${"$"}{Status}`, name]).catch(() => "");
    if (!status.includes("install ok installed")) missing.push(name);
  }
  if (missing.length === 0) return;
  log(`libvirt lab: installing ${missing.join(" ")}`);
  const env = { ...process.env, DEBIAN_FRONTEND: "noninteractive" };
  await run("apt-get", ["update", "-q"], { env });
  await run("apt-get", ["install", "-y", "-q", "--no-install-recommends", ...missing], { env });
}

/** The lab user's uid and gid, creating the user (system account, no home, no shell) if needed. */
export async function ensureLabUser(): Promise<{ uid: number; gid: number }> {
  const ids = async () => ({
    uid: Number((await run("id", ["-u", LAB_USER])).trim()),
    gid: Number((await run("id", ["-g", LAB_USER])).trim()),
  });
  try {
    return await ids();
  } catch {
    await run("useradd", [
      "--system",
      "--no-create-home",
      "--home-dir",
      "/nonexistent",
      "--shell",
      "/usr/sbin/nologin",
      LAB_USER,
    ]);
    return ids();
  }
}

/** One libvirt daemon: a "host" of the lab. */
export class LibvirtHost {
  constructor(
    readonly role: HostRole,
    /** This host's state: XDG folders, the daemon's log, `host/` (what the view shows inside its namespace). */
    readonly dir: string,
    /** The path every domain file is named by, inside this host's mount namespace. */
    readonly viewDir: string,
    readonly daemon: ChildProcess,
    readonly daemonPid: number,
    readonly exited: Promise<void>,
  ) {}

  /** The folder bind-mounted over the view in this host's namespace: its files as seen from outside. */
  get hostDir(): string {
    return join(this.dir, "host");
  }
  get configDir(): string {
    return join(this.dir, "config");
  }
  get runtimeDir(): string {
    return join(this.dir, "runtime");
  }
  /** libvirtd's socket in session mode: $XDG_RUNTIME_DIR/libvirt/libvirt-sock. */
  get socketPath(): string {
    return join(this.runtimeDir, "libvirt", "libvirt-sock");
  }
  /** The URI for virsh on this machine. */
  get uri(): string {
    return `qemu:///session?socket=${this.socketPath}`;
  }
  /** The URI the other daemon connects to for a peer-to-peer migration (`virsh migrate --p2p ... DESTURI`). */
  get peerUri(): string {
    return `qemu+unix:///session?socket=${this.socketPath}`;
  }
  /** A view path as seen from outside this host's namespace. */
  outside(viewPath: string): string {
    if (!viewPath.startsWith(`${this.viewDir}/`)) return viewPath;
    return join(this.hostDir, viewPath.slice(this.viewDir.length + 1));
  }
  /**
   * The PID file libvirt writes for a running domain: <stateDir>/<name>.pid, where a session daemon's stateDir is
   * $XDG_RUNTIME_DIR/libvirt/qemu/run (src/qemu/qemu_conf.c, virQEMUDriverConfigNew).
   */
  pidFile(domain: string): string {
    return join(this.runtimeDir, "libvirt", "qemu", "run", `${domain}.pid`);
  }
  /** The domain's QEMU PID, if the domain runs here. */
  qemuPid(domain: string): number | undefined {
    try {
      const pid = Number.parseInt(readFileSync(this.pidFile(domain), "utf8"), 10);
      return Number.isFinite(pid) && processAlive(pid) ? pid : undefined;
    } catch {
      return undefined;
    }
  }

  virsh(args: readonly string[], timeoutMs = 120_000): Promise<string> {
    return run("virsh", ["-c", this.uri, ...args], { timeoutMs });
  }
}

export interface LabDomainOptions {
  name: string;
  image: GuestImage;
  /** Raw data disk (ext4 with the lab's files), opened by both hosts. */
  dataDisk: string;
  memoryMiB?: number;
  /** `<access mode='shared'/>` (default) or 'private': the share=off trap. */
  memoryAccess?: "shared" | "private";
  /** Give QEMU a second QMP monitor at VIEW/qmp.sock through `<qemu:commandline>` (default true). */
  secondMonitor?: boolean;
}

/**
 * A lab domain: kernel + initramfs + data disk, TCG (type 'qemu'), 1 vCPU, file-backed RAM, console on serial 0
 * (a file), the lab agent on serial 1 (a unix socket, as src/lab/vm.ts wires `-serial chardev:agent`).
 */
export function labDomainXml(options: LabDomainOptions, viewDir: string): string {
  const memoryMiB = options.memoryMiB ?? 512;
  const access = options.memoryAccess ?? "shared";
  const monitor =
    options.secondMonitor === false
      ? ""
      : `  <qemu:commandline>
    <qemu:arg value='-qmp'/>
    <qemu:arg value='unix:${viewDir}/qmp.sock,server=on,wait=off'/>
  </qemu:commandline>
`;
  return `<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>${options.name}</name>
  <memory unit='MiB'>${memoryMiB}</memory>
  <vcpu>1</vcpu>
  <memoryBacking>
    <source type='file'/>
    <access mode='${access}'/>
  </memoryBacking>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>${options.image.kernel.vmlinuz}</kernel>
    <initrd>${options.image.initrd}</initrd>
    <cmdline>${options.image.cmdline}</cmdline>
  </os>
  <features><acpi/></features>
  <!-- src/lab/vm.ts defaultCpu: QEMU 7.2's TCG needs the guest without CMPXCHG16B -->
  <cpu mode='custom' match='exact'><model fallback='forbid'>qemu64</model><feature policy='disable' name='cx16'/></cpu>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>${LAB_EMULATOR}</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='${options.dataDisk}'/>
      <target dev='vda' bus='virtio'/>
      <serial>${DISK_SERIAL.data}</serial>
    </disk>
    <serial type='file'><source path='${viewDir}/console.log'/><target port='0'/></serial>
    <serial type='unix'><source mode='bind' path='${viewDir}/agent.sock'/><target port='1'/></serial>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
${monitor}</domain>
`;
}

export class LibvirtLab {
  private stopped = false;
  private readonly agents = new Map<HostRole, GuestAgent>();

  private constructor(
    readonly dir: string,
    readonly viewDir: string,
    readonly user: { uid: number; gid: number },
    readonly src: LibvirtHost,
    readonly dst: LibvirtHost,
  ) {}

  /** Installs what is missing, sweeps what killed runs left, then starts both daemons (answering virsh). */
  static async start(log: (line: string) => void = () => undefined): Promise<LibvirtLab> {
    await ensureLibvirtPackages(log);
    const swept = sweepStaleLibvirtLabs();
    if (swept.killed.length > 0 || swept.removed.length > 0)
      log(
        `libvirt lab: swept stale runs: killed ${swept.killed.join(", ") || "none"}, removed ${swept.removed.length} folders`,
      );
    const user = await ensureLabUser();
    const dir = join(LIBVIRT_LAB_ROOT, `${process.pid}-${randomBytes(3).toString("hex")}`);
    const viewDir = join(dir, "view");
    await mkdir(viewDir, { recursive: true });
    trackPath(dir);
    await chmod(LIBVIRT_LAB_ROOT, 0o755);
    const started: LibvirtHost[] = [];
    try {
      for (const role of ["src", "dst"] as const)
        started.push(await LibvirtLab.startHost(role, dir, viewDir, user));
      await chown(dir, user.uid, user.gid);
      await chown(viewDir, user.uid, user.gid);
      const [src, dst] = started as [LibvirtHost, LibvirtHost];
      return new LibvirtLab(dir, viewDir, user, src, dst);
    } catch (error) {
      await Promise.allSettled(started.map((host) => stopDaemon(host)));
      await rm(dir, { recursive: true, force: true });
      untrackPath(dir);
      throw error;
    }
  }

  private static async startHost(
    role: HostRole,
    labDir: string,
    viewDir: string,
    user: { uid: number; gid: number },
  ): Promise<LibvirtHost> {
    const dir = join(labDir, role);
    for (const sub of ["config/libvirt", "runtime", "data", "cache", "host"])
      await mkdir(join(dir, sub), { recursive: true });
    // libvirtd.conf `host_uuid` (src/remote/libvirtd.conf.in); in session mode read from $XDG_CONFIG_HOME/libvirt.
    await writeFile(join(dir, "config/libvirt/libvirtd.conf"), `host_uuid = "${HOST_UUIDS[role]}"\n`);
    await run("chown", ["-R", `${user.uid}:${user.gid}`, dir]);
    await chmod(join(dir, "runtime"), 0o700);
    const env = [
      `HOME=${dir}`,
      `XDG_CONFIG_HOME=${join(dir, "config")}`,
      `XDG_RUNTIME_DIR=${join(dir, "runtime")}`,
      `XDG_DATA_HOME=${join(dir, "data")}`,
      `XDG_CACHE_HOME=${join(dir, "cache")}`,
      "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
    ];
    // unshare (no --fork) and sh both exec: the PID is libvirtd's. The bind mount exists in this namespace only.
    const script = `mount --bind '${join(dir, "host")}' '${viewDir}' && exec setpriv --reuid=${user.uid} --regid=${user.gid} --clear-groups --pdeathsig KILL env -i ${env.join(" ")} libvirtd`;
    const logFd = openSync(join(dir, "libvirtd.log"), "a");
    const daemon = spawn("unshare", ["-m", "--propagation", "private", "sh", "-c", script], {
      stdio: ["ignore", logFd, logFd],
    });
    closeSync(logFd);
    const pid = daemon.pid;
    if (pid === undefined) throw new Error(`cannot start libvirtd for ${role}: spawn failed`);
    trackProcess(pid);
    const exited = new Promise<void>((resolve) =>
      daemon.once("exit", () => {
        untrackProcess(pid);
        resolve();
      }),
    );
    const host = new LibvirtHost(role, dir, viewDir, daemon, pid, exited);
    const deadline = Date.now() + 30_000;
    for (;;) {
      if (existsSync(host.socketPath)) {
        try {
          await host.virsh(["version"], 10_000);
          return host;
        } catch {
          // not answering yet
        }
      }
      if (!processAlive(pid) || Date.now() > deadline) {
        const log = await readFile(join(dir, "libvirtd.log"), "utf8").catch(() => "");
        await stopDaemon(host);
        throw new Error(`libvirtd (${role}) did not start: ${log.trim().split("\n").slice(-5).join(" | ")}`);
      }
      await sleep(200);
    }
  }

  /** A copy of `source` under the lab's folder, owned by the lab user (both daemons open it: shared storage). */
  async sharedCopy(source: string, name: string): Promise<string> {
    const path = join(this.dir, name);
    await copyFile(source, path);
    await chown(path, this.user.uid, this.user.gid);
    return path;
  }

  /** Defines the domain on the source host (persistent) and starts it; with `boot`, waits for the agent. */
  async startDomain(options: LabDomainOptions & { boot?: boolean; bootTimeoutMs?: number }): Promise<void> {
    const xmlPath = join(this.dir, `${options.name}.xml`);
    await writeFile(xmlPath, labDomainXml(options, this.viewDir));
    await this.src.virsh(["define", xmlPath]);
    await this.src.virsh(["start", options.name]);
    const pid = this.src.qemuPid(options.name);
    if (pid !== undefined) trackProcess(pid);
    if (options.boot !== false) await this.agent(this.src).waitReady(options.bootTimeoutMs ?? 180_000);
  }

  /**
   * The guest agent of the domain running on `host`: one connection per host (QEMU's chardev serves one client),
   * closed by stop().
   */
  agent(host: LibvirtHost): GuestAgent {
    let agent = this.agents.get(host.role);
    if (!agent) {
      agent = new GuestAgent(
        host.outside(join(this.viewDir, "agent.sock")),
        () => `libvirt ${host.role}: console: ${this.consoleTail(host)}`,
      );
      this.agents.set(host.role, agent);
    }
    return agent;
  }

  /** A new agent connection to `host` (after the domain left it and came back, the old one is dead). */
  freshAgent(host: LibvirtHost): GuestAgent {
    this.agents.get(host.role)?.disconnect();
    this.agents.delete(host.role);
    return this.agent(host);
  }

  consoleTail(host: LibvirtHost, lines = 10): string {
    try {
      return readFileSync(join(host.hostDir, "console.log"), "utf8")
        .trim()
        .split("\n")
        .slice(-lines)
        .join("\n");
    } catch {
      return "(no console output)";
    }
  }

  /** What each daemon logged (for failing tests). */
  daemonLogs(): string {
    return [this.src, this.dst]
      .map((host) => {
        try {
          const text = readFileSync(join(host.dir, "libvirtd.log"), "utf8").trim().split("\n").slice(-8);
          return `${host.role} libvirtd: ${text.join(" | ")}`;
        } catch {
          return `${host.role} libvirtd: (no log)`;
        }
      })
      .join("\n");
  }

  /**
   * Destroys every domain on both hosts (their QEMUs are libvirtd's children only until they daemonize: each is
   * also killed by the PID in its PID file), ends both daemons by PID and removes the lab's folder.
   */
  async stop(): Promise<void> {
    if (this.stopped) return;
    this.stopped = true;
    for (const agent of this.agents.values()) agent.disconnect();
    for (const host of [this.src, this.dst]) {
      const names = await host.virsh(["list", "--all", "--name"], 30_000).catch(() => "");
      for (const name of names
        .split("\n")
        .map((n) => n.trim())
        .filter(Boolean)) {
        const pid = host.qemuPid(name);
        await host.virsh(["destroy", name], 30_000).catch(() => undefined);
        if (pid !== undefined && processAlive(pid)) killPid(pid);
        if (pid !== undefined) untrackProcess(pid);
      }
    }
    await Promise.allSettled([stopDaemon(this.src), stopDaemon(this.dst)]);
    await rm(this.dir, { recursive: true, force: true });
    untrackPath(this.dir);
  }
}

/** SIGKILL by PID; false if there was no such process (anymore). */
function killPid(pid: number): boolean {
  try {
    process.kill(pid, "SIGKILL");
    return true;
  } catch {
    return false;
  }
}

async function stopDaemon(host: LibvirtHost): Promise<void> {
  if (processAlive(host.daemonPid)) {
    try {
      process.kill(host.daemonPid, "SIGTERM");
    } catch {
      // gone
    }
    const inTime = await Promise.race([host.exited.then(() => true), sleep(10_000).then(() => false)]);
    if (!inTime) {
      killPid(host.daemonPid);
      await host.exited;
    }
  }
}

/**
 * What a killed run left (its `stop()` never ran): for each lab folder whose owner process (the PID its name starts
 * with) is gone, every process that belongs to it is killed by PID: a QEMU names the folder on its command line
 * (its RAM file and sockets lie inside), a libvirtd has HOME inside it (its environment). Then the folder goes.
 * A daemon's QEMUs outlive it (they are reparented when libvirtd dies), so they are found the same way.
 */
export function sweepStaleLibvirtLabs(): { killed: number[]; removed: string[] } {
  const killed: number[] = [];
  const removed: string[] = [];
  const stale = (existsSync(LIBVIRT_LAB_ROOT) ? readdirSync(LIBVIRT_LAB_ROOT) : [])
    .filter((entry) => {
      const owner = Number.parseInt(entry, 10);
      return Number.isFinite(owner) && !processAlive(owner);
    })
    .map((entry) => join(LIBVIRT_LAB_ROOT, entry));
  if (stale.length === 0) return { killed, removed };
  for (const entry of readdirSync("/proc")) {
    if (!/^\d+$/.test(entry)) continue;
    const pid = Number(entry);
    const read = (file: string) => {
      try {
        return readFileSync(`/proc/${pid}/${file}`, "utf8");
      } catch {
        return "";
      }
    };
    const cmdline = read("cmdline");
    const environ = read("environ").split("\0");
    const belongs = stale.some(
      (dir) =>
        cmdline.includes(`${dir}/`) ||
        environ.includes(`HOME=${dir}/src`) ||
        environ.includes(`HOME=${dir}/dst`),
    );
    if (belongs && killPid(pid)) killed.push(pid);
  }
  for (const dir of stale) {
    rmSync(dir, { recursive: true, force: true });
    removed.push(dir);
  }
  return { killed, removed };
}
