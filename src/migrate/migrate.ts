/**
 * `vmprune migrate`: one whole live migration between two QEMUs on this host, through vmprune's relay.
 *
 *   destination (started with -incoming defer)   ← migrate-incoming tcp:127.0.0.1:0 (QEMU picks the port)
 *   relay (startSend)                             listens on 127.0.0.1:0, forwards to the destination
 *   source                                        ← migrate tcp:<relay>; query-migrate polled until it ends
 *
 * The return-path capability is on by default on both ends: with it the source waits for the destination's
 * verdict, so a stream the relay had to cut (a failed judge, a killed relay) fails the migration on the source
 * too, instead of looking "completed" there (invariant 5). Without `drop` (the baseline) the relay passes every
 * byte through, so the baseline pays the same relay cost as the pruned run.
 */

import { randomBytes } from "node:crypto";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { Category } from "../introspect/classifier.ts";
import type { ReassemblerStats } from "../link/ref-reassembler.ts";
import type { PruneReport } from "../prune/pruning-processor.ts";
import { guestPause, MigrationFailed, prepareIncoming, runMigration } from "../qemu/migration.ts";
import { type MigrationInfo, QmpClient } from "../qemu/qmp.ts";
import type { ThroughputSample } from "../report/report-model.ts";
import { ThroughputSampler } from "../report/throughput-sampler.ts";
import type { StreamSummaryJson } from "../stream/summary.ts";
import type { LinkSecurity } from "../transport/tls.ts";
import { startReceive } from "./link-receive.ts";
import type { RefsWhen } from "./link-send.ts";
import { openReceiveDisks } from "./receive-disks.ts";
import { startSend } from "./send.ts";

export interface MigrateOptions {
  srcQmp: string;
  dstQmp: string;
  /** The source QEMU's PID, if the QMP socket's owner cannot be found through /proc. */
  srcPid?: number;
  /** Categories to drop; empty: the baseline (relay in passthrough). "cache" runs vmprune receive too. */
  drop: readonly Category[];
  /** The shared raw disk image (for "cache"). */
  disk?: string;
  /** When cache pages go as references (link-send.ts RefsWhen; default "link-busy"). */
  refsWhen?: RefsWhen;
  /** Migration capabilities on both ends (default: return-path on). */
  capabilities?: Record<string, boolean>;
  /** migrate-set-parameters on the source, e.g. max-bandwidth in bytes/s (default: QEMU's current settings). */
  parameters?: Record<string, unknown>;
  timeoutMs?: number;
  /**
   * Read the relay's bytes towards the destination this often during the migration, for the report's
   * `linkThroughput` (a timer reading a counter the relay keeps anyway; nothing on the data path). Default: not.
   */
  throughputSampleMs?: number;
  onProgress?: (progress: MigrateProgress) => void;
  log?: (line: string) => void;
}

export interface MigrateProgress {
  status: string;
  elapsedMs: number;
  /** Bytes QEMU sent so far, and its estimate of what remains. */
  transferredBytes: number;
  remainingBytes: number;
  totalBytes: number;
  mbps: number;
  /** Pre-copy pass (dirty-bitmap syncs so far). */
  iteration: number;
  /** Pages dropped so far (main and multifd channels), and PAGE records judged by category (main channel). */
  pruned: number;
  byCategory: Record<Category, number> | null;
}

export interface MigrateReport {
  mode: "baseline" | "pruned";
  status: string;
  error: string | null;
  totalTimeMs: number;
  downtimeMs: number;
  /** Bytes QEMU wrote (query-migrate transferred) and bytes the relay wrote to the destination (all channels). */
  sourceBytes: number;
  wireBytes: number;
  iterations: number;
  /** What the source sent on the main channel, by record type. */
  records: StreamSummaryJson["ram"]["records"] | null;
  prune: PruneReport | null;
  /** With --drop cache: references rebuilt by receive from the shared disk, NACKed, answered. */
  receive: ReassemblerStats | null;
  /** Where the destination ended: "running", or "paused" when it was started with -S. */
  destinationStatus: string;
  /**
   * ms from `migrate` to the source's STOP and to the destination's RESUME (both QEMUs' events): the guest's
   * pause is their difference, the time to resume the second. Null when the destination did not resume.
   */
  pause: { stopMs: number; resumeMs: number } | null;
  /** The relay's bytes towards the destination per interval, from `migrate` (with `throughputSampleMs`). */
  linkThroughput: ThroughputSample[] | null;
  info: MigrationInfo;
}

