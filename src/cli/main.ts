#!/usr/bin/env -S node --initial-old-space-size=128
import { createReadStream, createWriteStream } from "node:fs";
import { readFile, writeFile } from "node:fs/promises";
import { resolve } from "node:path";
/** `vmprune`: thin command-line layer over the library. Logs go to stderr, results to stdout. */
import { Command, InvalidArgumentError, Option } from "commander";
import { CATEGORY_NAMES, type Category } from "../introspect/classifier.ts";
import { openRawSnapshot } from "../introspect/guest-memory.ts";
import { classifyGuest } from "../introspect/inspect.ts";
import { describeSources, openLiveVmMemory } from "../introspect/live-vm.ts";
import { ensureDebianGuest } from "../lab/debian-guest.ts";
import { runDemo } from "../lab/demo.ts";
import { ensureGuestImage } from "../lab/guest-image.ts";
import { ALL_KERNEL_IDS, isKernelId, KERNEL_IDS, type KernelId } from "../lab/kernels.ts";
import { ensureQemu, isQemuVersion, QEMU_VERSIONS, type QemuVersion } from "../lab/qemu-binaries.ts";
import { sweepStaleRuns } from "../lab/vm.ts";
import { libvirtMigrate } from "../libvirt/migrate.ts";
import { MIN_PSK_BYTES } from "../link/handshake.ts";
import { startReceive } from "../migrate/link-receive.ts";
import { REFS_WHEN, type RefsWhen } from "../migrate/link-send.ts";
import { type MigrateReport, migrate } from "../migrate/migrate.ts";
import { openReceiveDisks } from "../migrate/receive-disks.ts";
import { DEFAULT_MAX_MIGRATIONS, ReceiveService } from "../migrate/receive-service.ts";
import { migrateReportModel, migrateRowName, parseMigrateReport } from "../migrate/report-row.ts";
import { CACHE_REF_SOURCES, type CacheRefSources, startSend } from "../migrate/send.ts";
import { QmpClient } from "../qemu/qmp.ts";
import type { MigrationReportModel } from "../report/report-model.ts";
import { DEFAULT_SAMPLE_INTERVAL_MS } from "../report/throughput-sampler.ts";
import { reportJson, vmpruneVersion, withOrigin } from "../report/version.ts";
import type { BlockReader } from "../storage/block-reader.ts";
import type { FilesystemDirectory } from "../storage/filesystem-directory.ts";
import { StreamError } from "../stream/errors.ts";
import { rewriteStream } from "../stream/rewrite.ts";
import { summarizeStream } from "../stream/summary.ts";
import {
  type Endpoint,
  EndpointError,
  formatEndpoint,
  isUnixEndpoint,
  parseEndpoint,
} from "../transport/endpoint.ts";
import { parseSocketMode, parseSocketOwner } from "../transport/owner.ts";
import type { UnixSocketOptions } from "../transport/socket.ts";
import type { LinkSecurity } from "../transport/tls.ts";
import { RELAYING_COMMANDS, relayFlagsNotice } from "./node-runtime.ts";
import {
  renderDemo,
  renderInspectReport,
  renderLibvirtMigrateReport,
  renderMigrateProgress,
  renderMigrateReport,
  renderReceiveReport,
  renderSendReport,
  renderStreamSummary,
} from "./render.ts";

const log = (line: string) => process.stderr.write(`${line}\n`);

function kernelOption(value: string): KernelId {
  if (!isKernelId(value)) throw new InvalidArgumentError(`one of ${ALL_KERNEL_IDS.join(", ")}`);
  return value;
}
function kernelListOption(value: string): KernelId[] {
  return value.split(",").map((id) => kernelOption(id.trim()));
}
function qemuOption(value: string): QemuVersion {
  if (!isQemuVersion(value)) throw new InvalidArgumentError(`one of ${QEMU_VERSIONS.join(", ")}`);
  return value;
}
function positiveInt(value: string): number {
  const n = Number(value);
  if (!Number.isInteger(n) || n <= 0) throw new InvalidArgumentError("a positive whole number");
  return n;
}

const program = new Command("vmprune")
  .description("Faster live migration of QEMU/KVM VMs by pruning dispensable guest memory")
  .version(vmpruneVersion(), "-V, --version", "print vmprune's version (package.json's)");

// The relaying commands say when Node lacks the flags they are meant to run with (node-runtime.ts).
program.hook("preAction", (_program, action) => {
  const parent = action.parent && action.parent !== program ? `${action.parent.name()} ` : "";
  if (!RELAYING_COMMANDS.has(`${parent}${action.name()}`)) return;
  const notice = relayFlagsNotice(process.execArgv);
  if (notice) process.stderr.write(`vmprune: ${notice}\n`);
});

