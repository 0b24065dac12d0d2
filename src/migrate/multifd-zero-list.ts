/**
 * Whether pruned multifd pages may go in a packet's zero list: only if the destination QEMU reads that list
 * (9.0+, `multifd_recv_zero_page_process`, multifd-zero-page.c@v10.0.2:84-95). A 7.2 destination reads the
 * field as unused (multifd.h@v7.2.0:47): a page moved there would keep whatever bytes it held before.
 *
 * send cannot ask the destination, so the source stands for it: a source QEMU of 9.0 or later whose
 * zero-page-detection is "multifd" (the default for 9.0+ machine types, options.c@v10.0.2:177-179) already puts its
 * own zero pages in that list and leaves them out of the stream otherwise, so the migration completes correctly
 * only with a destination that reads the list: its format with zero pages needs a 9.0+ destination. A 9.0+ source
 * with "legacy" or "none" (machine types up to 8.2 get "legacy" through hw_compat_8_2) may be migrating to an older
 * destination, and a source before 9.0 certainly may: no pruning on multifd channels then.
 */
import type { QmpClient } from "../qemu/qmp.ts";

/** The first QEMU whose multifd packets carry a zero-page list (qemu-migration-stream.md §11, "9.0"). */
export const ZERO_LIST_SINCE = { major: 9, minor: 0 } as const;

/** True, or why the destination may not read multifd zero lists (a sentence for the report). */
export async function multifdZeroListVerdict(qmp: QmpClient | undefined): Promise<true | string> {
  if (!qmp)
    return "the source QEMU's version is unknown (no QMP socket): a destination before 9.0 would not read the zero-page list";
  const { major, minor, micro } = (await qmp.execute("query-version")).qemu;
  const version = `${major}.${minor}.${micro}`;
  if (major < ZERO_LIST_SINCE.major)
    return `the source QEMU is ${version}: its multifd packets have no zero-page list, and a destination of its kind would ignore one (a pruned page would keep stale bytes there)`;
  const parameters = (await qmp.executeUntyped("query-migrate-parameters")) as {
    "zero-page-detection"?: string;
  };
  const detection = parameters["zero-page-detection"];
  if (detection !== "multifd")
    return `the source QEMU ${version} has zero-page-detection '${detection ?? "?"}', not 'multifd': its destination may be older than 9.0 and not read the zero-page list`;
  return true;
}
