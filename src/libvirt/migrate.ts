/**
 * One libvirt live migration through vmprune, the way libvirt's docs/migration.rst ("Migration using only UNIX
 * sockets") lays it out: `virsh migrate --live --p2p DOMAIN DESTURI --migrateuri unix:///PATH`, where the source
 * QEMU connects to PATH on this host and the destination QEMU listens on PATH on the destination host. vmprune
 * send listens on PATH here, and relays to `vmprune receive` (or straight to a QEMU) on the destination.
 *
 *   1. The domain: its XML (`virsh dumpxml`), its QEMU process (libvirt's PID file), a QMP monitor that is not
 *      libvirt's (a second `-qmp` from `<qemu:commandline>`, or one the caller gives, e.g. virt-qemu-qmp-proxy's).
 *   2. With pruning: refuse, with the reason and the way out, what cannot be pruned (refusals.ts), including a
 *      RAM file without share=on; guest RAM is read from shared files, else from /proc/PID/mem.
 *   3. send listens on PATH as the source QEMU sees it (through /proc/PID/root, so a QEMU in its own mount
 *      namespace finds it), owned by QEMU's user; then virsh migrates, and send relays until the streams close.
 *   4. The report: vmprune's bytes (from QEMU, on the link) beside libvirt's completed-job figures.
 */
import { readlinkSync } from "node:fs";
import { dirname } from "node:path";
import type { Category } from "../introspect/classifier.ts";
import { PruningRefused } from "../migrate/guest-judge.ts";
import type { RefsWhen } from "../migrate/link-send.ts";
import { type SendReport, startSend } from "../migrate/send.ts";
import type { ExportSocketDir } from "../migrate/source-disks.ts";
import { QmpClient } from "../qemu/qmp.ts";
import { checkUnixPath, type Endpoint, formatEndpoint } from "../transport/endpoint.ts";
import type { LinkSecurity } from "../transport/tls.ts";
import { type DomainProcess, findDomainProcess, pidFileCandidates } from "./domain-process.ts";
import { type DomainDescription, parseDomainXml } from "./domain-xml.ts";
import { describeRamSource, type RamBlockSource, ramBlockSources } from "./guest-ram.ts";
import {
  describeRefusals,
  type PruneRefusal,
  refusalsForQemuState,
  refusalsForRam,
  refusalsForVirshOptions,
  unprunedNotes,
} from "./refusals.ts";
import { type MigrationJobFigures, migrationFigures, parseJobStats, type Virsh, virsh } from "./virsh.ts";

export interface LibvirtMigrateOptions {
  domain: string;
  /** The destination libvirt's URI, as the source daemon reaches it (virsh migrate's DESTURI). */
  destUri: string;
  /** The source libvirt's URI (virsh -c); undefined: virsh's default. */
  connectUri?: string;
  /** PATH of `--migrateuri unix:///PATH`: where the source QEMU connects, and the destination QEMU listens. */
  migrateSocket: string;
  /** Where send binds; default: migrateSocket inside the source QEMU's root (/proc/PID/root/PATH). */
  listenPath?: string;
  /** Where send relays to: `vmprune receive`'s link endpoint (with `link`), or a QEMU's socket. */
  to: Endpoint;
  /** The link to vmprune receive; `target`: the destination to ask a receive service for (send --target). */
  link?: { psk?: Buffer; security?: LinkSecurity; target?: string };
  drop: readonly Category[];
  /** With cache dropped: when clean cache pages go as references (send's --refs-when; default link-busy). */
  refsWhen?: RefsWhen;
  disk?: string;
  /** A QMP socket to use instead of the domain's second monitor (e.g. virt-qemu-qmp-proxy's). */
  qmpSocket?: string;
  /** libvirt's PID file for the domain, when not at the usual places (domain-process.ts). */
  pidFile?: string;
  /** Read a share=off RAM file's block from the QEMU process instead of refusing (guest-ram.ts). */
  ramFromProcess?: boolean;
  /** More `virsh migrate` options (e.g. --unsafe, --persistent, --bandwidth N). */
  virshArgs?: readonly string[];
  guardSwitchover?: boolean;
  /** How long virsh migrate may take (default 1 h). */
  timeoutMs?: number;
  log?: (line: string) => void;
  virshBinary?: string;
}

