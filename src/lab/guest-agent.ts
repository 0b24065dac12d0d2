/**
 * Host side of the guest command channel: the lab guest runs `agent` (src/lab/guest/agent.c) on its second
 * serial port, which QEMU exposes as a unix socket. Protocol, one line each way (src/lab/guest/README.md):
 *
 *   host  → guest   VMPRUNE-REQ <id> <timeoutMs> <base64 command>
 *   guest → host    VMPRUNE-RES <id> <status> <base64 stdout|-> <base64 stderr|->
 *
 * Lines that are not replies (boot noise, a reply to a request of an earlier connection) are skipped, which
 * is what makes reconnecting after a migration safe. Requests go one at a time.
 */
import { createConnection, type Socket } from "node:net";
import { setTimeout as sleep } from "node:timers/promises";

export interface GuestCommandResult {
  status: number;
  stdout: string;
  stderr: string;
}

/** The guest command exited non-zero (see `result`). */
export class GuestCommandError extends Error {
  constructor(
    readonly command: string,
    readonly result: GuestCommandResult,
  ) {
    const detail = (result.stderr || result.stdout).trim().split("\n").slice(-5).join(" | ");
    super(
      `guest command '${command}' exited ${result.status}${result.status === 124 ? " (timed out)" : ""}: ${detail}`,
    );
    this.name = "GuestCommandError";
  }
}

/** No reply from the guest agent within the deadline (guest hung, not booted, or paused). */
export class GuestAgentTimeout extends Error {
  constructor(message: string) {
    super(message);
    this.name = "GuestAgentTimeout";
  }
}

const REQ = "VMPRUNE-REQ";
const RES = "VMPRUNE-RES";

function decodeField(field: string | undefined): string {
  return !field || field === "-" ? "" : Buffer.from(field, "base64").toString("utf8");
}

/** Parses a reply line; undefined for any other line. */
export function parseReply(line: string): { id: number; result: GuestCommandResult } | undefined {
  const parts = line.trim().split(" ");
  if (parts[0] !== RES || parts.length !== 5) return undefined;
  const id = Number(parts[1]);
  const status = Number(parts[2]);
  if (!Number.isInteger(id) || !Number.isInteger(status)) return undefined;
  return { id, result: { status, stdout: decodeField(parts[3]), stderr: decodeField(parts[4]) } };
}

export function formatRequest(id: number, timeoutMs: number, command: string): string {
  return `${REQ} ${id} ${Math.max(0, Math.round(timeoutMs))} ${Buffer.from(command, "utf8").toString("base64")}\n`;
}

export class GuestAgent {
  private socket: Socket | undefined;
  private buffer = "";
  private nextId = 1 + Math.floor(Math.random() * 1_000_000);
  private waiter:
    | { id: number; resolve: (r: GuestCommandResult) => void; reject: (e: Error) => void }
    | undefined;
  private queue: Promise<unknown> = Promise.resolve();

  /** `describeClose` adds what is known about why the connection closed (QEMU's exit, the console's last lines). */
  constructor(
    readonly socketPath: string,
    private readonly describeClose: () => string = () => "did QEMU exit?",
  ) {}

  private async connection(): Promise<Socket> {
    if (this.socket && !this.socket.destroyed) return this.socket;
    const socket = await new Promise<Socket>((resolve, reject) => {
      const s = createConnection(this.socketPath);
      s.once("connect", () => resolve(s));
      s.once("error", (error) =>
        reject(new Error(`guest agent socket ${this.socketPath}: ${error.message}`)),
      );
    });
    socket.setEncoding("utf8");
    socket.on("data", (chunk: string) => this.onData(chunk));
    socket.on("error", () => socket.destroy());
    // QEMU exited (guest panic, kill): fail the command now rather than at its timeout.
    socket.on("close", () => {
      if (this.socket === socket) this.socket = undefined;
      const waiter = this.waiter;
      this.waiter = undefined;
      if (waiter)
        waiter.reject(
          new Error(`guest agent connection ${this.socketPath} closed (${this.describeClose()})`),
        );
    });
    this.socket = socket;
    this.buffer = "";
    return socket;
  }

  private onData(chunk: string): void {
    this.buffer += chunk;
    for (let at = this.buffer.indexOf("\n"); at >= 0; at = this.buffer.indexOf("\n")) {
      const reply = parseReply(this.buffer.slice(0, at));
      this.buffer = this.buffer.slice(at + 1);
      if (reply && this.waiter && reply.id === this.waiter.id) {
        const { resolve } = this.waiter;
        this.waiter = undefined;
        resolve(reply.result);
      }
    }
    // A runaway line without newline must not grow without bound.
    if (this.buffer.length > 64 * 1024 * 1024) this.buffer = "";
  }

  /** Runs `command` in the guest (`/bin/sh -c`); resolves with its status and output, whatever the status. */
  exec(command: string, timeoutMs = 60_000): Promise<GuestCommandResult> {
    const next = this.queue.then(() => this.execNow(command, timeoutMs));
    this.queue = next.catch(() => undefined);
    return next;
  }

  private execNow(command: string, timeoutMs: number): Promise<GuestCommandResult> {
    // The guest kills the command at timeoutMs; the host waits a little longer for that reply.
    return this.send(command, timeoutMs, timeoutMs + 5_000);
  }

  private async send(
    command: string,
    guestTimeoutMs: number,
    hostTimeoutMs: number,
  ): Promise<GuestCommandResult> {
    const socket = await this.connection();
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiter = undefined;
        reject(new GuestAgentTimeout(`guest agent: no reply to '${command}' within ${hostTimeoutMs} ms`));
      }, hostTimeoutMs);
      this.waiter = {
        id,
        resolve: (r) => {
          clearTimeout(timer);
          resolve(r);
        },
        reject: (e) => {
          clearTimeout(timer);
          reject(e);
        },
      };
      socket.write(formatRequest(id, guestTimeoutMs, command));
    });
  }

  /** Like exec, but a non-zero status throws GuestCommandError; returns stdout. */
  async run(command: string, timeoutMs = 60_000): Promise<string> {
    const result = await this.exec(command, timeoutMs);
    if (result.status !== 0) throw new GuestCommandError(command, result);
    return result.stdout;
  }

  /** Waits until the agent answers (the guest has booted), pinging every `pingMs`. */
  async waitReady(timeoutMs: number, pingMs = 1_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    let lastError: unknown;
    while (Date.now() < deadline) {
      try {
        const r = await this.send("true", pingMs, pingMs);
        if (r.status === 0) return;
      } catch (error) {
        lastError = error;
        this.disconnect();
        await sleep(200);
      }
    }
    throw new GuestAgentTimeout(
      `guest agent at ${this.socketPath} did not answer within ${timeoutMs} ms (${lastError instanceof Error ? lastError.message : "no reply"})`,
    );
  }

  disconnect(): void {
    this.socket?.destroy();
    this.socket = undefined;
    this.waiter = undefined;
  }
}
