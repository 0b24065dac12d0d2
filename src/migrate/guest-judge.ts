/**
 * Opens what `vmprune send --drop free` needs before the migration starts: a way to read the source guest's RAM
 * and a judge over it. From the source QEMU's QMP socket (its RAM layout, its memory-backend files or its
 * process memory; and its migration capabilities, to refuse xbzrle), or from a RAM file alone (offset = guest-
 * physical address). A RAM file does not say which RAMBlock it holds, and page records name their block: the
 * judge learns it from the block list at the head of the stream (rawFileLayout). Anything that keeps
 * introspection from working is not an error: it is the reason the migration runs as a plain passthrough
 * (invariant 4). Only xbzrle, which would make pruning unsafe, refuses.
 */
import type { GuestMemory } from "../introspect/guest-memory.ts";
import { openRawSnapshot } from "../introspect/guest-memory.ts";
import { describeSources, openLiveVmMemory } from "../introspect/live-vm.ts";
import {
  IntrospectionJudge,
  type PageJudge,
  type RamBlock,
  type RamLayoutSource,
  SnapshotJudge,
} from "../prune/page-judge.ts";
import type { QmpClient } from "../qemu/qmp.ts";

export interface GuestJudgeOptions {
  /** The source QEMU's monitor (preferred: layout, RAM files or process memory, capability check). */
  qmp?: { client: QmpClient; path: string; pid?: number };
  /**
   * A RAM file whose offsets are guest-physical addresses. It holds RAMBlock `ramBlock`, or else the one block of
   * the stream's block list exactly as large as the file. `chooseBlockHint` tells the refusal how the caller's
   * user names the block (a CLI's option); default "the ramBlock option".
   */
  guestMemory?: { path: string; ramBlock?: string; chooseBlockHint?: string };
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

/**
 * Below this length a RAMBlock of guest RAM lies wholly below 4 GiB, at guest-physical address = block offset, on
 * both x86 machine types: q35 splits RAM around the PCI hole from 0xb0000000 bytes on (at 2 GiB), pc from
 * 0xe0000000 on (at 3 GiB) (hw/i386/pc_q35.c, pc_piix.c; `max-ram-below-4g` can lower both). A larger block's
 * upper part sits above 4 GiB: in its RAM file, offsets are then no longer guest-physical addresses.
 */
export const RAM_BELOW_4G_MAX_BYTES = 0xb0000000;

/** Exact sizes, so that a block can be compared with a file: "512 MiB", "128 KiB", "4100 bytes". */
function formatSize(bytes: number): string {
  for (const [unit, size] of [
    ["GiB", 2 ** 30],
    ["MiB", 2 ** 20],
    ["KiB", 2 ** 10],
  ] as const)
    if (bytes >= size && bytes % size === 0) return `${bytes / size} ${unit}`;
  return `${bytes} bytes`;
}

function describeBlocks(blocks: readonly RamBlock[]): string {
  return blocks.length > 0
    ? blocks.map((b) => `'${b.idstr}' (${formatSize(b.length)})`).join(", ")
    : "no RAM block at all";
}

/**
 * The layout of a RAM file whose offsets are guest-physical addresses, from the stream's block list: the block
 * `ramBlock`, or else the one block exactly as large as the file, at guest-physical address 0. What cannot be
 * told for sure is refused with a sentence that names the blocks: no block of the file's size, several, a named
 * block the stream lacks, a block larger than the file, or one large enough to be split around the PCI hole.
 */
export function rawFileLayout(file: {
  path: string;
  sizeBytes: number;
  ramBlock?: string;
  chooseBlockHint?: string;
  log?: (line: string) => void;
}): RamLayoutSource {
  const choose = `name the block the file holds (${file.chooseBlockHint ?? "the ramBlock option"})`;
  const what = `the guest-memory file ${file.path} (${formatSize(file.sizeBytes)})`;
  return (blocks) => {
    const sends = `this migration sends ${describeBlocks(blocks)}`;
    let block: RamBlock | undefined;
    if (file.ramBlock !== undefined) {
      block = blocks.find((b) => b.idstr === file.ramBlock);
      if (!block)
        return `${what} is to hold RAM block '${file.ramBlock}', but ${sends}: ${choose} from these`;
    } else {
      const sameSize = blocks.filter((b) => b.length === file.sizeBytes);
      if (sameSize.length !== 1)
        return sameSize.length === 0
          ? `no RAM block is as large as ${what}, so which one it holds is not known (${sends}): ${choose}`
          : `${sameSize.length} RAM blocks are as large as ${what}, so which one it holds is not known (${sends}): ${choose}`;
      block = sameSize[0] as RamBlock;
    }
    if (block.length > file.sizeBytes)
      return `RAM block '${block.idstr}' (${formatSize(block.length)}) is larger than ${what}: the file does not hold all of it (${sends}): ${choose}`;
    if (block.length >= RAM_BELOW_4G_MAX_BYTES)
      return (
        `RAM block '${block.idstr}' (${formatSize(block.length)}) may be split around the PCI hole below 4 GiB ` +
        "(q35 splits RAM of 2.75 GiB and more, pc RAM of 3.5 GiB and more), so the " +
        `offsets of ${what} are not all guest-physical addresses: read guest memory through the source QEMU's ` +
        "QMP socket instead, which knows the layout"
      );
    file.log?.(`${what} holds RAM block '${block.idstr}', at guest-physical address 0`);
    return [{ gpa: 0, size: block.length, block: block.idstr, blockOffset: 0 }];
  };
}

export async function openGuestJudge(options: GuestJudgeOptions): Promise<OpenedJudge> {
  const log = options.log ?? (() => undefined);
  if (options.qmp) await assertNoXbzrle(options.qmp.client);
  let memory: GuestMemory | undefined;
  let layout: RamLayoutSource;
  try {
    if (options.qmp) {
      const live = await openLiveVmMemory(options.qmp.client, options.qmp.path, options.qmp.pid);
      memory = live.memory;
      layout = live.layout;
      log(`guest RAM: ${describeSources(live.sources)}`);
    } else if (options.guestMemory) {
      memory = openRawSnapshot(options.guestMemory.path);
      // Which block the file holds is told by the stream's block list, when it arrives.
      layout = rawFileLayout({ ...options.guestMemory, sizeBytes: memory.size, log });
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
