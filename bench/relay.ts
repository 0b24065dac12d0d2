/**
 * Throughput of the migration relay (src/stream/relay.ts) on loopback, compared with a direct connection and
 * with socat. Not a test.
 *
 *   node --import tsx bench/relay.ts [--stream FILE | --constant [--bytes 2G]] [--runs 3] [--json]
 *
 * By default it first captures the migration stream of a 512 MiB lab guest with the mixed workload and sends
 * that, so the relay also runs with its parser ("relay (parsing)", the `vmprune send` passthrough mode) and the
 * parser's own speed is measured in memory ("parse only"). `--constant` sends a constant block instead.
 *
 * A client pushes N bytes (default 2 GiB, one preallocated 4 MiB buffer written repeatedly, with backpressure) to
 * a sink server that discards them: (a) directly, (b) through `Relay` with the identity processor, (c) through
 * `socat TCP-LISTEN:port,reuseaddr TCP:127.0.0.1:sinkport`, (d) through `vmprune send` → `vmprune receive`'s
 * link without pruning (both in this process, so they share its event loop): plaintext, and TLS-PSK, the
 * default, whose ratio is what encryption costs. The client and the sink run in worker threads, so
 * the relay has the main thread's event loop to itself. A run is timed from telling the client to start until
 * the sink has seen the EOF; each figure is the best of `--runs`. GB/s are 10^9 bytes per second.
 *
 * Logs go to stderr; stdout gets the table, or with --json the figures.
 *
 * Hook: `benchRelay(createProcessor)` runs the same comparison with another main-channel processor plugged into
 * the relay (for example a parsing/rewriting one; the client's bytes would then have to be a migration stream).
 */
import { type ChildProcess, spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import { mkdirSync, readFileSync, rmSync, statSync } from "node:fs";
import { createServer } from "node:net";
import { join } from "node:path";
import { pathToFileURL } from "node:url";
import { Worker } from "node:worker_threads";
import { LabPair } from "../src/lab/lab-vm.ts";
import { captureStream } from "../src/lab/stream-capture.ts";
import { RUN_ROOT } from "../src/lab/vm.ts";
import { runMixedWorkload } from "../src/lab/workloads.ts";
import { startReceive } from "../src/migrate/link-receive.ts";
import { startSend } from "../src/migrate/send.ts";
import { table } from "../src/report/table.ts";
import { reportJson } from "../src/report/version.ts";
import { CountingProcessor } from "../src/stream/counting-processor.ts";
import { type MainChannelProcessor, Relay } from "../src/stream/relay.ts";
import type { LinkSecurity } from "../src/transport/tls.ts";
import { requireSetup } from "./common.ts";

const HOST = "127.0.0.1";
const SOCAT = "/usr/bin/socat";
const BLOCK = 4 * 1024 * 1024;

/** Sink worker: listens, discards, and reports each connection's byte count at its EOF. */
const SINK = `
const { parentPort } = require("node:worker_threads");
const net = require("node:net");
const server = net.createServer((socket) => {
  let bytes = 0;
  socket.on("data", (chunk) => { bytes += chunk.length; });
  socket.on("end", () => { parentPort.postMessage({ type: "done", bytes }); socket.end(); });
  socket.on("error", (error) => parentPort.postMessage({ type: "error", message: error.message }));
});
server.listen(0, "${HOST}", () => parentPort.postMessage({ type: "listening", port: server.address().port }));
`;

/** Client worker: for each {port, bytes} message, connects and pushes the bytes from one 4 MiB buffer. */
const CLIENT = `
const { parentPort, workerData } = require("node:worker_threads");
const net = require("node:net");
const { once } = require("node:events");
const block = Buffer.alloc(${BLOCK}, 0xa5);
// With a captured migration stream, every run sends that stream (once) instead of the constant block.
const stream = workerData && workerData.streamPath ? require("node:fs").readFileSync(workerData.streamPath) : null;
parentPort.on("message", async ({ port, bytes }) => {
  try {
    const socket = net.connect({ host: "${HOST}", port, noDelay: true });
    await once(socket, "connect");
    for (let sent = 0; sent < bytes; sent += block.length) {
      const piece = stream
        ? stream.subarray(sent, Math.min(bytes, sent + block.length))
        : bytes - sent < block.length ? block.subarray(0, bytes - sent) : block;
      if (!socket.write(piece)) await once(socket, "drain");
    }
    socket.end();
    socket.resume();
    await once(socket, "close");
    parentPort.postMessage({ type: "sent" });
  } catch (error) {
    parentPort.postMessage({ type: "error", message: error.message });
  }
});
`;

type WorkerMessage =
  | { type: "listening"; port: number }
  | { type: "done"; bytes: number }
  | { type: "sent" }
  | { type: "error"; message: string };

export interface BenchOptions {
  /** Bytes per run (default 2 GiB). */
  bytes?: number;
  /** Runs per path; the best counts (default 3). */
  runs?: number;
  /** A captured migration stream to send (once per run) instead of constant bytes; `bytes` is then its size. */
  streamPath?: string;
  log?: (line: string) => void;
}

export interface BenchResult {
  bytes: number;
  runs: number;
  /** Best throughput of each path, GB/s (10^9 bytes/s). */
  gbps: {
    direct: number;
    relay: number;
    socat: number;
    relayParsing?: number;
    parseOnly?: number;
    /** send → receive (passthrough, no pruning), both in this process: the link as plaintext, and as TLS-PSK. */
    linkPlaintext?: number;
    linkTls?: number;
  };
  ratios: {
    relayToDirect: number;
    relayToSocat: number;
    relayParsingToSocat?: number;
    /** What TLS 1.3 (TLS-PSK, AES-128-GCM) costs the link: its throughput over the plaintext link's. */
    linkTlsToPlaintext?: number;
  };
}

function nextMessage(worker: Worker, type: WorkerMessage["type"]): Promise<WorkerMessage> {
  return new Promise((resolve, reject) => {
    const onMessage = (message: WorkerMessage) => {
      if (message.type !== type && message.type !== "error") return;
      worker.off("message", onMessage);
      if (message.type === "error") reject(new Error(message.message));
      else resolve(message);
    };
    worker.on("message", onMessage);
  });
}

async function freePort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, HOST, resolve));
  const address = server.address();
  await new Promise<void>((resolve) => server.close(() => resolve()));
  if (!address || typeof address !== "object") throw new Error("no port");
  return address.port;
}