const lab = program.command("lab").description("the test lab: guest images and QEMU builds");
lab
  .command("build")
  .description(
    "download and build the guest kernels, images and QEMU 10.0 (cached; rebuilt when inputs change)",
  )
  .addOption(
    new Option(
      "--kernel <ids>",
      `guest kernels to build, comma-separated (default ${KERNEL_IDS.join(",")}; others are built on first boot)`,
    ).argParser(kernelListOption),
  )
  .option("--all-kernels", `build every guest kernel: ${ALL_KERNEL_IDS.join(", ")}`)
  .option(
    "--debian-guest",
    "also build the Debian guest with PostgreSQL (mmdebstrap; about 2 minutes, 1.3 GiB)",
  )
  .action(async (opts: { kernel?: KernelId[]; allKernels?: boolean; debianGuest?: boolean }) => {
    const t0 = performance.now();
    for (const kernel of opts.allKernels ? ALL_KERNEL_IDS : (opts.kernel ?? KERNEL_IDS)) {
      const image = await ensureGuestImage(kernel);
      const replaced = image.kernel.replaces ? ` (${image.kernel.replaces} is gone from the archive)` : "";
      log(`kernel ${kernel}: ${image.kernel.packageName} ${image.kernel.packageVersion}${replaced}`);
    }
    for (const version of QEMU_VERSIONS) log(`QEMU ${version}: ${(await ensureQemu(version)).fullVersion}`);
    if (opts.debianGuest) {
      const { build, rootDisk } = await ensureDebianGuest();
      log(
        `Debian guest: ${rootDisk}, ${(build.allocatedBytes / 2 ** 30).toFixed(2)} GiB written of ` +
          `${(build.imageBytes / 2 ** 30).toFixed(0)} GiB, built in ${(build.buildMs / 1000).toFixed(0)} s`,
      );
    }
    log(`lab ready in ${((performance.now() - t0) / 1000).toFixed(1)} s`);
  });

program
  .command("demo")
  .description(
    "boot a guest, run a mixed workload, live-migrate it through vmprune without and with pruning (fresh destination each), verify the guest, print both side by side",
  )
  .addOption(new Option("--kernel <id>", "guest kernel").argParser(kernelOption).default("6.1"))
  .addOption(new Option("--qemu <version>", "QEMU version").argParser(qemuOption).default("7.2"))
  .addOption(new Option("--memory <MiB>", "guest RAM").argParser(positiveInt).default(512))
  .option("--json", "print the result as JSON")
  .option("--report <file.html>", "also write an HTML report with plots of the three migrations")
  .action(
    async (opts: {
      kernel: KernelId;
      qemu: QemuVersion;
      memory: number;
      json?: boolean;
      report?: string;
    }) => {
      sweepStaleRuns();
      const runs: { name: string; report: MigrateReport }[] = [];
      const result = await runDemo({
        kernel: opts.kernel,
        qemu: opts.qemu,
        memoryMiB: opts.memory,
        log,
        ...(opts.report
          ? {
              throughputSampleMs: DEFAULT_SAMPLE_INTERVAL_MS,
              onMigrated: (label: string, report: MigrateReport) => runs.push({ name: label, report }),
            }
          : {}),
      });
      process.stdout.write(opts.json ? reportJson(result) : renderDemo(result));
      if (opts.report) {
        const model = migrateReportModel(runs, [
          `${result.memoryMiB} MiB guest, mixed workload, kernel ${result.kernel}, QEMU ${result.qemu} ` +
            `(${result.accel}), migrated on loopback three times, each to a fresh destination.`,
        ]);
        await writeHtmlReport(opts.report, { ...model, title: "vmprune demo" });
      }
    },
  );

const stream = program.command("stream").description("QEMU migration streams: inspect and re-encode");

/** A file, or "-" for standard input, as a source of chunks. */
function input(path: string): AsyncIterable<Buffer> {
  return path === "-" ? process.stdin : createReadStream(path, { highWaterMark: 1024 * 1024 });
}

stream
  .command("inspect <file>")
  .description("summarise a migration stream (a file, or - for stdin): sections, RAM blocks, records by type")
  .option("--json", "print the summary as JSON")
  .action(async (file: string, opts: { json?: boolean }) => {
    const summary = await summarizeStream(input(file));
    process.stdout.write(opts.json ? reportJson(summary) : renderStreamSummary(summary));
    if (summary.error) process.exitCode = 2;
  });

stream
  .command("rewrite <in> <out>")
  .description(
    "parse a migration stream and write it back record by record (identity; for round-trip checks)",
  )
  .action(async (inFile: string, outFile: string) => {
    try {
      const bytes = await rewriteStream(
        input(inFile),
        outFile === "-" ? process.stdout : createWriteStream(outFile),
      );
      log(`rewrote ${bytes} bytes`);
    } catch (error) {
      if (error instanceof StreamError)
        throw new Error(`${error.message}: the input is not a stream vmprune can re-encode`);
      throw error;
    }
  });

