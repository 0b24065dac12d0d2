/**
 * Drives one live migration between two QEMUs with QMP: same capabilities on both ends, `migrate-incoming` on
 * the destination (started with -incoming defer), `migrate` on the source, then polling `query-migrate` until
 * QEMU reports an end state. Only QEMU's own path; vmprune's relay sits between the two URIs it is given.
 */
import { setTimeout as sleep } from "node:timers/promises";
import type { MigrationInfo, QmpClient, QmpEvent } from "./qmp.ts";

export interface MigrationOptions {
  /** Where the destination listens, e.g. "tcp:127.0.0.1:0" (port 0: QEMU picks one; see listenAddress). */
  incomingUri: string;
  /** Where the source connects; default: the address the destination reports. */
  connectUri?: string;
  capabilities?: Record<string, boolean>;
  /** migrate-set-parameters on the source (and the destination, for multifd-channels etc.). */
  parameters?: Record<string, unknown>;
  timeoutMs?: number;
  /**
   * Force at least this many pre-copy passes (dirty-bitmap syncs): the downtime limit stays at 1 ms until then,
   * so QEMU cannot switch over while the guest dirties memory; then it becomes `downtime-limit` (default 300).
   */
  minPasses?: number;
  /**
   * With minPasses: keep holding after the passes until this says so (e.g. until the XBZRLE cache had hits), so a
   * test does not depend on how fast passes with little to send go by. Up to `timeoutMs` like the rest.
   */
  holdUntil?: (info: MigrationInfo) => boolean;
  /** Called with every query-migrate answer while it runs. */
  onProgress?: (info: MigrationInfo) => void;
  pollMs?: number;
}

export interface MigrationResult {
  status: string;
  info: MigrationInfo;
  /** Wall time from `migrate` to the end state seen here. */
  wallMs: number;
  uri: string;
  /**
   * With minPasses: QEMU switched over while still held (downtime-limit 1 ms), i.e. before the passes or
   * `holdUntil` were done. It does when its threshold, bandwidth of its last 100 ms window × 1 ms, rounds to 0
   * bytes (a window that sent almost nothing): then a pass end with its dirty estimate at 0 completes the
   * migration without re-syncing the bitmap (QEMU 7.2 migration_iteration_run / ram_save_pending; 10.0 the
   * same through `!pending_size`).
   */
  endedWhileHeld: boolean;
}

/** Default parameters for loopback lab migrations: QEMU's default bandwidth cap (128 MiB/s) would dominate. */
export const LOOPBACK_PARAMETERS = { "max-bandwidth": 8 * 1024 * 1024 * 1024 };

export class MigrationFailed extends Error {
  constructor(
    message: string,
    readonly info: MigrationInfo | undefined,
  ) {
    super(message);
    this.name = "MigrationFailed";
  }
}

/** The address a destination listens on after `migrate-incoming` (QEMU reports the port it bound). */
export async function listenAddress(dst: QmpClient): Promise<string> {
  const info = (await dst.executeUntyped("query-migrate")) as {
    "socket-address"?: { type: string; host?: string; port?: string }[];
  };
  const address = info["socket-address"]?.find((a) => a.type === "inet");
  if (!address?.host || !address.port)
    throw new Error(`destination reports no listening address: ${JSON.stringify(info)}`);
  return `tcp:${address.host}:${address.port}`;
}

/** Host and port of a "tcp:HOST:PORT" migration URI. */
export function tcpAddress(uri: string): { host: string; port: number } {
  const m = /^tcp:(.+):(\d+)$/.exec(uri);
  if (!m?.[1] || !m[2]) throw new Error(`not a tcp:HOST:PORT migration address: ${uri}`);
  return { host: m[1], port: Number(m[2]) };
}

export async function prepareIncoming(
  dst: QmpClient,
  options: Pick<MigrationOptions, "incomingUri" | "capabilities" | "parameters">,
): Promise<string> {
  await setCapabilities(dst, options.capabilities);
  if (options.parameters) await dst.execute("migrate-set-parameters", options.parameters);
  await dst.execute("migrate-incoming", { uri: options.incomingUri });
  return options.incomingUri.endsWith(":0") ? listenAddress(dst) : options.incomingUri;
}

async function setCapabilities(
  qmp: QmpClient,
  capabilities: Record<string, boolean> | undefined,
): Promise<void> {
  const list = Object.entries(capabilities ?? {}).map(([capability, state]) => ({ capability, state }));
  if (list.length > 0) await qmp.execute("migrate-set-capabilities", { capabilities: list });
}

const END_STATES = new Set(["completed", "failed", "cancelled"]);