/** Starts socat forwarding `port` to `sinkPort`; resolves once it listens (read from its -d -d log, no probe). */
async function startSocat(port: number, sinkPort: number): Promise<ChildProcess> {
  const child = spawn(
    SOCAT,
    ["-d", "-d", `TCP-LISTEN:${port},reuseaddr,bind=${HOST}`, `TCP:${HOST}:${sinkPort}`],
    { stdio: ["ignore", "ignore", "pipe"] },
  );
  await new Promise<void>((resolve, reject) => {
    let log = "";
    child.once("error", reject);
    child.once("exit", (code) => reject(new Error(`socat exited (${code}) before listening: ${log}`)));
    child.stderr?.on("data", (chunk: Buffer) => {
      log += chunk.toString();
      if (log.includes("listening on")) resolve();
    });
  });
  child.removeAllListeners("exit");
  return child;
}

function stopProcess(child: ChildProcess): void {
  if (child.pid !== undefined && child.exitCode === null && child.signalCode === null)
    process.kill(child.pid);
}

/** Runs the direct / relay / socat comparison; the relay's main channel uses `createProcessor` (default identity). */
export async function benchRelay(
  createProcessor?: () => MainChannelProcessor,
  options: BenchOptions = {},
): Promise<BenchResult> {
  const bytes = options.streamPath ? statSync(options.streamPath).size : (options.bytes ?? 2 * 1024 ** 3);
  const runs = options.runs ?? 3;
  const log = options.log ?? ((line: string) => process.stderr.write(`${line}\n`));
  const sink = new Worker(SINK, { eval: true, execArgv: [] });
  const client = new Worker(CLIENT, {
    eval: true,
    execArgv: [],
    workerData: { streamPath: options.streamPath ?? null },
  });
  const children = new Set<ChildProcess>();
  const killChildren = () => {
    for (const child of children) stopProcess(child);
  };
  process.once("exit", killChildren);
  try {
    const listening = await nextMessage(sink, "listening");
    const sinkPort = listening.type === "listening" ? listening.port : 0;

    /** One timed push to `port`; seconds. */
    const push = async (port: number): Promise<number> => {
      const done = nextMessage(sink, "done");
      const sent = nextMessage(client, "sent");
      const start = performance.now();
      client.postMessage({ port, bytes });
      const result = await done;
      const seconds = (performance.now() - start) / 1000;
      await sent;
      if (result.type !== "done" || result.bytes !== bytes)
        throw new Error(`sink got ${result.type === "done" ? result.bytes : "?"} bytes, expected ${bytes}`);
      return seconds;
    };

    const best = async (name: string, once: () => Promise<number>): Promise<number> => {
      let top = 0;
      for (let run = 1; run <= runs; run++) {
        const seconds = await once();
        const gbps = bytes / seconds / 1e9;
        log(`${name} run ${run}/${runs}: ${seconds.toFixed(3)} s, ${gbps.toFixed(2)} GB/s`);
        top = Math.max(top, gbps);
      }
      return top;
    };

    const direct = await best("direct", () => push(sinkPort));
    const throughRelay = async (processor?: () => MainChannelProcessor) => {
      const relay = await Relay.start({
        listen: { host: HOST, port: 0 },
        to: { host: HOST, port: sinkPort },
        ...(processor ? { createMainProcessor: processor } : {}),
      });
      try {
        const seconds = await push(relay.address.port);
        const report = await relay.done;
        if (report.error) throw new Error(`relay: ${report.error}`);
        return seconds;
      } finally {
        await relay.close();
      }
    };
    const relay = await best("relay", () => throughRelay(createProcessor));
    let relayParsing: number | undefined;
    let parseOnly: number | undefined;
    if (options.streamPath) {
      const path = options.streamPath;
      relayParsing = await best("relay (parsing)", () => throughRelay(() => new CountingProcessor()));
      // The parser alone, in memory, in 1 MiB chunks: what it costs without the sockets.
      const stream = readFileSync(path);
      parseOnly = await best("parse only", async () => {
        const processor = new CountingProcessor();
        const start = performance.now();
        for (let at = 0; at < stream.length; at += 1 << 20)
          processor.push(stream.subarray(at, at + (1 << 20)));
        processor.end();
        const seconds = (performance.now() - start) / 1000;
        const report = processor.report();
        if (report.error) throw new Error(`the captured stream does not parse: ${report.error.message}`);
        return seconds;
      });
    }
    // The link (send → receive), as `vmprune send --link-key` and `vmprune receive` run it, without pruning.
    const throughLink = async (security: LinkSecurity) => {
      const psk = randomBytes(32);
      const receive = await startReceive({
        listen: { host: HOST, port: 0 },
        to: { host: HOST, port: sinkPort },
        psk,
        security,
      });
      const send = await startSend({
        listen: { host: HOST, port: 0 },
        to: receive.address,
        link: { psk, security },
      });
      try {
        const seconds = await push(send.address.port);
        const [sent, received] = await Promise.all([send.done, receive.done]);
        const error = sent.relay.error ?? received.relay.error;
        if (error) throw new Error(`link: ${error}`);
        return seconds;
      } finally {
        await Promise.all([send.relay.close(), receive.relay.close()]);
      }
    };
    const linkPlaintext = await best("link, plaintext", () => throughLink({ mode: "plaintext" }));
    const linkTls = await best("link, TLS-PSK", () => throughLink({ mode: "psk", key: randomBytes(32) }));
    const socat = await best("socat", async () => {
      const port = await freePort();
      const child = await startSocat(port, sinkPort);
      children.add(child);
      try {
        return await push(port);
      } finally {
        stopProcess(child);
        children.delete(child);
      }
    });
    return {
      bytes,
      runs,
      gbps: {
        direct,
        relay,
        socat,
        ...(relayParsing ? { relayParsing } : {}),
        ...(parseOnly ? { parseOnly } : {}),
        linkPlaintext,
        linkTls,
      },
      ratios: {
        relayToDirect: relay / direct,
        relayToSocat: relay / socat,
        ...(relayParsing ? { relayParsingToSocat: relayParsing / socat } : {}),
        linkTlsToPlaintext: linkTls / linkPlaintext,
      },
    };
  } finally {
    killChildren();
    process.off("exit", killChildren);
    await Promise.all([sink.terminate(), client.terminate()]);
  }
}