export interface LibvirtMigrateReport {
  domain: string;
  uuid: string;
  destUri: string;
  migrateUri: string;
  status: "completed" | "failed";
  /** virsh's message when it failed. */
  error: string | null;
  qemu: { pid: number; pidFile: string; monitor: string | null };
  ramSources: string[];
  virshCommand: string[];
  elapsedMs: number;
  /** vmprune's count on the main and any other channel. */
  bytes: {
    fromQemu: number;
    onLink: number;
    savedBytes: number;
    savedPercent: number;
  };
  /** libvirt's figures for the completed job, from the source daemon or else the destination's. */
  libvirtJob: MigrationJobFigures | null;
  libvirtJobError: string | null;
  send: SendReport;
}

/**
 * A path as QEMU sees it, reached from this process: the path itself when QEMU shares this process's mount
 * namespace, else through QEMU's root (proc(5), /proc/PID/root walks QEMU's mounts), as for a QEMU that libvirt
 * gave its own namespace (qemu.conf `namespaces`) or the lab's per-host bind mounts.
 */
export function throughProcessRoot(pid: number, path: string): string {
  let same = false;
  try {
    same = readlinkSync("/proc/self/ns/mnt") === readlinkSync(`/proc/${pid}/ns/mnt`);
  } catch {
    // cannot compare (no permission): go through the root, which works either way
  }
  return same ? path : `/proc/${pid}/root${path}`;
}

interface DomainFacts {
  description: DomainDescription;
  process: DomainProcess;
  monitorPath: string | null;
  /** Where the domain's QEMU can make its NBD server socket (beside the QMP socket it made), both views. */
  exportSocketDir: ExportSocketDir | null;
}

async function domainFacts(source: Virsh, options: LibvirtMigrateOptions): Promise<DomainFacts> {
  const description = parseDomainXml(await source.run(["dumpxml", options.domain]));
  if (description.id === undefined)
    throw new Error(`domain ${options.domain} is not running: start it (virsh start ${options.domain})`);
  const process = findDomainProcess(
    options.domain,
    options.pidFile ? [options.pidFile] : pidFileCandidates(options.domain, source.uri),
  );
  const monitorPath = options.qmpSocket
    ? options.qmpSocket
    : description.extraQmpSocket
      ? throughProcessRoot(process.pid, description.extraQmpSocket)
      : null;
  // QEMU made the second monitor's socket, so it can make its NBD server's socket in the same directory.
  const qemuDir =
    !options.qmpSocket && description.extraQmpSocket ? dirname(description.extraQmpSocket) : null;
  const exportSocketDir = qemuDir ? { qemu: qemuDir, local: throughProcessRoot(process.pid, qemuDir) } : null;
  return { description, process, monitorPath, exportSocketDir };
}

async function pruneRefusals(
  qmp: QmpClient,
  facts: DomainFacts,
  options: LibvirtMigrateOptions,
  ram: readonly RamBlockSource[],
): Promise<PruneRefusal[]> {
  const capabilities = (await qmp.executeUntyped("query-migrate-capabilities")) as {
    capability: string;
    state: boolean;
  }[];
  const parameters = (await qmp.executeUntyped("query-migrate-parameters")) as { "tls-creds"?: string };
  for (const note of unprunedNotes(options.virshArgs ?? [], capabilities))
    options.log?.(`vmprune libvirt: ${note}`);
  return [
    ...refusalsForVirshOptions(options.virshArgs ?? []),
    ...refusalsForQemuState(capabilities, parameters),
    ...refusalsForRam(ram, facts.description, options.ramFromProcess ?? false),
  ];
}

async function completedJob(
  source: Virsh,
  destination: Virsh,
  domain: string,
): Promise<{ job: MigrationJobFigures | null; error: string | null }> {
  const errors: string[] = [];
  for (const [side, conn] of [
    ["source", source],
    ["destination", destination],
  ] as const) {
    try {
      const stats = parseJobStats(await conn.run(["domjobinfo", "--completed", "--rawstats", domain]));
      return { job: migrationFigures(stats, side), error: null };
    } catch (error) {
      errors.push(`${side}: ${error instanceof Error ? error.message : String(error)}`);
    }
  }
  return { job: null, error: errors.join("; ") };
}