program
  .command("inspect")
  .description(
    "classify every page of a Linux guest from outside: free, cache, inode, anonymous, shmem, kernel",
  )
  .option("--memory <file>", "a raw RAM snapshot (file offset = guest-physical address)")
  .option("--qmp <socket>", "a running QEMU's QMP socket (its RAM files, or the QEMU process's memory)")
  .option("--pid <pid>", "with --qmp: the QEMU process (default: the owner of the socket)", positiveInt)
  .option("--pause", "with --qmp: stop the guest while classifying, then let it run again")
  .option("--infer-pcp", "count unreferenced flagless pages (per-CPU free lists) as free")
  .option(
    "--pfn-map <file>",
    "write one byte per PFN: 0 none/unknown, 1 free, 2 cache, 3 inode, 4 anon, 5 shmem, 6 kernel",
  )
  .option("--json", "print the report as JSON")
  .action(
    async (opts: {
      memory?: string;
      qmp?: string;
      pid?: number;
      pause?: boolean;
      inferPcp?: boolean;
      pfnMap?: string;
      json?: boolean;
    }) => {
      if (Boolean(opts.memory) === Boolean(opts.qmp))
        throw new Error("give exactly one of --memory FILE or --qmp SOCKET");
      let qmp: QmpClient | undefined;
      let paused = false;
      try {
        let memory: ReturnType<typeof openRawSnapshot>;
        if (opts.memory) memory = openRawSnapshot(opts.memory);
        else {
          const socket = opts.qmp as string;
          qmp = await QmpClient.connect(socket);
          if (opts.pause && (await qmp.execute("query-status")).running) {
            await qmp.execute("stop");
            paused = true;
          }
          const live = await openLiveVmMemory(qmp, socket, opts.pid);
          log(`guest RAM: ${describeSources(live.sources)}`);
          memory = live.memory;
        }
        try {
          const result = classifyGuest(memory, { inferPcpFree: opts.inferPcp ?? false });
          if (opts.pfnMap) await writeFile(opts.pfnMap, result.categories);
          process.stdout.write(opts.json ? reportJson(result.report) : renderInspectReport(result.report));
        } finally {
          memory.close();
        }
      } finally {
        if (paused) await qmp?.execute("cont");
        qmp?.close();
      }
    },
  );

/** Turns a transport error into commander's, so that it is reported with the option it belongs to. */
function cliArgument<T>(parse: (value: string) => T): (value: string) => T {
  return (value) => {
    try {
      return parse(value);
    } catch (error) {
      if (error instanceof EndpointError) throw new InvalidArgumentError(error.message);
      throw error;
    }
  };
}

/** "HOST:PORT", "[V6]:PORT" or "unix:/PATH". */
const endpointArgument = cliArgument(parseEndpoint);

const TLS_CREDS_HELP = {
  send: "TLS 1.3 with mutual x509 certificates instead of TLS-PSK: a directory with ca-cert.pem, client-cert.pem and client-key.pem (QEMU's layout, e.g. /etc/pki/qemu); --link-key is then optional",
  receive:
    "TLS 1.3 with mutual x509 certificates instead of TLS-PSK: a directory with ca-cert.pem, server-cert.pem and server-key.pem (QEMU's layout, e.g. /etc/pki/qemu); --link-key is then optional",
};
const INSECURE_PLAINTEXT_HELP =
  "DANGER: no TLS; guest memory crosses the network readable by anyone on the path (the link stays authenticated with --link-key)";

/** send's and migrate's --refs-when (link-send.ts RefsWhen). */
const REFS_WHEN_OPTION = [
  "--refs-when <when>",
  "with --drop cache: when clean cache pages go as references: link-busy (default: only across a network that holds the migration back: never to a receive on this host, and once measured, while the link drains at 200 MB/s or less; else whole, which is faster there) or always (the fewest bytes on the link)",
  (value: string): RefsWhen => {
    if (!(REFS_WHEN as readonly string[]).includes(value))
      throw new InvalidArgumentError(`give one of ${REFS_WHEN.join(", ")}`);
    return value as RefsWhen;
  },
] as const;

const SOCKET_MODE_HELP = "with a unix-socket --listen: the socket file's mode, octal (e.g. 0660)";
const SOCKET_OWNER_HELP =
  "with a unix-socket --listen: the socket file's owner, USER[:GROUP] or :GROUP (names or ids; needs root to give away)";

/** --socket-mode/--socket-owner, checked against --listen: they mean something for a unix socket only. */
function unixSocketOptions(opts: {
  listen: Endpoint;
  socketMode?: number;
  socketOwner?: { uid?: number; gid?: number };
}): UnixSocketOptions | undefined {
  if (opts.socketMode === undefined && opts.socketOwner === undefined) return undefined;
  if (!isUnixEndpoint(opts.listen))
    throw new Error(
      `--socket-mode and --socket-owner apply to a unix-socket --listen (unix:/PATH), not to ${formatEndpoint(opts.listen)}`,
    );
  return {
    ...(opts.socketMode !== undefined ? { mode: opts.socketMode } : {}),
    ...(opts.socketOwner ? { owner: opts.socketOwner } : {}),
  };
}

