/**
 * A QMP (QEMU Machine Protocol) client over a unix socket.
 *
 *   client                               QEMU
 *     |  <---- {"QMP": {version, capabilities}}   greeting, once
 *     |  {"execute":"qmp_capabilities"} -->       leaves negotiation mode
 *     |  {"execute":C,"arguments":A,"id":N} -->
 *     |  <---- {"return":R,"id":N} | {"error":{class,desc},"id":N}
 *     |  <---- {"event":E,"data":D,"timestamp":T}  at any time
 *
 * Messages are JSON objects separated by CRLF (docs/interop/qmp-spec.rst in QEMU's sources). Replies carry the
 * id of their command, so commands may be pipelined; events are kept in a bounded backlog so that a caller can
 * wait for an event that arrived just before it started waiting.
 */
import { EventEmitter } from "node:events";
import { createConnection, type Socket } from "node:net";

export interface QmpVersion {
  qemu: { major: number; minor: number; micro: number };
  package: string;
}

export interface QmpEvent {
  event: string;
  data: Record<string, unknown>;
  timestamp: { seconds: number; microseconds: number };
}

/** An error reply from QEMU: `class` is QMP's error class (GenericError, CommandNotFound, ...). */
export class QmpError extends Error {
  constructor(
    readonly command: string,
    readonly errorClass: string,
    readonly desc: string,
  ) {
    super(`QMP ${command} failed: ${errorClass}: ${desc}`);
    this.name = "QmpError";
  }
}

/** The connection to QEMU closed or never opened; pending commands fail with it. */
export class QmpConnectionError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "QmpConnectionError";
  }
}

export interface MigrationStats {
  transferred: number;
  remaining: number;
  total: number;
  duplicate: number;
  normal: number;
  "normal-bytes": number;
  "dirty-sync-count": number;
  mbps: number;
  "pages-per-second"?: number;
  "precopy-bytes"?: number;
  "downtime-bytes"?: number;
}

export interface MigrationInfo {
  status?: string;
  "total-time"?: number;
  "expected-downtime"?: number;
  downtime?: number;
  "setup-time"?: number;
  ram?: MigrationStats;
  "xbzrle-cache"?: Record<string, number>;
  "error-desc"?: string;
}

/** Commands the project uses, with their argument and return types (qapi/*.json in QEMU's sources). */
export interface QmpCommands {
  qmp_capabilities: { args: undefined; ret: Record<string, never> };
  "query-status": { args: undefined; ret: { status: string; running: boolean } };
  "query-version": { args: undefined; ret: QmpVersion };
  "query-migrate": { args: undefined; ret: MigrationInfo };
  migrate: { args: { uri: string; detach?: boolean }; ret: Record<string, never> };
  migrate_cancel: { args: undefined; ret: Record<string, never> };
  "migrate-incoming": { args: { uri: string }; ret: Record<string, never> };
  "migrate-set-capabilities": {
    args: { capabilities: { capability: string; state: boolean }[] };
    ret: Record<string, never>;
  };
  "migrate-set-parameters": { args: Record<string, unknown>; ret: Record<string, never> };
  stop: { args: undefined; ret: Record<string, never> };
  cont: { args: undefined; ret: Record<string, never> };
  quit: { args: undefined; ret: Record<string, never> };
  "human-monitor-command": { args: { "command-line": string }; ret: string };
}

interface Pending {
  command: string;
  resolve: (value: unknown) => void;
  reject: (error: Error) => void;
  timer: NodeJS.Timeout;
}

const EVENT_BACKLOG = 256;

export class QmpClient extends EventEmitter {
  private buffer = "";
  private nextId = 1;
  private readonly pending = new Map<number, Pending>();
  private readonly backlog: QmpEvent[] = [];
  private closedError: Error | undefined;
  version: QmpVersion | undefined;

  private constructor(
    private readonly socket: Socket,
    describeClose?: () => string,
  ) {
    super();
    socket.setEncoding("utf8");
    socket.on("data", (chunk: string) => this.onData(chunk));
    socket.on("error", (error) => this.fail(new QmpConnectionError(`QMP socket error: ${error.message}`)));
    socket.on("close", () =>
      this.fail(
        new QmpConnectionError(
          `QMP connection closed by QEMU${describeClose ? ` (${describeClose()})` : ""}`,
        ),
      ),
    );
  }

  /** Connects, reads the greeting and leaves capabilities negotiation. */
  static async connect(path: string, timeoutMs = 10_000, describeClose?: () => string): Promise<QmpClient> {
    const socket = await new Promise<Socket>((resolve, reject) => {
      const s = createConnection(path);
      const timer = setTimeout(() => {
        s.destroy();
        reject(new QmpConnectionError(`QMP: no connection to ${path} within ${timeoutMs} ms`));
      }, timeoutMs);
      s.once("connect", () => {
        clearTimeout(timer);
        resolve(s);
      });
      s.once("error", (error) => {
        clearTimeout(timer);
        reject(new QmpConnectionError(`QMP: cannot connect to ${path}: ${error.message}`));
      });
    });
    const client = new QmpClient(socket, describeClose);
    try {
      client.version = await client.waitGreeting(timeoutMs);
      await client.execute("qmp_capabilities", undefined, timeoutMs);
    } catch (error) {
      socket.destroy();
      if (client.version) throw error;
      throw new QmpConnectionError(
        `QMP: no greeting on ${path} within ${timeoutMs} ms: another client probably holds this monitor ` +
          "(QEMU serves one client per QMP socket); give QEMU another -qmp unix:PATH,server=on,wait=off for vmprune",
      );
    }
    return client;
  }

