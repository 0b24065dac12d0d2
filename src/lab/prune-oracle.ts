/**
 * The pruning oracles of the lab, for tests: one live migration from a LabPair's source through `vmprune send`
 * (a separate process, as an operator runs it) into a destination held paused (-S), then
 *   - oracle 1: source (postmigrate) and destination RAM compared page by page; every differing page must be
 *     free in the source's final classification (both VMs are paused, so it is exact). Here "free" includes
 *     pages on the per-CPU free lists (flagless, refcount 0: owned by no one), which the pruning judge does not
 *     drop itself but which a page can reach after it was judged free: the allocator moves buddy pages to the
 *     per-CPU lists in bulk without writing them;
 *   - oracle 2 is the caller's: resume the destination (`cont`) and run `verify` there.
 * On QEMU 7.2, which loses dirty pages by itself under TCG, a tap between the source QEMU and send records what
 * QEMU last sent for each page (sent-pages.ts): a differing page whose destination bytes are exactly that is
 * QEMU's own loss, reported apart (`qemuUnsent`), not vmprune's.
 */
import { open } from "node:fs/promises";
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
import type { QmpClient } from "../qemu/qmp.ts";
import type { LabPair } from "./lab-vm.ts";
import { compareRamFiles } from "./ram-compare.ts";
import { SendProcess, type SendResult } from "./send-process.ts";
import { type SentPages, SentPagesTap } from "./sent-pages.ts";
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
  /**
   * Differing pages that are not free in the final classification and not QEMU's own loss (must be none); on 7.2,
   * what the destination holds against what QEMU last sent.
   */
  differingNotFree: { pfn: number; category: string; destination?: string }[];
  /**
   * Differing pages, not free, whose destination bytes are exactly what the source QEMU last sent: QEMU 7.2 never
   * sent the newer bytes (its own loss under TCG, see sent-pages.ts). Always empty on 10.0.
   */
  qemuUnsent: { pfn: number; category: string }[];
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
  sent?: SentPages,
): Promise<Pick<PrunedMigration, "differing" | "differingNotFree" | "qemuUnsent" | "finalFree">> {
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
    const differingNotFree: PrunedMigration["differingNotFree"] = [];
    const notFree: { page: number; pfn: number; category: string }[] = [];
    for (const page of diff.differing) {
      const pfn = pfnOf(page);
      // A RAMBlock page outside guest-physical memory holds no guest data the kernel can describe.
      if (pfn === null) {
        differingNotFree.push({ pfn: -page, category: "outside guest-physical memory" });
        continue;
      }
      if (final[pfn] !== CATEGORY.free)
        notFree.push({ page, pfn, category: CATEGORY_BY_CODE[final[pfn] ?? 0] ?? "?" });
    }
    const seen = await againstLastSent(
      dst,
      block,
      sent,
      notFree.map((p) => p.page),
    );
    const qemuUnsent: { pfn: number; category: string }[] = [];
    for (const { page, pfn, category } of notFree) {
      const destination = seen.get(page);
      if (destination === true) qemuUnsent.push({ pfn, category });
      else differingNotFree.push({ pfn, category, ...(destination ? { destination } : {}) });
    }
    let finalFree = 0;
    for (const c of final) if (c === CATEGORY.free) finalFree++;
    return { differing: diff.differing.length, differingNotFree, qemuUnsent, finalFree };
  } finally {
    memory.close();
  }
}

/**
 * What the destination holds of each given differing page (RAMBlock page indices) against what the source QEMU
 * last sent for it, when a complete record says (only 7.2 sources have one, see tapOnQemu72): true for exactly
 * that (QEMU's own loss), or how it differs. Empty without a complete record.
 */
async function againstLastSent(
  dst: Vm,
  block: string,
  sent: SentPages | undefined,
  pages: number[],
): Promise<Map<number, true | string>> {
  const seen = new Map<number, true | string>();
  if (!sent?.complete || pages.length === 0) return seen;
  const file = await open(dst.ramPath, "r");
  try {
    const bytes = Buffer.alloc(PAGE_SIZE);
    for (const page of pages) {
      await file.read(bytes, 0, PAGE_SIZE, page * PAGE_SIZE);
      const last = sent.lastSent(block, page * PAGE_SIZE);
      if (sent.deliveredAsSent(block, page * PAGE_SIZE, bytes)) seen.set(page, true);
      else if (last.kind !== "bytes") seen.set(page, `QEMU's last record: ${last.kind}`);
      else
        seen.set(
          page,
          `destination holds ${bytes.every((b) => b === 0) ? "zeros" : "other bytes"}, not what QEMU last sent`,
        );
    }
  } finally {
    await file.close();
  }
  return seen;
}

/**
 * On a QEMU 7.2 source, a SentPagesTap in front of `uri` (send's listening address), so that the oracle can tell
 * QEMU's own lost pages from vmprune's; null on 10.0, whose migrations then go straight to send.
 */
export function tapOnQemu72(src: Vm, uri: string): Promise<SentPagesTap> | null {
  return src.config.qemu.version === "7.2" ? SentPagesTap.start(uri) : null;
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
  const tap = await tapOnQemu72(pair.src, send.uri);
  try {
    const migration = runMigration(pair.src.monitor, tap?.uri ?? send.uri, {
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
    return { dst, result, sent, ...(await prunedRamOracle(pair.src, dst, tap?.pages)) };
  } finally {
    await tap?.stop();
    await send.stop();
  }
}

/** How often a migration with QEMU 7.2's own loss is run again (see {@link againWhileQemuLoses}). */
export const QEMU_LOSS_ATTEMPTS = 3;

/**
 * Runs `migrate` again while QEMU lost pages of its own in it (`qemuUnsent` not empty: QEMU 7.2 under TCG never
 * sent their newer bytes, sent-pages.ts), at most `attempts` times in all. Such a destination can crash from
 * QEMU's loss alone (seen in CI: a kernel panic in __run_timers, a timer list left stale), so the guest there
 * cannot judge vmprune. The source still holds the guest whole: that destination is stopped (it holds the disks'
 * locks), the source resumed and migrated live again to a fresh destination. `each` sees every attempt, so the
 * RAM oracle's assertions hold on all of them; the last migration is returned, for the checks inside the
 * destination guest.
 */
export async function againWhileQemuLoses<M extends { qemuUnsent: unknown[]; dst: Pick<Vm, "stop"> }>(
  pair: { src: { monitor: Pick<QmpClient, "execute"> } },
  migrate: () => Promise<M>,
  each: (m: M, attempt: number) => void,
  attempts = QEMU_LOSS_ATTEMPTS,
): Promise<M> {
  for (let attempt = 1; ; attempt++) {
    const m = await migrate();
    each(m, attempt);
    if (m.qemuUnsent.length === 0 || attempt >= attempts) return m;
    // The destination took the disks' locks at the switchover: it must be gone before the source takes them back.
    await m.dst.stop();
    await pair.src.monitor.execute("cont");
  }
}