program
  .command("send")
  .description(
    "relay one live migration: the source QEMU migrates to tcp:LISTEN (or unix:PATH), vmprune forwards it to the destination's -incoming address, dropping what --drop names",
  )
  .requiredOption(
    "--listen <address>",
    "where the source QEMU connects: HOST:PORT (port 0: any free port), [IPV6]:PORT or unix:/PATH",
    endpointArgument,
  )
  .requiredOption(
    "--to <address>",
    "the destination QEMU's -incoming address (or vmprune receive's): HOST:PORT, [IPV6]:PORT or unix:/PATH",
    endpointArgument,
  )
  .option("--socket-mode <mode>", SOCKET_MODE_HELP, cliArgument(parseSocketMode))
  .option("--socket-owner <user[:group]>", SOCKET_OWNER_HELP, cliArgument(parseSocketOwner))
  .option(
    "--drop <categories>",
    "page categories to drop (comma-separated; without a receiver: free)",
    categoryList,
  )
  .option("--qmp <socket>", "the source QEMU's QMP socket: how to reach guest RAM (and check xbzrle is off)")
  .option(
    "--pid <pid>",
    "with --qmp: the source QEMU process (default: the owner of the socket)",
    positiveInt,
  )
  .option("--guest-memory <file>", "the guest's RAM file (offset = guest-physical address), instead of --qmp")
  .option(
    "--ram-block <name>",
    "with --guest-memory: the RAMBlock the file holds (default: the one block of the file's size in the stream's block list)",
  )
  .option("--dry-run", "judge and count the pages, but forward every record unchanged")
  .addOption(new Option("--classify-once", "TEST ONLY: classify once at the start (unsafe)").hideHelp())
  .option(
    "--link-key <file>",
    "the target is `vmprune receive`, not a QEMU: the pre-shared key file (the same on both hosts, >= 16 bytes); the link is TLS 1.3 with this key (TLS-PSK) unless --tls-creds or --insecure-plaintext",
  )
  .option("--tls-creds <dir>", TLS_CREDS_HELP.send)
  .option(
    "--tls-hostname <name>",
    "with --tls-creds: the name (or IP) receive's certificate must carry (default: the host of --to)",
  )
  .option("--insecure-plaintext", INSECURE_PLAINTEXT_HELP)
  .option(
    "--target <name>",
    "with a receive service (receive --allow-dir/--allow): the destination to feed, a socket name in its allowed directory or one of its allowed addresses",
  )
  .option(
    "--disk <image>",
    "the shared raw disk image: clean cache pages found on it (from the guest kernel's own metadata) go as references",
  )
  .option(
    "--cache-refs <how>",
    "how clean cache pages are found on the shared disks: locator (default: from the guest kernel's metadata, reading almost nothing of the disks; the content index of --disk only when the guest has no BTF), locator+index (also index the whole --disk image by content before the migration, for what the locator cannot place), index (the content index alone, as D3)",
    (value: string) => {
      if (!(CACHE_REF_SOURCES as readonly string[]).includes(value))
        throw new InvalidArgumentError(`give one of ${CACHE_REF_SOURCES.join(", ")}`);
      return value as CacheRefSources;
    },
  )
  .option(...REFS_WHEN_OPTION)
  .option("--capture <file>", "also write the main channel's stream, as received, to this file")
  .option(
    "--no-switchover-guard",
    "with --drop and --qmp: do not tell the source QEMU the link's measured rate for its switchover decision " +
      "(the guard holds the --qmp socket until the migration ends; without it the socket is freed after setup)",
  )
  .option("--json", "print the report as JSON")
  .action(
    async (opts: {
      switchoverGuard: boolean;
      listen: Endpoint;
      to: Endpoint;
      socketMode?: number;
      socketOwner?: { uid?: number; gid?: number };
      drop?: Category[];
      qmp?: string;
      pid?: number;
      guestMemory?: string;
      ramBlock?: string;
      dryRun?: boolean;
      classifyOnce?: boolean;
      capture?: string;
      linkKey?: string;
      tlsCreds?: string;
      tlsHostname?: string;
      insecurePlaintext?: boolean;
      target?: string;
      disk?: string;
      cacheRefs?: CacheRefSources;
      refsWhen?: RefsWhen;
      json?: boolean;
    }) => {
      const link = await linkOptions(opts, "send");
      if (opts.drop && !opts.qmp && !opts.guestMemory)
        throw new Error("--drop needs a way to read guest memory: --qmp SOCKET or --guest-memory FILE");
      const unixSocket = unixSocketOptions(opts);
      const qmp = opts.qmp ? await QmpClient.connect(opts.qmp) : undefined;
      let send: Awaited<ReturnType<typeof startSend>>;
      try {
        send = await startSend({
          listen: opts.listen,
          to: opts.to,
          ...(unixSocket ? { unixSocket } : {}),
          ...(opts.drop ? { drop: opts.drop } : {}),
          dryRun: opts.dryRun ?? false,
          guest: {
            ...(qmp && opts.qmp
              ? { qmp: { client: qmp, path: opts.qmp, ...(opts.pid ? { pid: opts.pid } : {}) } }
              : {}),
            ...(opts.guestMemory
              ? {
                  guestMemory: {
                    path: opts.guestMemory,
                    ...(opts.ramBlock ? { ramBlock: opts.ramBlock } : {}),
                    chooseBlockHint: "--ram-block NAME",
                  },
                }
              : {}),
            classifyOnce: opts.classifyOnce ?? false,
          },
          ...(opts.capture ? { capturePath: opts.capture } : {}),
          ...(link ? { link } : {}),
          ...(opts.disk ? { disk: opts.disk } : {}),
          ...(opts.cacheRefs ? { cacheRefSources: opts.cacheRefs } : {}),
          ...(opts.refsWhen ? { refsWhen: opts.refsWhen } : {}),
          guardSwitchover: opts.switchoverGuard,
          log,
        });
      } catch (error) {
        qmp?.close();
        throw error;
      }
      // Without the switchover guard the monitor is only needed to set up: free it for the operator at once.
      if (send.switchoverGuarded)
        log(
          `holding ${opts.qmp} for the switchover guard until the migration ends (--no-switchover-guard frees it)`,
        );
      else qmp?.close();
      const mode = opts.drop
        ? `dropping ${opts.drop.join(",")}${opts.dryRun ? " (dry run)" : ""}`
        : "passthrough";
      log(
        `vmprune send: listening on ${formatEndpoint(send.endpoint)}, relaying to ${formatEndpoint(opts.to)} (${mode})`,
      );
      const stop = () => void send.relay.close();
      process.once("SIGINT", stop);
      process.once("SIGTERM", stop);
      const result = await send.done;
      if (send.switchoverGuarded) qmp?.close();
      process.stdout.write(opts.json ? reportJson(result) : renderSendReport(result));
      if (result.relay.error) process.exitCode = 1;
    },
  );

