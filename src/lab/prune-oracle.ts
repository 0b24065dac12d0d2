/**
 * The pruning oracles of the lab, for tests: one live migration from a LabPair's source through `vmprune send`
 * (a separate process, as an operator runs it) into a destination held paused (-S), then
 *   - oracle 1: source (postmigrate) and destination RAM compared page by page; every differing page must be
 *     free in the source's final classification (both VMs are paused, so it is exact). Here "free" includes
 *     pages on the per-CPU free lists (flagless, refcount 0: owned by no one), which the pruning judge does not
 *     drop itself but which a page can reach after it was judged free: the allocator moves buddy pages to the
 *     per-CPU lists in bulk without writing them;
 *   - oracle 2 is the caller's: resume the destination (`cont`) and run `verify` there.
 */
import { CATEGORY } from "../introspect/classifier.ts";
import {
  blockOffsetToGpa,
  discoverQemuLayout,
  openRawSnapshot,
  type RamMapping,
} from "../introspect/guest-memory.ts";
import { classifyGuest } from "../introspect/inspect.ts";
import {
  LOOPBACK_PARAMETERS,
  type MigrationOptions,
  type MigrationResult,
  prepareIncoming,
  runMigration,
  waitDestinationState,
} from "../qemu/migration.ts";
import type { LabPair } from "./lab-vm.ts";
import { compareRamFiles } from "./ram-compare.ts";
import { SendProcess, type SendResult } from "./send-process.ts";
import type { Vm } from "./vm.ts";

/**
 * QEMU switched over while the lab held it (MigrationResult.endedWhileHeld), before `during` had finished: the
 * migration did not test what it meant to. The source was resumed and `during` finished; run it again.
 */
export class EndedWhileHeldError extends Error {
  constructor(readonly syncs: number) {
    super(
      `QEMU switched over while held, after ${syncs} passes and before the work meant to run during the migration had finished`,
    );
    this.name = "EndedWhileHeldError";
  }
}

export interface PrunedMigration {
  dst: Vm;
  result: MigrationResult;
  sent: SendResult;
  /** Pages whose bytes differ between source and destination. */
  differing: number;
  /** Differing pages that are not free in the final classification (must be none). */
  differingNotFree: { pfn: number; category: string }[];
  /** Pages free in the final classification. */
  finalFree: number;
}

const PAGE_SIZE = 4096;
const CATEGORY_BY_CODE = Object.fromEntries(Object.entries(CATEGORY).map(([name, code]) => [code, name]));

/**
 * Oracle 1 over two paused lab guests' RAM files (their one RAM block): the pages that differ, those of them that
 * are not free in the source's final classification (must be none), and how many pages are free at the end. A
 * file offset is a RAMBlock offset, not a guest-physical address once the guest's RAM is split around the PCI
 * hole (q35 puts RAM above 2 GiB at 4 GiB when the guest has 2.75 GiB or more): the source QEMU's layout says
 * which is which.
 */
export async function prunedRamOracle(
  src: Vm,
  dst: Vm,
): Promise<Pick<PrunedMigration, "differing" | "differingNotFree" | "finalFree">> {
  const layout = await ramLayoutOf(src);
  const block = src.config.ramBackendId ?? "ram0";
  const diff = await compareRamFiles(src.ramPath, dst.ramPath, Number.MAX_SAFE_INTEGER);
  const memory = openRawSnapshot(src.ramPath, layout, block);
  try {
    const final = classifyGuest(memory, { inferPcpFree: true }).categories;
    const pfnOf = (offsetPage: number): number | null => {
      const gpa = blockOffsetToGpa(layout, block, offsetPage * PAGE_SIZE);
      return gpa === null ? null : gpa / PAGE_SIZE;
    };
    const differingNotFree: { pfn: number; category: string }[] = [];
    for (const page of diff.differing) {
      const pfn = pfnOf(page);
      // A RAMBlock page outside guest-physical memory holds no guest data the kernel can describe.
      if (pfn === null) {
        differingNotFree.push({ pfn: -page, category: "outside guest-physical memory" });
        continue;
      }
      if (final[pfn] !== CATEGORY.free)
        differingNotFree.push({ pfn, category: CATEGORY_BY_CODE[final[pfn] ?? 0] ?? "?" });
    }
    let finalFree = 0;
    for (const c of final) if (c === CATEGORY.free) finalFree++;
    return { differing: diff.differing.length, differingNotFree, finalFree };
  } finally {
    memory.close();
  }
}

/** The guest-physical layout of a running lab VM's RAM (which RAMBlock offset is which address), for the oracle. */
export function ramLayoutOf(vm: Vm): Promise<RamMapping[]> {
  return discoverQemuLayout((commandLine) => vm.monitor.hmp(commandLine));
}

export async function migrateThroughPruningSend(
  pair: LabPair,
  options: {
    /** Extra `vmprune send` arguments (default: --drop free --qmp <the source's tool socket>). */
    sendArgs?: string[];
    migration?: Partial<MigrationOptions>;
    /** Capabilities and parameters the destination needs as well (multifd, its channels and compression). */
    incoming?: Pick<MigrationOptions, "capabilities" | "parameters">;
    /** Runs while the migration is in flight (e.g. a workload that allocates memory). */
    during?: () => Promise<unknown>;
  } = {},
): Promise<PrunedMigration> {
  const dst = await pair.startDestination({ paused: true });
  const dstUri = await prepareIncoming(dst.monitor, { incomingUri: "tcp:127.0.0.1:0", ...options.incoming });
  const send = await SendProcess.start({
    to: dstUri,
    extraArgs: options.sendArgs ?? ["--drop", "free", "--qmp", pair.src.toolQmpPath],
  });
  try {
    const migration = runMigration(pair.src.monitor, send.uri, {
      parameters: LOOPBACK_PARAMETERS,
      ...options.migration,
    });
    // Run `during` while the migration runs; a failure of either is reported once both have settled.
    const during = options.during?.();
    const [settled] = await Promise.allSettled([migration]);
    if (settled.status === "rejected") {
      await during?.catch(() => undefined);
      throw settled.reason;
    }
    const result = settled.value;
    if (result.endedWhileHeld && during) {
      // The source stopped with `during` still in flight inside the guest: it could never finish there, and the
      // run did not test what it meant to. Resume the source (it still owns the guest: the destination was
      // started with -S), let `during` finish, and say what happened so the caller can run it again.
      await pair.src.monitor.execute("cont");
      await during;
      throw new EndedWhileHeldError(result.info.ram?.["dirty-sync-count"] ?? 0);
    }
    await during;
    await waitDestinationState(dst.monitor, "paused");
    const sent = await send.wait(60_000);
    return { dst, result, sent, ...(await prunedRamOracle(pair.src, dst)) };
  } finally {
    await send.stop();
  }
}