export async function migrate(options: MigrateOptions): Promise<MigrateReport> {
  const log = options.log ?? (() => undefined);
  const capabilities = options.capabilities ?? { "return-path": true };
  if (options.srcQmp === options.dstQmp)
    throw new Error(
      `--src-qmp and --dst-qmp are the same socket (${options.srcQmp}): give the destination's`,
    );
  const src = await QmpClient.connect(options.srcQmp);
  let sockets: string | undefined;
  let dst: QmpClient;
  try {
    dst = await QmpClient.connect(options.dstQmp);
  } catch (error) {
    src.close();
    throw error;
  }
  try {
    const dstStatus = (await dst.execute("query-status")).status;
    if (dstStatus !== "inmigrate")
      throw new Error(
        `the destination (${options.dstQmp}) is '${dstStatus}', not waiting for a migration: start it with -incoming defer`,
      );
    // Every hop stays on this host: unix sockets in a directory only this user reaches, which cost the kernel
    // less per byte than loopback TCP (no TCP stack on either side of each hop).
    sockets = await mkdtemp(join(tmpdir(), "vmprune-migrate-"));
    const destination = { path: join(sockets, "destination.sock") };
    await prepareIncoming(dst, { incomingUri: `unix:${destination.path}`, capabilities });
    // Cache pages need vmprune receive in front of the destination (here in this process, with a fresh key). Its
    // link is a unix socket in the private directory above between two parts of this process: no network, and
    // whoever could read it could read this process. TLS there would only cost CPU: on the loopback demo, 0.4 s of
    // free+cache's 1.4 s (1.03-1.04 s without it, 1.39-1.45 s with it, same host and hour).
    const plaintext: LinkSecurity = {
      mode: "plaintext",
      why: "a unix socket in a private directory within this process (vmprune migrate: one host)",
    };
    const linked = options.drop.includes("cache");
    if (linked && !options.disk) throw new Error("--drop cache needs the shared disk image (--disk IMAGE)");
    const psk = randomBytes(32);
    const disks = linked && options.disk ? await openReceiveDisks([options.disk], log) : undefined;
    const receive = disks
      ? await startReceive({
          listen: { path: join(sockets, "link.sock") },
          to: destination,
          psk,
          security: plaintext,
          disk: disks.reader,
          filesystems: disks.filesystems,
          log,
        })
      : undefined;
    const send = await startSend({
      listen: { path: join(sockets, "source.sock") },
      to: receive ? receive.endpoint : destination,
      drop: options.drop,
      guest: {
        qmp: { client: src, path: options.srcQmp, ...(options.srcPid ? { pid: options.srcPid } : {}) },
      },
      ...(receive && options.disk ? { link: { psk, security: plaintext }, disk: options.disk } : {}),
      ...(options.refsWhen ? { refsWhen: options.refsWhen } : {}),
      log,
    });
    let info: MigrationInfo = {};
    let error: string | null = null;
    const sampler = options.throughputSampleMs
      ? new ThroughputSampler(() => send.relay.upstreamDrain().sentBytes, options.throughputSampleMs)
      : undefined;
    const startedWallMs = Date.now();
    const started = performance.now();
    sampler?.start();
    try {
      const result = await runMigration(src, `unix:${join(sockets, "source.sock")}`, {
        capabilities,
        ...(options.parameters ? { parameters: options.parameters } : {}),
        timeoutMs: options.timeoutMs ?? 600_000,
        onProgress: (i) => {
          const prune = send.pruneSoFar();
          options.onProgress?.({
            status: i.status ?? "?",
            elapsedMs: performance.now() - started,
            transferredBytes: i.ram?.transferred ?? 0,
            remainingBytes: i.ram?.remaining ?? 0,
            totalBytes: i.ram?.total ?? 0,
            mbps: i.ram?.mbps ?? 0,
            iteration: i.ram?.["dirty-sync-count"] ?? 0,
            pruned: (prune?.pages.pruned ?? 0) + (prune?.multifd?.pagesPruned ?? 0),
            byCategory: prune?.pages.byCategory ?? null,
          });
        },
      });
      info = result.info;
    } catch (e) {
      if (!(e instanceof MigrationFailed)) {
        sampler?.stop();
        send.relay.close();
        throw e;
      }
      info = e.info ?? {};
      error = e.message;
    }
    // The relay ends when QEMU closes its connections; a failed migration may leave one open.
    if (error) send.relay.close();
    if (error) receive?.relay.close();
    const sent = await send.done;
    const linkThroughput = sampler?.stop() ?? null;
    if (sampler?.failure) log(`link throughput: ${sampler.failure}`);
    const received = receive ? await receive.done : null;
    await disks?.close();
    const destinationStatus = error ? "not resumed" : await settledStatus(dst);
    const pause = destinationStatus === "running" ? await pauseOf(src, dst, startedWallMs, log) : null;
    return {
      mode: options.drop.length > 0 ? "pruned" : "baseline",
      status: info.status ?? "unknown",
      error: error ?? sent.relay.error ?? null,
      totalTimeMs: info["total-time"] ?? 0,
      downtimeMs: info.downtime ?? 0,
      sourceBytes: info.ram?.transferred ?? 0,
      wireBytes: sent.relay.channels.reduce((sum, c) => sum + c.bytesToDestination, 0),
      iterations: info.ram?.["dirty-sync-count"] ?? 0,
      records: sent.stream?.ram.records ?? null,
      prune: sent.prune,
      receive: received ? received.refs : null,
      destinationStatus,
      pause,
      linkThroughput,
      info,
    };
  } finally {
    src.close();
    dst.close();
    if (sockets) await rm(sockets, { recursive: true, force: true });
  }
}

/** When the guest stopped and resumed, in ms from `startedWallMs`; null (and a log line) if an event is missing. */
async function pauseOf(
  src: QmpClient,
  dst: QmpClient,
  startedWallMs: number,
  log: (line: string) => void,
): Promise<MigrateReport["pause"]> {
  try {
    const { stoppedAtMs, resumedAtMs } = await guestPause(src, dst, startedWallMs);
    return { stopMs: stoppedAtMs - startedWallMs, resumeMs: resumedAtMs - startedWallMs };
  } catch (error) {
    log(`guest pause not measured: ${error instanceof Error ? error.message : String(error)}`);
    return null;
  }
}

/** The destination's state once it has loaded everything (it is "inmigrate" until then). */
async function settledStatus(dst: QmpClient, timeoutMs = 60_000): Promise<string> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const status = (await dst.execute("query-status")).status;
    if (status !== "inmigrate" || Date.now() > deadline) return status;
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}