program
  .command("migrate")
  .description(
    "live-migrate a VM between two QEMUs on this host through vmprune (the destination started with -incoming defer)",
  )
  .requiredOption("--src-qmp <socket>", "the source QEMU's QMP socket")
  .requiredOption("--dst-qmp <socket>", "the destination QEMU's QMP socket")
  .option("--drop <categories>", "page categories to drop: free, or free,cache (with --disk)", categoryList)
  .option("--baseline", "the same path without pruning (the relay passes every byte through)")
  .option(
    "--disk <image>",
    "with --drop cache: the shared raw disk image (vmprune receive runs beside the destination)",
  )
  .option(...REFS_WHEN_OPTION)
  .option("--src-pid <pid>", "the source QEMU process (default: the owner of its QMP socket)", positiveInt)
  .option(
    "--max-bandwidth <bytes/s>",
    "migration bandwidth cap (default: QEMU's current setting)",
    positiveInt,
  )
  .option(
    "--no-return-path",
    "do not turn on the return-path capability (then a cut stream may look completed to the source)",
  )
  .option("--json", "print the report as JSON")
  .option("--report <file.html>", "also write an HTML report with plots (throughput over time, bytes, pause)")
  .option(
    "--compare <report.json>",
    "with --report: an earlier `vmprune migrate --json` report of the same guest (e.g. its --baseline run), drawn first, as the baseline",
  )
  .action(
    async (opts: {
      srcQmp: string;
      dstQmp: string;
      drop?: Category[];
      baseline?: boolean;
      disk?: string;
      refsWhen?: RefsWhen;
      srcPid?: number;
      maxBandwidth?: number;
      returnPath: boolean;
      json?: boolean;
      report?: string;
      compare?: string;
    }) => {
      if (opts.baseline && opts.drop) throw new Error("give --drop or --baseline, not both");
      if (!opts.baseline && !opts.drop)
        throw new Error("give --drop free (prune) or --baseline (no pruning)");
      if (opts.compare && !opts.report) throw new Error("--compare goes with --report FILE.html");
      // Read before migrating: a wrong file must not cost a migration.
      const compared = opts.compare
        ? parseMigrateReport(await readFile(opts.compare, "utf8"), opts.compare)
        : undefined;
      const tty = process.stderr.isTTY;
      let lastLine = 0;
      const report = await migrate({
        srcQmp: opts.srcQmp,
        dstQmp: opts.dstQmp,
        drop: opts.drop ?? [],
        ...(opts.disk ? { disk: opts.disk } : {}),
        ...(opts.refsWhen ? { refsWhen: opts.refsWhen } : {}),
        ...(opts.srcPid ? { srcPid: opts.srcPid } : {}),
        ...(opts.maxBandwidth ? { parameters: { "max-bandwidth": opts.maxBandwidth } } : {}),
        capabilities: { "return-path": opts.returnPath },
        // Always: the JSON report then carries it for a later run's --compare (a timer, a few samples a second).
        throughputSampleMs: DEFAULT_SAMPLE_INTERVAL_MS,
        log,
        onProgress: (p) => {
          if (tty) process.stderr.write(`\r${renderMigrateProgress(p)}\x1b[K`);
          else if (p.elapsedMs - lastLine >= 2000) {
            lastLine = p.elapsedMs;
            log(renderMigrateProgress(p));
          }
        },
      });
      if (tty) process.stderr.write("\n");
      process.stdout.write(opts.json ? reportJson(report) : renderMigrateReport(report));
      if (report.error || report.status !== "completed") process.exitCode = 1;
      if (opts.report) {
        const runs = [
          ...(compared ? [{ name: `earlier ${migrateRowName(compared)}`, report: compared }] : []),
          { name: migrateRowName(report), report },
        ];
        const context = [`${opts.srcQmp} → ${opts.dstQmp}, status ${report.status}.`];
        await writeHtmlReport(opts.report, migrateReportModel(runs, context));
      }
    },
  );