/** "2G", "512M", "1.5GiB", "1000000" → bytes (K/M/G are powers of 1024). */
export function parseSize(text: string): number {
  const match = /^(\d+(?:\.\d+)?)\s*([kmg]?)(?:i?b)?$/i.exec(text.trim());
  if (!match?.[1]) throw new Error(`bad size: ${text}`);
  const power = ["", "k", "m", "g"].indexOf((match[2] ?? "").toLowerCase());
  return Math.round(Number(match[1]) * 1024 ** power);
}

function formatTable(result: BenchResult): string {
  const rows: [string, string][] = [
    ["direct", `${result.gbps.direct.toFixed(2)} GB/s`],
    ["relay (identity)", `${result.gbps.relay.toFixed(2)} GB/s`],
    ["socat", `${result.gbps.socat.toFixed(2)} GB/s`],
    ...(result.gbps.relayParsing
      ? ([
          ["relay (parsing)", `${result.gbps.relayParsing.toFixed(2)} GB/s`],
          ["parse only", `${(result.gbps.parseOnly ?? 0).toFixed(2)} GB/s`],
        ] as [string, string][])
      : []),
    ...(result.gbps.linkPlaintext && result.gbps.linkTls
      ? ([
          ["link send→receive, plaintext", `${result.gbps.linkPlaintext.toFixed(2)} GB/s`],
          ["link send→receive, TLS-PSK", `${result.gbps.linkTls.toFixed(2)} GB/s`],
          ["link TLS / plaintext", (result.ratios.linkTlsToPlaintext ?? 0).toFixed(2)],
        ] as [string, string][])
      : []),
    ["relay / direct", result.ratios.relayToDirect.toFixed(2)],
    ["relay / socat", result.ratios.relayToSocat.toFixed(2)],
    ...(result.ratios.relayParsingToSocat
      ? ([["relay (parsing) / socat", result.ratios.relayParsingToSocat.toFixed(2)]] as [string, string][])
      : []),
  ];
  const header = `${(result.bytes / 1024 ** 3).toFixed(2)} GiB per run, best of ${result.runs}`;
  return [header, table(["", ""], rows)].join("\n");
}

