/**
 * An emulated network link for migration benchmarks: two network namespaces (src/lab/netns.ts) joined by a veth
 * pair, each end shaped with `tc` to a rate (default 1 Gbit/s), with addresses from a private range on the two
 * veth ends only. Nothing is configured outside the two namespaces: the veth pair is created with its ends
 * directly in them, and deleting the namespaces removes the pair and its qdiscs.
 *
 * ```
 *   namespace vmprune-<pid>-src-xxxx                      namespace vmprune-<pid>-dst-xxxx
 *   source QEMU, vmprune send (the bench process)         destination QEMU (-incoming), later vmprune receive
 *   lo up (QEMU → relay on 127.0.0.1)                     lo up
 *   vmp-src 10.77.0.1/30  tbf 1gbit  ═══ veth ═══  tbf 1gbit  vmp-dst 10.77.0.2/30
 * ```
 * How migration traffic is made to cross it: the destination QEMU runs in the dst namespace (`LabPair` option
 * `netns.dst`, i.e. `ip netns exec`) and listens on 10.77.0.2; the source QEMU runs in the src namespace
 * (`netns.src`) and connects to that address, or to a relay on the src side's loopback that forwards there. QMP
 * and agent sockets are files, so the lab's control of both VMs works from any namespace. A relay written in
 * Node (vmprune send) must run in a process inside the src namespace: bench/link.ts re-runs itself there with
 * `runInNamespace`.
 *
 * Shaping: tbf on the egress of both veth ends (netem's rate is not available on every kernel; tbf is in the
 * base kernel). tbf counts whole frames, so a TCP stream's payload rate is ~95% of the shaped rate (1448 bytes
 * of payload per 1514-byte frame with timestamps). `measureRate()` checks the result with a bounded transfer.
 */
import { type ChildProcess, spawn } from "node:child_process";
import { trackProcess, untrackProcess } from "./cleanup.ts";
import { run } from "./exec.ts";
import { NetNamespace } from "./netns.ts";

export interface ShapedLinkOptions {
  /** Shaped rate in each direction, Mbit/s (10^6 bit/s). Default 1000. */
  rateMbit?: number;
  /** Addresses of the src and dst ends, with the prefix length (one /30 of a private range). */
  srcAddress?: string;
  dstAddress?: string;
}

/** 10.77.0.0/30: RFC 1918, and only ever configured inside the link's own two namespaces. */
export const DEFAULT_SRC_ADDRESS = "10.77.0.1/30";
export const DEFAULT_DST_ADDRESS = "10.77.0.2/30";
/** Interface names of the two ends (each in its own namespace, so they cannot collide with the host's). */
export const SRC_IFNAME = "vmp-src";
export const DST_IFNAME = "vmp-dst";

/**
 * tbf parameters: a burst of 256 KiB (a few 64 KiB GSO super-frames; at 1 Gbit/s about 2 ms worth, so the
 * shaping holds on any time scale a migration cares about) and at most 10 ms of queue.
 */
const TBF_BURST = "256kb";
const TBF_LATENCY = "10ms";

export interface RateMeasurement {
  bytes: number;
  /** From the receiver's first byte to its last. */
  ms: number;
  /** Payload (goodput) rate in Gbit/s. */
  gbitPerSecond: number;
}

/** The description a process re-run inside the src namespace gets (see bench/link.ts). */
export interface LinkDescription {
  srcNetns: string;
  dstNetns: string;
  srcIp: string;
  dstIp: string;
  rateMbit: number;
}

function ipOf(cidr: string): string {
  return cidr.split("/")[0] ?? cidr;
}

export class ShapedLink {
  private destroyed = false;

  private constructor(
    readonly src: NetNamespace,
    readonly dst: NetNamespace,
    readonly srcAddress: string,
    readonly dstAddress: string,
    readonly rateMbit: number,
  ) {}

  get srcIp(): string {
    return ipOf(this.srcAddress);
  }
  get dstIp(): string {
    return ipOf(this.dstAddress);
  }

  describe(): LinkDescription {
    return {
      srcNetns: this.src.name,
      dstNetns: this.dst.name,
      srcIp: this.srcIp,
      dstIp: this.dstIp,
      rateMbit: this.rateMbit,
    };
  }

  /** Creates both namespaces, the veth pair between them, addresses and tbf on both ends. */
  static async create(options: ShapedLinkOptions = {}): Promise<ShapedLink> {
    const rateMbit = options.rateMbit ?? 1000;
    if (!(rateMbit > 0)) throw new Error(`link rate must be positive, not ${rateMbit} Mbit/s`);
    const srcAddress = options.srcAddress ?? DEFAULT_SRC_ADDRESS;
    const dstAddress = options.dstAddress ?? DEFAULT_DST_ADDRESS;
    const src = await NetNamespace.create("src");
    let dst: NetNamespace | undefined;
    try {
      dst = await NetNamespace.create("dst");
      const link = new ShapedLink(src, dst, srcAddress, dstAddress, rateMbit);
      await link.setUp();
      return link;
    } catch (error) {
      await Promise.allSettled([dst?.delete(), src.delete()]);
      throw error;
    }
  }