/** Renders and writes the HTML report; says where on stderr. */
async function writeHtmlReport(path: string, model: MigrationReportModel): Promise<void> {
  // Loaded here: vega takes about half a second to load, which no other command should pay.
  const { htmlReport } = await import("../report/html-report.ts");
  const html = await htmlReport(model);
  try {
    await writeFile(path, html);
  } catch (error) {
    throw new Error(
      `the HTML report could not be written to ${path} (${error instanceof Error ? error.message : String(error)}): ` +
        "give --report a path in a writable directory",
    );
  }
  log(`HTML report written to ${resolve(path)}`);
}

const libvirt = program.command("libvirt").description("libvirt domains: live migration through vmprune");
libvirt
  .command("migrate <domain> <desturi> [virshArgs...]")
  .description(
    "live-migrate a running libvirt domain through vmprune send: virsh migrate --live --p2p DOMAIN DESTURI --migrateuri unix:///SOCKET, " +
      "with send listening on SOCKET for the source QEMU and relaying to --to (vmprune receive on the destination host, " +
      "which feeds the destination QEMU listening on SOCKET there). More virsh migrate options go after --, e.g. -- --unsafe --persistent",
  )
  .requiredOption(
    "--socket <path>",
    "the migration socket path of --migrateuri unix:///PATH, as both QEMUs see it (the source connects, the destination listens)",
  )
  .requiredOption(
    "--to <address>",
    "where send relays: vmprune receive's address on the destination host (with --link-key/--tls-creds), or the destination QEMU's socket",
    endpointArgument,
  )
  .option("-c, --connect <uri>", "the source libvirt's URI (default: virsh's, e.g. qemu:///system)")
  .option(
    "--drop <categories>",
    "page categories to drop (free; free,cache with vmprune receive and --disk)",
    categoryList,
  )
  .option("--disk <image>", "with --drop cache: the shared raw disk image")
  .option(...REFS_WHEN_OPTION)
  .option(
    "--qmp <socket>",
    "a QMP socket for the domain's QEMU other than libvirt's (default: the -qmp of the domain's <qemu:commandline>)",
  )
  .option("--pid-file <file>", "libvirt's PID file of the domain (default: the system or session daemon's)")
  .option(
    "--listen-path <path>",
    "where send binds its socket (default: --socket inside the source QEMU's root, /proc/PID/root/SOCKET)",
  )
  .option(
    "--ram-from-process",
    "read a RAM block whose file lacks share=on from the QEMU process (/proc/PID/mem) instead of refusing",
  )
  .option(
    "--link-key <file>",
    "the target is vmprune receive: the pre-shared key file (the same on both hosts); TLS-PSK unless --tls-creds or --insecure-plaintext",
  )
  .option("--tls-creds <dir>", TLS_CREDS_HELP.send)
  .option("--tls-hostname <name>", "with --tls-creds: the name (or IP) receive's certificate must carry")
  .option("--insecure-plaintext", INSECURE_PLAINTEXT_HELP)
  .option(
    "--target <name>",
    "with a receive service on the destination host: the destination to feed (a socket name in its --allow-dir, e.g. the basename of --socket)",
  )
  .option("--no-switchover-guard", "do not tell the source QEMU the link's measured rate (see send)")
  .option("--json", "print the report as JSON")
  .action(
    async (
      domain: string,
      destUri: string,
      virshArgs: string[],
      opts: {
        socket: string;
        to: Endpoint;
        connect?: string;
        drop?: Category[];
        disk?: string;
        refsWhen?: RefsWhen;
        qmp?: string;
        pidFile?: string;
        listenPath?: string;
        ramFromProcess?: boolean;
        linkKey?: string;
        tlsCreds?: string;
        tlsHostname?: string;
        insecurePlaintext?: boolean;
        target?: string;
        switchoverGuard: boolean;
        json?: boolean;
      },
    ) => {
      const link = await linkOptions(opts, "send");
      const report = await libvirtMigrate({
        domain,
        destUri,
        migrateSocket: opts.socket,
        to: opts.to,
        drop: opts.drop ?? [],
        virshArgs,
        guardSwitchover: opts.switchoverGuard,
        ramFromProcess: opts.ramFromProcess ?? false,
        ...(opts.connect ? { connectUri: opts.connect } : {}),
        ...(opts.disk ? { disk: opts.disk } : {}),
        ...(opts.refsWhen ? { refsWhen: opts.refsWhen } : {}),
        ...(opts.qmp ? { qmpSocket: opts.qmp } : {}),
        ...(opts.pidFile ? { pidFile: opts.pidFile } : {}),
        ...(opts.listenPath ? { listenPath: opts.listenPath } : {}),
        ...(link ? { link } : {}),
        log,
      });
      process.stdout.write(opts.json ? reportJson(report) : renderLibvirtMigrateReport(report));
      if (report.status !== "completed") process.exitCode = 1;
    },
  );