/** Runs the whole migration; throws PruningRefused (before anything starts) when pruning must not run. */
export async function libvirtMigrate(options: LibvirtMigrateOptions): Promise<LibvirtMigrateReport> {
  const log = options.log ?? (() => undefined);
  if (!options.migrateSocket.startsWith("/"))
    throw new Error(`the migration socket must be an absolute path, not ${options.migrateSocket}`);
  const source = virsh(options.connectUri, options.virshBinary);
  const destination = virsh(options.destUri, options.virshBinary);
  const facts = await domainFacts(source, options);
  log(
    `domain ${facts.description.name}: QEMU PID ${facts.process.pid} (${facts.process.pidFile}), monitor ${facts.monitorPath ?? "none"}`,
  );
  const pruning = options.drop.length > 0;
  if (pruning && !facts.monitorPath)
    throw new PruningRefused(
      `domain ${options.domain} has no QMP monitor vmprune may use (libvirt holds its own): add one to the domain XML, ` +
        `<qemu:commandline><qemu:arg value='-qmp'/><qemu:arg value='unix:/run/vmprune/${options.domain}.qmp,server=on,wait=off'/></qemu:commandline> ` +
        `(xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'; applies at the next start), or run virt-qemu-qmp-proxy and give its socket with --qmp; or migrate without --drop`,
    );
  const qmp = facts.monitorPath && pruning ? await QmpClient.connect(facts.monitorPath) : undefined;
  let ramSources: string[] = [];
  let send: Awaited<ReturnType<typeof startSend>>;
  try {
    if (qmp) {
      const ram = await ramBlockSources(qmp);
      ramSources = ram.map(describeRamSource);
      for (const line of ramSources) log(`guest RAM: ${line}`);
      const refusals = await pruneRefusals(qmp, facts, options, ram);
      if (refusals.length > 0)
        throw new PruningRefused(
          `vmprune will not prune this migration of ${options.domain}:\n${describeRefusals(refusals)}`,
        );
    }
    const listenPath = options.listenPath ?? throughProcessRoot(facts.process.pid, options.migrateSocket);
    checkUnixPath(listenPath);
    send = await startSend({
      listen: { path: listenPath },
      to: options.to,
      // Only the domain's QEMU (its user) may connect: 0600, owned by that user (libvirt runs QEMU as its own).
      unixSocket: { mode: 0o600, owner: { uid: facts.process.uid, gid: facts.process.gid } },
      drop: options.drop,
      ...(options.refsWhen ? { refsWhen: options.refsWhen } : {}),
      ...(qmp && facts.monitorPath
        ? {
            guest: {
              qmp: { client: qmp, path: facts.monitorPath, pid: facts.process.pid },
              classifyOnce: false,
            },
          }
        : {}),
      ...(options.link ? { link: options.link } : {}),
      ...(options.disk ? { disk: options.disk } : {}),
      ...(facts.exportSocketDir ? { exportSocketDir: facts.exportSocketDir } : {}),
      guardSwitchover: options.guardSwitchover ?? true,
      log,
    });
  } catch (error) {
    qmp?.close();
    throw error;
  }
  if (!send.switchoverGuarded) qmp?.close();
  const migrateUri = `unix://${options.migrateSocket}`;
  const virshCommand = [
    "migrate",
    "--live",
    "--p2p",
    ...(options.virshArgs ?? []),
    options.domain,
    options.destUri,
    "--migrateuri",
    migrateUri,
  ];
  log(`vmprune libvirt: send listens on ${formatEndpoint(send.endpoint)}; virsh ${virshCommand.join(" ")}`);
  const started = performance.now();
  let error: string | null = null;
  try {
    await source.run(virshCommand, options.timeoutMs ?? 3_600_000);
  } catch (e) {
    error = e instanceof Error ? e.message : String(e);
    log(`vmprune libvirt: ${error}`);
  }
  const elapsedMs = Math.round(performance.now() - started);
  // The relay ends when QEMU's connections close; after a failure nothing may ever connect: close it.
  if (error) void send.relay.close();
  const closing = setTimeout(() => void send.relay.close(), 60_000);
  const sendReport = await send.done.finally(() => clearTimeout(closing));
  qmp?.close();
  const { job, error: jobError } = await completedJob(source, destination, options.domain);
  if (jobError) log(`vmprune libvirt: no completed-job figures: ${jobError}`);
  const fromQemu = sendReport.relay.channels.reduce((sum, c) => sum + c.bytesFromSource, 0);
  const onLink = sendReport.relay.channels.reduce((sum, c) => sum + c.bytesToDestination, 0);
  const savedBytes = Math.max(0, fromQemu - onLink);
  return {
    domain: options.domain,
    uuid: facts.description.uuid,
    destUri: options.destUri,
    migrateUri,
    status: error === null && !sendReport.relay.error ? "completed" : "failed",
    error: error ?? sendReport.relay.error ?? null,
    qemu: { pid: facts.process.pid, pidFile: facts.process.pidFile, monitor: facts.monitorPath },
    ramSources,
    virshCommand,
    elapsedMs,
    bytes: {
      fromQemu,
      onLink,
      savedBytes,
      savedPercent: fromQemu > 0 ? Math.round((savedBytes / fromQemu) * 1000) / 10 : 0,
    },
    libvirtJob: job,
    libvirtJobError: jobError,
    send: sendReport,
  };
}
