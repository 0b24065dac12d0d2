/**
 * The benchmarks' vmprune row: the lab pair's source migrates through `startSend` in this process (judging pages
 * through the source's second QMP socket) to an address on the destination side, and must prune; the figures are
 * what the relay wrote to the destination. Shared by bench/prune.ts and bench/link.ts.
 */
import { randomBytes } from "node:crypto";
import { writeFile } from "node:fs/promises";
import { join } from "node:path";
import type { Category } from "../src/introspect/classifier.ts";
import type { LabPair } from "../src/lab/lab-vm.ts";
import { SendProcess } from "../src/lab/send-process.ts";
import type { Vm } from "../src/lab/vm.ts";
import type { RefsWhen } from "../src/migrate/link-send.ts";
import { startSend } from "../src/migrate/send.ts";
import type { PruneReport } from "../src/prune/pruning-processor.ts";
import { type MigrationResult, runMigration, waitDestinationState } from "../src/qemu/migration.ts";
import { QmpClient } from "../src/qemu/qmp.ts";

export interface SendRun {
  result: MigrationResult;
  /** Bytes the relay wrote towards the destination, all connections. */
  wireBytes: number;
  prunedPages: number;
  /** startSend: the disk index and the guest's introspection, before the source's `migrate`. */
  prepMs: number;
  /** send's pruning report (what it did to which pages). */
  prune: PruneReport;
  /** How long send left the source QEMU's main channel unread because the link (or receive) held its bound. */
  sourceHeldMs: number;
  /** With receive: how long it left the link unread because the destination QEMU held its bound. */
  receiveHeldMs?: number;
}

export async function migrateThroughInProcessSend(
  pair: LabPair,
  dst: Vm,
  options: {
    /** Where send listens for the source QEMU: a loopback TCP host, or a unix socket path (`{ path }`). */
    listen: { host: string } | { path: string };
    to: { host: string; port: number };
    drop: readonly Category[];
    parameters?: Record<string, unknown>;
    /** Migration capabilities on the source (the destination's are the caller's to set), e.g. multifd. */
    capabilities?: Record<string, boolean>;
    link?: { psk: Buffer };
    disk?: string;
    /** When cache pages go as references (send's default: "link-busy"). */
    refsWhen?: RefsWhen;
  },
): Promise<SendRun> {
  const toolQmp = await QmpClient.connect(pair.src.toolQmpPath);
  try {
    const prepStarted = performance.now();
    const send = await startSend({
      listen: "path" in options.listen ? options.listen : { host: options.listen.host, port: 0 },
      to: options.to,
      drop: options.drop,
      guest: { qmp: { client: toolQmp, path: pair.src.toolQmpPath } },
      ...(options.link ? { link: options.link } : {}),
      ...(options.disk ? { disk: options.disk } : {}),
      ...(options.refsWhen ? { refsWhen: options.refsWhen } : {}),
      ...(process.env.VMPRUNE_BENCH_TRACE
        ? { log: (line: string) => process.stderr.write(`  send @${Date.now()}: ${line}\n`) }
        : {}),
    });
    const prepMs = performance.now() - prepStarted;
    try {
      const uri =
        "path" in options.listen
          ? `unix:${options.listen.path}`
          : `tcp:${options.listen.host}:${send.address.port}`;
      const result = await runMigration(pair.src.monitor, uri, {
        ...(options.parameters ? { parameters: options.parameters } : {}),
        ...(options.capabilities ? { capabilities: options.capabilities } : {}),
      });
      await waitDestinationState(dst.monitor, "running");
      const report = await send.done;
      if (report.relay.error) throw new Error(`vmprune send: ${report.relay.error}`);
      const prune = report.prune;
      if (prune?.mode !== "prune")
        throw new Error(`vmprune send did not prune: ${prune?.degraded ?? "no pruning report"}`);
      const wireBytes = report.relay.channels.reduce((sum, c) => sum + c.bytesToDestination, 0);
      // Pages pruned on the main channel and, with multifd, on the multifd channels.
      const prunedPages = prune.pages.pruned + (prune.multifd?.pagesPruned ?? 0);
      const sourceHeldMs = report.relay.channels.find((c) => c.index === 0)?.sourceHeldMs ?? 0;
      return { result, wireBytes, prunedPages, prepMs, prune, sourceHeldMs };
    } finally {
      await send.relay.close();
    }
  } finally {
    toolQmp.close();
  }
}

/**
 * The benchmarks' free+cache row: `vmprune receive` as a process (in `netns`, the destination's side of the
 * link, when given) in front of the destination QEMU at `destination` (127.0.0.1:PORT or unix:PATH), reading
 * `receiveDisk`, with a fresh key in the pair's folder; the source migrates through the in-process send (`send`'s
 * options less the link), and receive's references are read from its report when it exits. receive is stopped by
 * PID however it ends.
 */
export async function migrateThroughSendAndReceive(
  pair: LabPair,
  dst: Vm,
  options: {
    netns?: string;
    listenHost: string;
    /** The destination QEMU's incoming address, as receive's `--to` takes it. */
    destination: string;
    receiveDisk: string;
    send: Omit<Parameters<typeof migrateThroughInProcessSend>[2], "to" | "link">;
    log: (line: string) => void;
    /** receive's PID once it runs (e.g. for a CPU trace). */
    onReceiveStarted?: (pid: number) => void;
  },
): Promise<SendRun & { refsResolved: number }> {
  const keyPath = join(pair.diskDir, "link.key");
  const psk = randomBytes(32);
  await writeFile(keyPath, psk, { mode: 0o600 });
  const receive = await SendProcess.start({
    command: "receive",
    ...(options.netns ? { netns: options.netns } : {}),
    listen: `${options.listenHost}:0`,
    to: options.destination,
    extraArgs: ["--link-key", keyPath, "--disk", options.receiveDisk],
  });
  options.onReceiveStarted?.(receive.pid);
  try {
    const run = await migrateThroughInProcessSend(pair, dst, {
      ...options.send,
      to: { host: options.listenHost, port: receive.listen.port },
      link: { psk },
    }).catch((error: unknown) => {
      // What receive said is half of why a linked migration failed (VMPRUNE_CHILD_LOGS=1 shows it as it comes).
      options.log(`  receive's log up to the failure:\n${receive.stderr.slice(-4000)}`);
      throw error;
    });
    const received = await receive.wait(120_000);
    const report = JSON.parse(received.stdout || "{}") as {
      refs?: { refsResolved?: number };
      relay?: { channels?: { index: number; sourceHeldMs?: number }[] };
    };
    const refs = report.refs;
    // The link unread because the destination QEMU held receive's bound: how long the destination set the pace.
    const heldMs = report.relay?.channels?.find((c) => c.index === 0)?.sourceHeldMs;
    options.log(
      `  receive: ${refs ? JSON.stringify(refs) : received.stderr.slice(-300)}` +
        (heldMs === undefined ? "" : `; the link waited ${heldMs} ms for the destination QEMU`),
    );
    return {
      ...run,
      refsResolved: refs?.refsResolved ?? 0,
      ...(heldMs === undefined ? {} : { receiveHeldMs: heldMs }),
    };
  } finally {
    await receive.stop();
  }
}