program
  .command("receive")
  .description(
    "the destination side of vmprune's link: accept vmprune send, rebuild referenced pages from the shared disk, feed the destination QEMU; with --allow-dir/--allow a long-running service for many migrations",
  )
  .requiredOption(
    "--listen <address>",
    "where vmprune send connects: HOST:PORT (port 0: any free port), [IPV6]:PORT or unix:/PATH",
    endpointArgument,
  )
  .option(
    "--to <address>",
    "one migration into this destination QEMU's -incoming address (HOST:PORT, [IPV6]:PORT or unix:/PATH), then exit",
  )
  .option(
    "--allow-dir <dir>",
    "serve many migrations: send --target NAME feeds the destination QEMU listening on unix:DIR/NAME",
  )
  .option(
    "--allow <addresses>",
    "serve many migrations: send --target ADDRESS may feed these destination addresses (comma-separated)",
    (value: string) => value.split(",").map((v) => endpointArgument(v.trim())),
  )
  .option(
    "--max-migrations <n>",
    `with --allow-dir/--allow: migrations at once (default ${DEFAULT_MAX_MIGRATIONS})`,
    positiveInt,
  )
  .option("--socket-mode <mode>", SOCKET_MODE_HELP, cliArgument(parseSocketMode))
  .option("--socket-owner <user[:group]>", SOCKET_OWNER_HELP, cliArgument(parseSocketOwner))
  .option(
    "--link-key <file>",
    "the pre-shared key file (the same as send's, >= 16 bytes); the link is TLS 1.3 with this key (TLS-PSK) unless --tls-creds or --insecure-plaintext",
  )
  .option("--tls-creds <dir>", TLS_CREDS_HELP.receive)
  .option("--insecure-plaintext", INSECURE_PLAINTEXT_HELP)
  .option(
    "--disk <image>",
    "a shared disk of the VM (repeat for each): a raw image file; FORMAT:PATH for another format QEMU opens (e.g. qcow2:/srv/vm.qcow2, read through a read-only qemu-nbd receive starts); or an NBD export (nbd+unix:///EXPORT?socket=/PATH, nbd://HOST:PORT/EXPORT). Without one, every reference is answered with a NACK",
    (value: string, previous: string[] = []) => [...previous, value],
  )
  .option("--json", "print the report as JSON (a service: one JSON line per migration)")
  .action(
    async (opts: {
      listen: Endpoint;
      to?: string;
      allowDir?: string;
      allow?: Endpoint[];
      maxMigrations?: number;
      socketMode?: number;
      socketOwner?: { uid?: number; gid?: number };
      linkKey?: string;
      tlsCreds?: string;
      insecurePlaintext?: boolean;
      disk?: string[];
      json?: boolean;
    }) => {
      const serve = opts.allowDir !== undefined || opts.allow !== undefined;
      if (serve === (opts.to !== undefined))
        throw new Error(
          "receive needs either --to ADDRESS (one migration into one destination QEMU) or --allow-dir DIR / --allow ADDRESSES (a service for many)",
        );
      const link = await linkOptions(opts, "receive");
      if (!link)
        throw new Error(
          "receive needs --link-key FILE (TLS-PSK) or --tls-creds DIR (x509): the link must be authenticated",
        );
      const unixSocket = unixSocketOptions(opts);
      const disks = opts.disk?.length ? await openReceiveDisks(opts.disk, log) : undefined;
      const disk = disks?.reader;
      const filesystems = disks?.filesystems;
      if (serve) {
        await serveReceive(opts, {
          ...link,
          ...(unixSocket ? { unixSocket } : {}),
          ...(disk ? { disk } : {}),
          ...(filesystems ? { filesystems } : {}),
        });
        await disks?.close();
        return;
      }
      const to = endpointArgument(opts.to ?? "");
      const receive = await startReceive({
        listen: opts.listen,
        to,
        ...(unixSocket ? { unixSocket } : {}),
        ...link,
        ...(disk ? { disk } : {}),
        ...(filesystems ? { filesystems } : {}),
        log,
      });
      log(`vmprune receive: listening on ${formatEndpoint(receive.endpoint)}, feeding ${formatEndpoint(to)}`);
      const stop = () => void receive.relay.close();
      process.once("SIGINT", stop);
      process.once("SIGTERM", stop);
      const report = await receive.done;
      await disks?.close();
      process.stdout.write(opts.json ? reportJson(report) : renderReceiveReport(report));
      if (report.relay.error) process.exitCode = 1;
    },
  );

/**
 * receive as a service: runs until SIGTERM or SIGINT. The first signal stops accepting and lets running
 * migrations finish; a second one cuts them (their sources keep running). One result per migration on stdout.
 */