  private async setUp(): Promise<void> {
    // Both ends are created directly in their namespaces: no interface ever appears in the caller's namespace.
    await run("ip", [
      "link",
      "add",
      SRC_IFNAME,
      "netns",
      this.src.name,
      "type",
      "veth",
      "peer",
      "name",
      DST_IFNAME,
      "netns",
      this.dst.name,
    ]);
    for (const [ns, ifname, address] of [
      [this.src, SRC_IFNAME, this.srcAddress],
      [this.dst, DST_IFNAME, this.dstAddress],
    ] as const) {
      await ns.ip(["addr", "add", address, "dev", ifname]);
      await ns.tc([
        "qdisc",
        "replace",
        "dev",
        ifname,
        "root",
        "tbf",
        "rate",
        `${this.rateMbit}mbit`,
        "burst",
        TBF_BURST,
        "latency",
        TBF_LATENCY,
      ]);
      await ns.ip(["link", "set", ifname, "up"]);
    }
  }

  /** The qdiscs on both ends, as `tc qdisc show` prints them (for logs). */
  async qdiscs(): Promise<string> {
    const [a, b] = await Promise.all([
      this.src.tc(["qdisc", "show", "dev", SRC_IFNAME]),
      this.dst.tc(["qdisc", "show", "dev", DST_IFNAME]),
    ]);
    return `${SRC_IFNAME}: ${a.trim()}; ${DST_IFNAME}: ${b.trim()}`;
  }

  /** Bytes (whole frames) each end has sent so far: `toDst` is the src end's tx, `toSrc` the dst end's. */
  async txBytes(): Promise<{ toDst: number; toSrc: number }> {
    return txBytesOf(this.describe());
  }

  /**
   * Moves `bytes` from a TCP sender in the src namespace to a receiver in the dst namespace (two Node processes)
   * and returns the receiver's payload rate. Bounded: exactly `bytes` are sent, and both processes are stopped
   * by PID after `timeoutMs` at the latest.
   */
  measureRate(bytes = 100_000_000, timeoutMs = 60_000): Promise<RateMeasurement> {
    return measureRateOf(this.describe(), bytes, timeoutMs);
  }

  /** Deletes both namespaces (veth pair and qdiscs with them). Safe to call twice. */
  async destroy(): Promise<void> {
    if (this.destroyed) return;
    this.destroyed = true;
    const results = await Promise.allSettled([this.src.delete(), this.dst.delete()]);
    const failed = results.find((r): r is PromiseRejectedResult => r.status === "rejected");
    if (failed) throw failed.reason;
  }
}

/** See ShapedLink.txBytes; usable from a process that only has the description. */
export async function txBytesOf(link: LinkDescription): Promise<{ toDst: number; toSrc: number }> {
  const read = async (netns: string, ifname: string) => {
    const out = await run("ip", ["-n", netns, "-j", "-s", "link", "show", "dev", ifname]);
    const parsed = JSON.parse(out) as { stats64?: { tx?: { bytes?: number } } }[];
    const bytes = parsed[0]?.stats64?.tx?.bytes;
    if (typeof bytes !== "number") throw new Error(`no tx byte counter for ${ifname} in ${netns}: ${out}`);
    return bytes;
  };
  const [toDst, toSrc] = await Promise.all([
    read(link.srcNetns, SRC_IFNAME),
    read(link.dstNetns, DST_IFNAME),
  ]);
  return { toDst, toSrc };
}

/** The receiver: prints `{"port":N}` once listening, then `{"bytes":B,"ms":T}` when the sender has finished. */
const RECEIVER_JS = `
const net = require("node:net");
const [host, timeoutMs] = [process.argv[1], Number(process.argv[2])];
setTimeout(() => { console.error("receiver: timed out"); process.exit(2); }, timeoutMs).unref();
let bytes = 0, first = 0;
const server = net.createServer((socket) => {
  socket.on("data", (chunk) => { if (bytes === 0) first = performance.now(); bytes += chunk.length; });
  socket.on("end", () => {
    console.log(JSON.stringify({ bytes, ms: performance.now() - first }));
    server.close();
    socket.end();
  });
});
server.listen(0, host, () => console.log(JSON.stringify({ port: server.address().port })));
`;

/** The sender: writes exactly `total` bytes (1 MiB writes, honouring backpressure), then ends the connection. */
const SENDER_JS = `
const net = require("node:net");
const [host, port, total, timeoutMs] = [process.argv[1], Number(process.argv[2]), Number(process.argv[3]), Number(process.argv[4])];
setTimeout(() => { console.error("sender: timed out"); process.exit(2); }, timeoutMs).unref();
const chunk = Buffer.alloc(1 << 20, 0xa5);
const socket = net.connect(port, host, () => {
  let sent = 0;
  const pump = () => {
    while (sent < total) {
      const n = Math.min(chunk.length, total - sent);
      sent += n;
      if (!socket.write(n === chunk.length ? chunk : chunk.subarray(0, n))) return socket.once("drain", pump);
    }
    socket.end();
  };
  pump();
});
socket.on("data", () => {});
socket.on("error", (e) => { console.error("sender: " + e.message); process.exit(1); });
`;