async function main(argv: string[]): Promise<void> {
  let bytes: number | undefined;
  let runs: number | undefined;
  let json = false;
  let streamPath: string | undefined;
  let constant = false;
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === "--json") json = true;
    else if (arg === "--stream") streamPath = argv[++i];
    else if (arg === "--constant") constant = true;
    else if (arg === "--bytes") bytes = parseSize(argv[++i] ?? "");
    else if (arg === "--runs") runs = Number(argv[++i]);
    else
      throw new Error(
        `unknown argument: ${arg} (usage: bench/relay.ts [--stream FILE | --constant [--bytes 2G]] [--runs 3] [--json])`,
      );
  }
  // Without --stream or --constant it first captures a lab guest's stream (captureLabStream).
  const capture = !streamPath && !constant;
  requireSetup("bench:relay", {
    commands: ["socat"],
    ...(capture ? { guests: ["6.1"], qemu: ["7.2"] } : {}),
  });
  let captured: { dir: string } | undefined;
  if (capture) {
    captured = { dir: join(RUN_ROOT, `${process.pid}-bench-relay`) };
    streamPath = await captureLabStream(captured.dir);
  }
  try {
    const result = await benchRelay(undefined, {
      ...(bytes ? { bytes } : {}),
      ...(runs ? { runs } : {}),
      ...(streamPath ? { streamPath } : {}),
    });
    process.stdout.write(json ? reportJson(result) : `${formatTable(result)}\n`);
  } finally {
    if (captured) rmSync(captured.dir, { recursive: true, force: true });
  }
}

/** The stream of a 512 MiB lab guest with the mixed workload (QEMU 7.2, kernel 6.1), captured to a file. */
async function captureLabStream(dir: string): Promise<string> {
  mkdirSync(dir, { recursive: true });
  const log = (line: string) => process.stderr.write(`${line}\n`);
  log("capturing the migration stream of a 512 MiB lab guest with the mixed workload ...");
  const pair = await LabPair.boot({ kernel: "6.1", qemu: "7.2", memoryMiB: 512 });
  try {
    await runMixedWorkload(pair.src.agent);
    const capture = await captureStream(pair.src, join(dir, "stream.bin"), { resume: false });
    log(`captured ${capture.bytes} bytes`);
    return capture.path;
  } finally {
    await pair.stop();
  }
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  main(process.argv.slice(2)).catch((error: unknown) => {
    process.stderr.write(`${error instanceof Error ? error.message : String(error)}\n`);
    process.exitCode = 1;
  });
}