async function serveReceive(
  opts: { listen: Endpoint; allowDir?: string; allow?: Endpoint[]; maxMigrations?: number; json?: boolean },
  link: {
    psk?: Buffer;
    security: LinkSecurity;
    unixSocket?: UnixSocketOptions;
    disk?: BlockReader;
    filesystems?: FilesystemDirectory;
  },
): Promise<void> {
  // Signals are taken from before the service listens, so a stop that comes at once is a clean stop too.
  let signals = 0;
  let stop = () => {};
  let cut = () => {};
  const stopping = new Promise<void>((r) => {
    stop = r;
  });
  const cutting = new Promise<boolean>((r) => {
    cut = () => r(true);
  });
  const onSignal = () => {
    if (++signals === 1) stop();
    else cut();
  };
  process.on("SIGINT", onSignal);
  process.on("SIGTERM", onSignal);
  const service = await ReceiveService.start({
    listen: opts.listen,
    ...link,
    allowed: {
      ...(opts.allowDir !== undefined ? { dir: resolve(opts.allowDir) } : {}),
      ...(opts.allow ? { addresses: opts.allow } : {}),
    },
    ...(opts.maxMigrations ? { maxMigrations: opts.maxMigrations } : {}),
    log,
    onMigration: (report) =>
      process.stdout.write(
        opts.json
          ? `${JSON.stringify(withOrigin(report))}\n`
          : `migration ${report.migration.slice(0, 8)} into ${report.destination}:\n${renderReceiveReport(report)}`,
      ),
  });
  await stopping;
  const running = service.status().migrations.length;
  log(
    `vmprune receive: stopping; ${running} migration${running === 1 ? "" : "s"} still running${running ? " (a second signal cuts them; their sources keep running)" : ""}`,
  );
  const closing = service.close();
  const abort = await Promise.race([closing.then(() => false), cutting]);
  const report = abort ? await service.close({ abort: true }) : await closing;
  log(
    `vmprune receive: served ${report.migrations.length} migration(s), refused ${report.refused.length + report.refusedNotKept} connection(s)`,
  );
}

/**
 * --link-key, --tls-creds, --tls-hostname, --insecure-plaintext, --target → the link's key, TLS mode and the
 * destination to ask a receive service for, or undefined when none is given (send: the target is a plain QEMU).
 * The default with a key file is TLS-PSK.
 */
async function linkOptions(
  opts: {
    linkKey?: string;
    tlsCreds?: string;
    tlsHostname?: string;
    insecurePlaintext?: boolean;
    target?: string;
  },
  command: "send" | "receive",
): Promise<{ psk?: Buffer; security: LinkSecurity; target?: string } | undefined> {
  const link = await linkSecurityOptions(opts, command);
  if (opts.target === undefined) return link;
  if (!link)
    throw new Error("--target names a destination of a receive service: it needs --link-key or --tls-creds");
  return { ...link, target: opts.target };
}

/** --link-key, --tls-creds, --tls-hostname, --insecure-plaintext → the key and TLS mode (see linkOptions). */
async function linkSecurityOptions(
  opts: { linkKey?: string; tlsCreds?: string; tlsHostname?: string; insecurePlaintext?: boolean },
  command: "send" | "receive",
): Promise<{ psk?: Buffer; security: LinkSecurity } | undefined> {
  if (opts.insecurePlaintext && opts.tlsCreds)
    throw new Error("--insecure-plaintext and --tls-creds contradict each other: give one");
  if (opts.tlsHostname && !opts.tlsCreds)
    throw new Error("--tls-hostname checks an x509 certificate: it needs --tls-creds DIR");
  if (opts.insecurePlaintext && !opts.linkKey)
    throw new Error(
      "--insecure-plaintext still needs --link-key FILE: the plaintext link is authenticated by it",
    );
  const psk = opts.linkKey ? await readKey(opts.linkKey) : undefined;
  if (opts.tlsCreds) {
    const security: LinkSecurity = {
      mode: "x509",
      dir: opts.tlsCreds,
      ...(command === "send" && opts.tlsHostname ? { hostname: opts.tlsHostname } : {}),
    };
    return { ...(psk ? { psk } : {}), security };
  }
  if (!psk) return undefined;
  if (opts.insecurePlaintext) return { psk, security: { mode: "plaintext" } };
  return { psk, security: { mode: "psk", key: psk } };
}

/** A pre-shared key file: its bytes (trailing newline included), at least 16. */
async function readKey(path: string): Promise<Buffer> {
  const key = await readFile(path);
  if (key.length < MIN_PSK_BYTES)
    throw new Error(
      `${path}: a link key needs at least ${MIN_PSK_BYTES} bytes (e.g. head -c 32 /dev/urandom > ${path})`,
    );
  return key;
}

/** "free,cache" → categories (validated). */
function categoryList(value: string): Category[] {
  const names = value.split(",").map((v) => v.trim());
  for (const n of names)
    if (!(CATEGORY_NAMES as string[]).includes(n) || n === "unknown")
      throw new InvalidArgumentError(
        `page categories, comma-separated: ${CATEGORY_NAMES.filter((c) => c !== "unknown").join(", ")}`,
      );
  return names as Category[];
}

program.parseAsync(process.argv).catch((error: unknown) => {
  log(`vmprune: ${error instanceof Error ? error.message : String(error)}`);
  // Exit now: a failed command may still hold sockets (a QMP connection, a listening relay) that would keep
  // the process alive. stderr is synchronous for files, pipes and terminals, so the message is out.
  process.exit(1);
});
