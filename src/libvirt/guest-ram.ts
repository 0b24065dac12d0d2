/**
 * Where a libvirt domain's guest RAM can be read from, asked of QEMU itself (QMP `qom-get` on each RAM block's
 * memory backend, QEMU's backends/hostmem-file.c and hostmem.c): a memory-backend-file mapped with `share=on`
 * is read from its file; anything else (anonymous, memfd, hugepages without a path vmprune can open) from the
 * QEMU process (/proc/PID/mem). A file-backed block *without* `share=on` is the trap: QEMU maps it MAP_PRIVATE,
 * so its writes stay in QEMU's private copy and the file holds the bytes of boot time: classifying from it would
 * judge a past state of the guest. Such a block is reported as `private-file`, and the caller refuses it.
 */
import { discoverQemuLayout } from "../introspect/guest-memory.ts";
import type { QmpClient } from "../qemu/qmp.ts";

/** Mappings at least this large are guest RAM; ROM blocks are at most a few MiB (introspect/live-vm.ts). */
const MIN_RAM_BYTES = 16 * 1024 * 1024;

export type RamBlockSource =
  | { block: string; sizeBytes: number; kind: "shared-file"; memPath: string }
  | { block: string; sizeBytes: number; kind: "private-file"; memPath: string }
  | { block: string; sizeBytes: number; kind: "process" };

/** A QOM property of /objects/<id>, or undefined when the object or property does not exist. */
async function qomGet(qmp: QmpClient, id: string, property: string): Promise<unknown> {
  try {
    return await qmp.executeUntyped("qom-get", { path: `/objects/${id}`, property });
  } catch {
    return undefined;
  }
}

/** How each guest RAM block (from `info mtree -f`) is backed, by QEMU's own account. */
export async function ramBlockSources(qmp: QmpClient): Promise<RamBlockSource[]> {
  const layout = await discoverQemuLayout((commandLine) => qmp.hmp(commandLine));
  const sizes = new Map<string, number>();
  for (const m of layout) sizes.set(m.block, (sizes.get(m.block) ?? 0) + m.size);
  const sources: RamBlockSource[] = [];
  for (const [block, sizeBytes] of sizes) {
    if (sizeBytes < MIN_RAM_BYTES) continue;
    const memPath = await qomGet(qmp, block, "mem-path");
    if (typeof memPath !== "string" || memPath === "") {
      sources.push({ block, sizeBytes, kind: "process" });
      continue;
    }
    // `share` is a property of every host memory backend (backends/hostmem.c), false unless share=on.
    const share = await qomGet(qmp, block, "share");
    sources.push({ block, sizeBytes, kind: share === true ? "shared-file" : "private-file", memPath });
  }
  return sources;
}

/** "pc.ram: file /path (share=on)" for logs and reports. */
export function describeRamSource(source: RamBlockSource): string {
  const mib = `${Math.round(source.sizeBytes / 1024 / 1024)} MiB`;
  if (source.kind === "process") return `${source.block} (${mib}): QEMU process memory (/proc/PID/mem)`;
  return `${source.block} (${mib}): file ${source.memPath} (share=${source.kind === "shared-file" ? "on" : "off"})`;
}