  private greetingWaiter: ((v: QmpVersion) => void) | undefined;

  private waitGreeting(timeoutMs: number): Promise<QmpVersion> {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new QmpConnectionError("QMP: no greeting from QEMU")), timeoutMs);
      this.greetingWaiter = (v) => {
        clearTimeout(timer);
        resolve(v);
      };
      this.once("connection-failed", (error: Error) => {
        clearTimeout(timer);
        reject(error);
      });
    });
  }

  private onData(chunk: string): void {
    this.buffer += chunk;
    for (let at = this.buffer.indexOf("\n"); at >= 0; at = this.buffer.indexOf("\n")) {
      const line = this.buffer.slice(0, at).trim();
      this.buffer = this.buffer.slice(at + 1);
      if (line) this.onMessage(line);
    }
  }

  private onMessage(line: string): void {
    let message: Record<string, unknown>;
    try {
      message = JSON.parse(line) as Record<string, unknown>;
    } catch {
      this.fail(new QmpConnectionError(`QMP: QEMU sent a line that is not JSON: ${line.slice(0, 200)}`));
      return;
    }
    if (typeof message.QMP === "object" && message.QMP !== null) {
      const version = (message.QMP as { version: QmpVersion }).version;
      this.greetingWaiter?.(version);
      this.greetingWaiter = undefined;
      return;
    }
    if (typeof message.event === "string") {
      const event = message as unknown as QmpEvent;
      this.backlog.push(event);
      if (this.backlog.length > EVENT_BACKLOG) this.backlog.shift();
      this.emit("event", event);
      return;
    }
    const id = typeof message.id === "number" ? message.id : undefined;
    const pending = id === undefined ? undefined : this.pending.get(id);
    if (!pending || id === undefined) return;
    this.pending.delete(id);
    clearTimeout(pending.timer);
    if ("error" in message) {
      const error = message.error as { class?: string; desc?: string };
      pending.reject(new QmpError(pending.command, error.class ?? "Unknown", error.desc ?? ""));
    } else {
      pending.resolve(message.return);
    }
  }

  private fail(error: Error): void {
    if (this.closedError) return;
    this.closedError = error;
    this.emit("connection-failed", error);
    for (const [id, p] of this.pending) {
      clearTimeout(p.timer);
      p.reject(new QmpConnectionError(`${error.message} (while running ${p.command})`));
      this.pending.delete(id);
    }
    this.socket.destroy();
  }

  execute<C extends keyof QmpCommands>(
    command: C,
    args?: QmpCommands[C]["args"],
    timeoutMs = 30_000,
  ): Promise<QmpCommands[C]["ret"]> {
    return this.executeUntyped(command, args as Record<string, unknown> | undefined, timeoutMs) as Promise<
      QmpCommands[C]["ret"]
    >;
  }

  /** Any command by name, for commands not in QmpCommands; the caller checks the shape of the result. */
  executeUntyped(command: string, args?: Record<string, unknown>, timeoutMs = 30_000): Promise<unknown> {
    if (this.closedError) return Promise.reject(this.closedError);
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new QmpConnectionError(`QMP ${command}: no reply within ${timeoutMs} ms`));
      }, timeoutMs);
      this.pending.set(id, { command, resolve, reject, timer });
      this.socket.write(
        `${JSON.stringify({ execute: command, ...(args ? { arguments: args } : {}), id })}\r\n`,
      );
    });
  }

  /** Runs a human monitor (HMP) command and returns its text output. */
  hmp(commandLine: string, timeoutMs = 30_000): Promise<string> {
    return this.execute("human-monitor-command", { "command-line": commandLine }, timeoutMs);
  }

  /** Events received so far (bounded backlog), oldest first. */
  events(): readonly QmpEvent[] {
    return this.backlog;
  }

  /** Resolves with the first event named `name` matching `predicate`, including one already in the backlog. */
  waitEvent(
    name: string,
    predicate: (e: QmpEvent) => boolean = () => true,
    timeoutMs = 60_000,
  ): Promise<QmpEvent> {
    const seen = this.backlog.find((e) => e.event === name && predicate(e));
    if (seen) return Promise.resolve(seen);
    return new Promise((resolve, reject) => {
      const onEvent = (e: QmpEvent) => {
        if (e.event !== name || !predicate(e)) return;
        cleanup();
        resolve(e);
      };
      const onFail = (error: Error) => {
        cleanup();
        reject(error);
      };
      const timer = setTimeout(() => {
        cleanup();
        reject(new Error(`QMP: no ${name} event within ${timeoutMs} ms`));
      }, timeoutMs);
      const cleanup = () => {
        clearTimeout(timer);
        this.off("event", onEvent);
        this.off("connection-failed", onFail);
      };
      this.on("event", onEvent);
      this.once("connection-failed", onFail);
    });
  }

  get closed(): boolean {
    return this.closedError !== undefined;
  }

  close(): void {
    this.fail(new QmpConnectionError("QMP connection closed by the client"));
  }
}
