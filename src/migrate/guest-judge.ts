/**
 * Opens what `vmprune send --drop free` needs before the migration starts: a way to read the source guest's RAM
 * and a judge over it. From the source QEMU's QMP socket (its RAM layout, its memory-backend files or its
 * process memory; and its migration capabilities, to refuse xbzrle), or from a RAM file alone (offset = guest-
 * physical address). Anything that keeps introspection from working is not an error: it is the reason the
 * migration runs as a plain passthrough (invariant 4). Only xbzrle, which would make pruning unsafe, refuses.
 */
import { statSync } from "node:fs";
import type { GuestMemory, RamMapping } from "../introspect/guest-memory.ts";
import { openRawSnapshot } from "../introspect/guest-memory.ts";
import { describeSources, openLiveVmMemory } from "../introspect/live-vm.ts";
import { IntrospectionJudge, type PageJudge, SnapshotJudge } from "../prune/page-judge.ts";
import type { QmpClient } from "../qemu/qmp.ts";

export interface GuestJudgeOptions {
  /** The source QEMU's monitor (preferred: layout, RAM files or process memory, capability check). */
  qmp?: { client: QmpClient; path: string; pid?: number };
  /** A RAM file whose offsets are guest-physical addresses, holding RAMBlock `ramBlock` (default "ram0"). */
  guestMemory?: { path: string; ramBlock?: string };
  /** TEST ONLY: classify once at the start instead of per batch (breaks invariant 1). */
  classifyOnce?: boolean;
  log?: (line: string) => void;
}

export interface OpenedJudge {
  /** The judge, or the reason pruning is off for this migration. */
  judge: PageJudge | string;
  close(): void;
}

export class PruningRefused extends Error {
  override name = "PruningRefused";
}

/** Refuses pruning while QEMU's xbzrle capability is on (invariant 3). */
export async function assertNoXbzrle(qmp: QmpClient): Promise<void> {
  const caps = (await qmp.executeUntyped("query-migrate-capabilities")) as {
    capability: string;
    state: boolean;
  }[];
  if (caps.some((c) => c.capability === "xbzrle" && c.state))
    throw new PruningRefused(
      "the source QEMU has the xbzrle capability on: its deltas build on page contents vmprune would have zeroed. " +
        "Turn it off (migrate-set-capabilities xbzrle=false) to prune, or migrate without --drop.",
    );
}

export async function openGuestJudge(options: GuestJudgeOptions): Promise<OpenedJudge> {
  const log = options.log ?? (() => undefined);
  if (options.qmp) await assertNoXbzrle(options.qmp.client);
  let memory: GuestMemory | undefined;
  let layout: RamMapping[];
  try {
    if (options.qmp) {
      const live = await openLiveVmMemory(options.qmp.client, options.qmp.path, options.qmp.pid);
      memory = live.memory;
      layout = live.layout;
      log(`guest RAM: ${describeSources(live.sources)}`);
    } else if (options.guestMemory) {
      const { path, ramBlock = "ram0" } = options.guestMemory;
      memory = openRawSnapshot(path);
      layout = [{ gpa: 0, size: statSync(path).size, block: ramBlock, blockOffset: 0 }];
    } else {
      return {
        judge: "no way to read guest memory was given (--qmp or --guest-memory)",
        close: () => undefined,
      };
    }
    const opened = memory;
    const judge = options.classifyOnce
      ? new SnapshotJudge(opened, layout)
      : new IntrospectionJudge(opened, layout);
    log(`pruning with ${judge.description}`);
    return { judge, close: () => opened.close() };
  } catch (error) {
    memory?.close();
    const reason = `guest introspection unavailable (${error instanceof Error ? error.message : String(error)}): migrating without pruning`;
    log(reason);
    return { judge: reason, close: () => undefined };
  }
}