interface Helper {
  child: ChildProcess;
  lines: AsyncIterator<string>;
  exited: Promise<number | null>;
}

/** Runs a small Node program inside a namespace, tracked by PID until it exits. */
function startHelper(netns: string, code: string, args: readonly string[]): Helper {
  const child = spawn(
    "setpriv",
    ["--pdeathsig", "KILL", "--", "ip", "netns", "exec", netns, process.execPath, "-e", code, ...args],
    { stdio: ["ignore", "pipe", "pipe"] },
  );
  const pid = child.pid;
  if (pid === undefined) throw new Error("cannot start a link probe process");
  trackProcess(pid);
  let stderr = "";
  child.stderr?.on("data", (d: Buffer) => {
    stderr += d.toString("utf8");
  });
  const exited = new Promise<number | null>((resolve) =>
    child.once("exit", (code) => {
      untrackProcess(pid);
      if (code !== 0 && stderr) process.stderr.write(`link probe in ${netns}: ${stderr}`);
      resolve(code);
    }),
  );
  const lines = readLines(child);
  return { child, lines, exited };
}

async function* linesOf(child: ChildProcess): AsyncGenerator<string> {
  let buffered = "";
  if (!child.stdout) return;
  for await (const chunk of child.stdout) {
    buffered += String(chunk);
    let nl = buffered.indexOf("\n");
    while (nl >= 0) {
      yield buffered.slice(0, nl);
      buffered = buffered.slice(nl + 1);
      nl = buffered.indexOf("\n");
    }
  }
}

function readLines(child: ChildProcess): AsyncIterator<string> {
  return linesOf(child)[Symbol.asyncIterator]();
}

async function nextJson<T>(helper: Helper, what: string): Promise<T> {
  const next = await helper.lines.next();
  if (next.done) throw new Error(`link probe: no ${what} (exit ${await helper.exited})`);
  return JSON.parse(next.value) as T;
}

function stop(helper: Helper): Promise<number | null> {
  if (helper.child.exitCode === null && helper.child.signalCode === null && helper.child.pid !== undefined) {
    try {
      process.kill(helper.child.pid, "SIGKILL");
    } catch {
      // exited meanwhile
    }
  }
  return helper.exited;
}

/** See ShapedLink.measureRate. */
export async function measureRateOf(
  link: LinkDescription,
  bytes = 100_000_000,
  timeoutMs = 60_000,
): Promise<RateMeasurement> {
  const receiver = startHelper(link.dstNetns, RECEIVER_JS, [link.dstIp, String(timeoutMs)]);
  let sender: Helper | undefined;
  try {
    const { port } = await nextJson<{ port: number }>(receiver, "listening port");
    sender = startHelper(link.srcNetns, SENDER_JS, [
      link.dstIp,
      String(port),
      String(bytes),
      String(timeoutMs),
    ]);
    const result = await nextJson<{ bytes: number; ms: number }>(receiver, "result");
    if (result.bytes !== bytes) throw new Error(`link probe: received ${result.bytes} of ${bytes} bytes`);
    return { ...result, gbitPerSecond: (result.bytes * 8) / (result.ms / 1000) / 1e9 };
  } finally {
    await Promise.all([stop(receiver), sender ? stop(sender) : undefined]);
  }
}

/**
 * Runs a command inside a namespace as a child of this process (stdio inherited) and resolves with its exit
 * status: how bench/link.ts re-runs itself inside the src namespace. While it runs, SIGINT, SIGTERM and SIGHUP
 * sent to this process are passed on to the child by PID instead of ending this process, so the child runs its
 * own cleanup (its VMs, their files) and this process then deletes the namespaces after it. If this process is
 * SIGKILLed, pdeathsig takes the child with it.
 */
export function runInNamespace(
  netns: string,
  command: string,
  args: readonly string[],
  env: NodeJS.ProcessEnv = process.env,
): Promise<{ code: number | null; signal: string | null }> {
  const child = spawn(
    "setpriv",
    ["--pdeathsig", "KILL", "--", "ip", "netns", "exec", netns, command, ...args],
    {
      stdio: "inherit",
      env,
    },
  );
  const pid = child.pid;
  if (pid === undefined) return Promise.reject(new Error(`cannot start ${command} in ${netns}`));
  const signals = ["SIGINT", "SIGTERM", "SIGHUP"] as const;
  const forward = (signal: NodeJS.Signals) => {
    try {
      process.kill(pid, signal);
    } catch {
      // exited meanwhile
    }
  };
  for (const signal of signals) process.on(signal, forward);
  return new Promise((resolve) =>
    child.once("exit", (code, signal) => {
      for (const s of signals) process.off(s, forward);
      resolve({ code, signal });
    }),
  );
}