/** Starts the migration on the source and waits for its end; throws MigrationFailed unless it completed. */
export async function runMigration(
  src: QmpClient,
  connectUri: string,
  options: Omit<MigrationOptions, "incomingUri">,
): Promise<MigrationResult> {
  await setCapabilities(src, options.capabilities);
  const parameters = { ...LOOPBACK_PARAMETERS, ...options.parameters };
  const downtimeLimit = (parameters as { "downtime-limit"?: number })["downtime-limit"] ?? 300;
  let holding = (options.minPasses ?? 0) > 1;
  await src.execute("migrate-set-parameters", {
    ...parameters,
    "downtime-limit": holding ? 1 : downtimeLimit,
  });
  const started = performance.now();
  await src.execute("migrate", { uri: connectUri });
  const deadline = Date.now() + (options.timeoutMs ?? 300_000);
  let info: MigrationInfo = {};
  while (Date.now() < deadline) {
    info = await src.execute("query-migrate");
    options.onProgress?.(info);
    const passesDone = (info.ram?.["dirty-sync-count"] ?? 0) >= (options.minPasses ?? 0);
    if (holding && passesDone && (options.holdUntil?.(info) ?? true)) {
      holding = false;
      await src.execute("migrate-set-parameters", { "downtime-limit": downtimeLimit });
    }
    if (info.status && END_STATES.has(info.status)) break;
    await sleep(options.pollMs ?? 100);
  }
  const endedWhileHeld = holding && info.status === "completed";
  if (endedWhileHeld)
    await src.execute("migrate-set-parameters", { "downtime-limit": downtimeLimit }).catch(() => undefined);
  const wallMs = performance.now() - started;
  if (info.status !== "completed") {
    if (!info.status || !END_STATES.has(info.status))
      await src.execute("migrate_cancel").catch(() => undefined);
    throw new MigrationFailed(
      `migration to ${connectUri} ${info.status ?? "did not start"}${info["error-desc"] ? `: ${info["error-desc"]}` : ""}`,
      info,
    );
  }
  return { status: info.status, info, wallMs, uri: connectUri, endedWhileHeld };
}

/**
 * Waits until the destination has loaded the whole stream and reached `want`: "running" normally, "paused" when
 * it was started with -S. The source reports "completed" before the destination has finished loading the last
 * device state, so the destination is briefly still "inmigrate".
 */
export async function waitDestinationState(
  qmp: QmpClient,
  want: "running" | "paused",
  timeoutMs = 30_000,
): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  let status = "";
  while (Date.now() < deadline) {
    status = (await qmp.execute("query-status")).status;
    if (status === want) return;
    await sleep(100);
  }
  throw new Error(`destination is '${status}', not ${want}, ${timeoutMs} ms after the migration completed`);
}

/** Waits until the destination runs the guest (QEMU resumes it after the last RAM and device state). */
export function waitRunning(qmp: QmpClient, timeoutMs = 30_000): Promise<void> {
  return waitDestinationState(qmp, "running", timeoutMs);
}

/** QMP event timestamps are the host's wall clock (seconds and microseconds since the epoch), in ms. */
function eventMs(event: QmpEvent): number {
  return event.timestamp.seconds * 1000 + event.timestamp.microseconds / 1000;
}

/**
 * When the guest stopped and ran again across a migration, as both QEMUs' own events time it. The difference is
 * what the guest lived through, relay and link included (QEMU's `downtime` ends when the source has written its
 * last byte, which with a relay between is not when the destination runs).
 */
export interface GuestPause {
  /** The source's STOP (QEMU stops the guest to switch over), host wall clock in ms. */
  stoppedAtMs: number;
  /** The destination's RESUME, host wall clock in ms. */
  resumedAtMs: number;
}

/**
 * The guest's pause across a migration started at `sinceMs` (host wall clock, Date.now()): the source's last STOP
 * at or after it and the destination's first RESUME after that. Only meaningful when source and destination run
 * on one host clock (the lab); call it after the destination runs.
 */
export async function guestPause(
  src: QmpClient,
  dst: QmpClient,
  sinceMs: number,
  timeoutMs = 5_000,
): Promise<GuestPause> {
  const stops = src.events().filter((e) => e.event === "STOP" && eventMs(e) >= sinceMs);
  const stop = stops[stops.length - 1];
  if (!stop) throw new Error("the source sent no STOP event since the migration started");
  const stoppedAtMs = eventMs(stop);
  const resume = await dst.waitEvent("RESUME", (e) => eventMs(e) >= stoppedAtMs, timeoutMs);
  return { stoppedAtMs, resumedAtMs: eventMs(resume) };
}
