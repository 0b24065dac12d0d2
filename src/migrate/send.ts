/**
 * The sending side of one migration, as `vmprune send` and `vmprune migrate` run it: a relay whose main channel
 * goes through the pruning processor (with `drop`) or the counting passthrough (without). Guest introspection is
 * opened before the relay listens, so the first record is judged like the last.
 */
import type { Category } from "../introspect/classifier.ts";
import { type PruneReport, PruningProcessor } from "../prune/pruning-processor.ts";
import { CountingProcessor } from "../stream/counting-processor.ts";
import { Relay, type RelayReport } from "../stream/relay.ts";
import type { StreamSummaryJson } from "../stream/summary.ts";
import { type GuestJudgeOptions, openGuestJudge } from "./guest-judge.ts";

/** Categories `send` can drop on its own (a plain QEMU destination rebuilds nothing). */
export const DROPPABLE_WITHOUT_RECEIVER: readonly Category[] = ["free"];

export interface SendOptions {
  listen: { host: string; port: number };
  to: { host: string; port: number };
  /** Categories to drop; empty or absent: passthrough. */
  drop?: readonly Category[];
  dryRun?: boolean;
  guest?: Omit<GuestJudgeOptions, "log">;
  capturePath?: string;
  log?: (line: string) => void;
}

export interface SendReport {
  relay: RelayReport;
  /** What the source sent on the main channel (null if no main channel was accepted). */
  stream: StreamSummaryJson | null;
  /** Pruning decisions and savings (null without --drop). */
  prune: PruneReport | null;
}

export interface RunningSend {
  relay: Relay;
  address: { host: string; port: number };
  done: Promise<SendReport>;
  /** Pruning so far (for progress), null before the main channel or without --drop. */
  pruneSoFar(): PruneReport | null;
}

export async function startSend(options: SendOptions): Promise<RunningSend> {
  const log = options.log ?? (() => undefined);
  const drop = options.drop ?? [];
  for (const category of drop)
    if (!DROPPABLE_WITHOUT_RECEIVER.includes(category))
      throw new Error(
        `--drop ${category}: a plain QEMU destination cannot rebuild ${category} pages; only ${DROPPABLE_WITHOUT_RECEIVER.join(", ")} can be dropped here`,
      );
  const opened = drop.length > 0 ? await openGuestJudge({ ...options.guest, log }) : null;
  let pruner: PruningProcessor | undefined;
  let counter: CountingProcessor | undefined;
  let relay: Relay;
  try {
    relay = await Relay.start({
      listen: options.listen,
      to: options.to,
      createMainProcessor: () => {
        if (opened) {
          pruner = new PruningProcessor(opened.judge, { drop, dryRun: options.dryRun ?? false, log });
          return pruner;
        }
        counter = new CountingProcessor();
        return counter;
      },
      ...(options.capturePath ? { capturePath: options.capturePath } : {}),
      log,
    });
  } catch (error) {
    opened?.close();
    throw error;
  }
  const done = relay.done.then((report) => {
    opened?.close();
    return {
      relay: report,
      stream: pruner?.stream() ?? counter?.report() ?? null,
      prune: pruner?.report() ?? null,
    };
  });
  return { relay, address: relay.address, done, pruneSoFar: () => pruner?.report() ?? null };
}
