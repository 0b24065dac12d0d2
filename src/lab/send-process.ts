/**
 * `vmprune send` as its own process, the way an operator runs it: started with --listen 127.0.0.1:0 (or a unix
 * socket), its listening address read from its log, its JSON report read from stdout when it exits. Tracked by
 * PID, so a failing or interrupted test still stops it.
 */
import { type ChildProcess, spawn } from "node:child_process";
import { join } from "node:path";
import { RELAY_NODE_FLAGS } from "../cli/node-runtime.ts";
import type { SendReport } from "../migrate/send.ts";
import {
  type Endpoint,
  isUnixEndpoint,
  parseEndpoint,
  qemuMigrationUri,
  type TcpEndpoint,
} from "../transport/endpoint.ts";
import { trackProcess, untrackProcess } from "./cleanup.ts";
import { REPO_ROOT } from "./paths.ts";

export interface SendResult {
  code: number | null;
  signal: string | null;
  /** `send`'s JSON report (for `receive`, see `stdout`). */
  report: SendReport | null;
  stdout: string;
  stderr: string;
}

const CHILD_LOGS = process.env.VMPRUNE_CHILD_LOGS === "1";

export class SendProcess {
  private constructor(
    private readonly child: ChildProcess,
    /** Where it listens, as it logged it. */
    readonly endpoint: Endpoint,
    readonly exited: Promise<SendResult>,
    private readonly stderrText: () => string,
    private readonly stdoutText: () => string,
  ) {}

  get pid(): number {
    return this.child.pid ?? -1;
  }

  /** Its TCP listening address (it throws for a unix socket: see `endpoint`). */
  get listen(): TcpEndpoint {
    const endpoint = this.endpoint;
    if (isUnixEndpoint(endpoint))
      throw new Error(`vmprune listens on unix socket ${endpoint.path}, not on TCP`);
    return endpoint;
  }

  /** Where the source QEMU should migrate to: tcp:HOST:PORT or unix:/PATH. */
  get uri(): string {
    return qemuMigrationUri(this.endpoint);
  }

  get stderr(): string {
    return this.stderrText();
  }

  /** Complete lines on stdout so far (a receive service prints one JSON line per migration as it ends). */
  stdoutLines(): string[] {
    const text = this.stdoutText();
    return text
      .slice(0, text.lastIndexOf("\n") + 1)
      .split("\n")
      .filter((line) => line.trim() !== "");
  }

  static async start(options: {
    /** Absent only for a receive service (`extraArgs` with --allow-dir / --allow). */
    to?: string;
    capture?: string;
    extraArgs?: string[];
    /** `vmprune receive` instead of `send` (same listen/to/--json shape; its report has another shape). */
    command?: "send" | "receive";
    /** Where it listens (default 127.0.0.1:0); unix:/PATH for a unix socket. */
    listen?: string;
    /** Run it inside this network namespace (`ip netns exec` execs it: the PID stays the vmprune process's). */
    netns?: string;
    /**
     * Run the built CLI (dist/, `npm run build` first), as installed on hosts, instead of the sources through
     * tsx: what a benchmark of memory must measure (tsx adds ~35 MB to every process).
     */
    built?: boolean;
    /** How long it may take to listen (default 30 s; send builds a content index before it listens). */
    startTimeoutMs?: number;
  }): Promise<SendProcess> {
    const command = options.command ?? "send";
    // VMPRUNE_PROFILE_DIR: each process writes a V8 CPU profile there (node --cpu-prof), for finding where time goes.
    const profileDir = process.env.VMPRUNE_PROFILE_DIR;
    // First the flags the installed command runs with (its shebang); then VMPRUNE_NODE_FLAGS, more Node flags for
    // each process (e.g. --max-old-space-size=64, to see whether its memory is live data or the collector's
    // slack), which may override them: V8 takes a flag's last value (--initial-old-space-size=0 is its default).
    const profile = [
      ...RELAY_NODE_FLAGS,
      ...(profileDir ? ["--cpu-prof", `--cpu-prof-dir=${profileDir}`] : []),
      ...(process.env.VMPRUNE_NODE_FLAGS?.split(/\s+/).filter((flag) => flag.length > 0) ?? []),
    ];
    const args = options.built
      ? [...profile, join(REPO_ROOT, "dist/cli/main.js"), command]
      : [...profile, "--import", "tsx", join(REPO_ROOT, "src/cli/main.ts"), command];
    args.push("--listen", options.listen ?? "127.0.0.1:0", "--json");
    if (options.to !== undefined) args.push("--to", options.to.replace(/^tcp:/, ""));
    args.push(...(options.capture ? ["--capture", options.capture] : []), ...(options.extraArgs ?? []));
    const [file, argv] = options.netns
      ? ["ip", ["netns", "exec", options.netns, process.execPath, ...args]]
      : [process.execPath, args];
    const child = spawn(file, argv, { stdio: ["ignore", "pipe", "pipe"], cwd: REPO_ROOT });
    if (child.pid === undefined) throw new Error(`cannot start vmprune ${command}`);
    const pid = child.pid;
    trackProcess(pid);
    let stdout = "";
    let stderr = "";
    child.stdout?.setEncoding("utf8").on("data", (d: string) => {
      stdout += d;
    });
    const listening = new Promise<Endpoint>((resolve, reject) => {
      child.stderr?.setEncoding("utf8").on("data", (d: string) => {
        stderr += d;
        // VMPRUNE_CHILD_LOGS=1: the process's log also goes to ours as it comes (with VMPRUNE_GUARD_TRACE=1, say).
        if (CHILD_LOGS) process.stderr.write(d.replace(/^(?=.)/gm, `[${command} ${pid}] `));
        const m =
          /(?:vmprune (?:send|receive)|receive service): listening on (unix:\S+?|[\d.]+:\d+)[,;]/.exec(
            stderr,
          );
        if (m?.[1]) resolve(parseEndpoint(m[1]));
      });
      child.once("exit", () =>
        reject(new Error(`vmprune ${command} exited before listening: ${stderr.trim()}`)),
      );
    });
    const exited = new Promise<SendResult>((resolve) =>
      child.once("exit", (code, signal) => {
        untrackProcess(pid);
        let report: SendResult["report"] = null;
        try {
          report = JSON.parse(stdout) as SendResult["report"];
        } catch {
          // no report (killed)
        }
        resolve({ code, signal, report, stderr, stdout });
      }),
    );
    const timeout = setTimeout(() => child.kill("SIGKILL"), options.startTimeoutMs ?? 30_000);
    try {
      const listen = await listening;
      return new SendProcess(
        child,
        listen,
        exited,
        () => stderr,
        () => stdout,
      );
    } catch (error) {
      child.kill("SIGKILL");
      throw error;
    } finally {
      clearTimeout(timeout);
    }
  }

  /** Waits for the relay to finish (the migration's connections all closed). */
  async wait(timeoutMs = 120_000): Promise<SendResult> {
    const timer = setTimeout(() => this.kill(), timeoutMs);
    try {
      return await this.exited;
    } finally {
      clearTimeout(timer);
    }
  }

  kill(signal: NodeJS.Signals = "SIGKILL"): void {
    try {
      this.child.kill(signal);
    } catch {
      // gone
    }
  }

  async stop(): Promise<void> {
    this.kill();
    await this.exited;
  }
}
