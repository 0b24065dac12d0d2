/**
 * One live migration of a LabPair's guest through `vmprune send` and `vmprune receive` joined by vmprune's link
 * (in this process), dropping free pages and sending clean page-cache pages as references to the pair's shared
 * data disk; the destination is held paused (-S) so the pruning oracles can compare RAM afterwards.
 */
import { randomBytes } from "node:crypto";
import { join } from "node:path";
import { type ReceiveReport, startReceive } from "../migrate/link-receive.ts";
import type { RefsWhen } from "../migrate/link-send.ts";
import { openReceiveDisks } from "../migrate/receive-disks.ts";
import { type CacheRefSources, type SendReport, startSend } from "../migrate/send.ts";
import {
  LOOPBACK_PARAMETERS,
  type MigrationOptions,
  type MigrationResult,
  prepareIncoming,
  runMigration,
  tcpAddress,
  waitDestinationState,
} from "../qemu/migration.ts";
import { QmpClient } from "../qemu/qmp.ts";
import type { LabPair } from "./lab-vm.ts";
import { type PrunedMigration, prunedRamOracle, tapOnQemu72 } from "./prune-oracle.ts";
import type { Vm } from "./vm.ts";

export interface LinkedMigration {
  dst: Vm;
  result: MigrationResult;
  send: SendReport;
  receive: ReceiveReport;
  differing: number;
  differingNotFree: PrunedMigration["differingNotFree"];
  qemuUnsent: PrunedMigration["qemuUnsent"];
  finalFree: number;
}

export async function migrateThroughLink(
  pair: LabPair,
  options: {
    migration?: Partial<MigrationOptions>;
    during?: () => Promise<unknown>;
    /** The image receive reads (default: the shared disk itself); a differing copy forces NACKs. */
    receiveDisk?: string;
    /** Capabilities and parameters the destination needs as well (multifd, its channels). */
    incoming?: Pick<MigrationOptions, "capabilities" | "parameters">;
    /**
     * Where send finds cache pages (send.ts CacheRefSources). Default "locator" on the shared raw image; with
     * `disksFromQemu`, send gives no image and reads the source QEMU's disks through its own NBD exports.
     */
    cacheRefSources?: CacheRefSources;
    disksFromQemu?: boolean;
    /** More disks receive reads besides the shared data disk (e.g. a second data disk), as `receive --disk`. */
    receiveDisks?: string[];
    /** send's and receive's log lines, prefixed "send: " and "receive: ". */
    log?: (line: string) => void;
    /**
     * When cache pages go as references (default "always": what these oracles test; send's own default,
     * "link-busy", sends them whole whenever loopback has room, which it mostly has).
     */
    refsWhen?: RefsWhen;
  } = {},
): Promise<LinkedMigration> {
  const disk = join(pair.diskDir, "data.img");
  const psk = randomBytes(32);
  const dst = await pair.startDestination({ paused: true });
  const dstUri = await prepareIncoming(dst.monitor, { incomingUri: "tcp:127.0.0.1:0", ...options.incoming });
  const disks = await openReceiveDisks([options.receiveDisk ?? disk, ...(options.receiveDisks ?? [])]);
  const receive = await startReceive({
    listen: { host: "127.0.0.1", port: 0 },
    to: tcpAddress(dstUri),
    psk,
    disk: disks.reader,
    filesystems: disks.filesystems,
    ...(options.log ? { log: (line: string) => options.log?.(`receive: ${line}`) } : {}),
  });
  const qmp = await QmpClient.connect(pair.src.toolQmpPath);
  try {
    const send = await startSend({
      listen: { host: "127.0.0.1", port: 0 },
      to: receive.address,
      drop: ["free", "cache"],
      guest: { qmp: { client: qmp, path: pair.src.toolQmpPath } },
      link: { psk },
      ...(options.disksFromQemu ? {} : { disk }),
      ...(options.cacheRefSources ? { cacheRefSources: options.cacheRefSources } : {}),
      refsWhen: options.refsWhen ?? "always",
      ...(options.log ? { log: (line: string) => options.log?.(`send: ${line}`) } : {}),
    });
    const tap = await tapOnQemu72(pair.src, `tcp:127.0.0.1:${send.address.port}`);
    try {
      const [result] = await Promise.all([
        runMigration(pair.src.monitor, tap?.uri ?? `tcp:127.0.0.1:${send.address.port}`, {
          parameters: LOOPBACK_PARAMETERS,
          ...options.migration,
        }),
        options.during?.(),
      ]);
      await waitDestinationState(dst.monitor, "paused");
      const [sent, received] = await Promise.all([send.done, receive.done]);
      const oracle = await prunedRamOracle(pair.src, dst, tap?.pages);
      return { dst, result, send: sent, receive: received, ...oracle };
    } finally {
      await tap?.stop();
      await send.relay.close();
    }
  } finally {
    qmp.close();
    await receive.relay.close();
    await disks.close();
  }
}
