/**
 * The guest kernel's own free-page counter, read from outside: Σ over nodes and zones of
 * `zone->vm_stat[NR_FREE_PAGES]` (what MemFree reports), located through VMCOREINFO's `SYMBOL(node_data)`,
 * `OFFSET(pglist_data.node_zones/nr_zones)`, `SIZE(zone)`, `OFFSET(zone.vm_stat)` and `NUMBER(NR_FREE_PAGES)`
 * (../shared/docs/linux-page-introspection.md §1.1, §4.5). The classifier's buddy pages must equal it exactly
 * on a paused guest.
 */
import type { GuestKernel } from "./kernel.ts";

/** MAX_NR_ZONES bound: no kernel has more than 8 zones per node (include/linux/mmzone.h). */
const MAX_ZONES = 8;

export function kernelFreePages(kernel: GuestKernel): number {
  const info = kernel.info;
  const as = kernel.addressSpace;
  const nodeZones = info.unsigned("OFFSET(pglist_data.node_zones)");
  const nrZonesOffset = info.unsigned("OFFSET(pglist_data.nr_zones)");
  const zoneSize = info.unsigned("SIZE(zone)");
  const vmStat = info.unsigned("OFFSET(zone.vm_stat)");
  const nrFree = info.signed("NUMBER(NR_FREE_PAGES)");
  const word = Buffer.alloc(8);
  let total = 0n;
  for (const pgdat of onlineNodes(kernel)) {
    as.readVirt(pgdat + nrZonesOffset, word, 0, 4);
    const zones = Math.min(word.readInt32LE(0), MAX_ZONES);
    for (let z = 0; z < zones; z++) {
      const counter = pgdat + nodeZones + BigInt(z) * zoneSize + vmStat + nrFree * 8n;
      total += BigInt.asIntN(64, as.readU64(counter));
    }
  }
  return Number(total);
}

/** The `pglist_data` address of every node (SYMBOL(node_data) is an array of LENGTH(node_data) pointers). */
export function onlineNodes(kernel: Pick<GuestKernel, "info" | "addressSpace">): bigint[] {
  const nodeData = kernel.info.symbol("SYMBOL(node_data)");
  const nodes = Math.min(Number(kernel.info.unsigned("LENGTH(node_data)")), 1024);
  const out: bigint[] = [];
  for (let n = 0; n < nodes; n++) {
    const pgdat = kernel.addressSpace.readU64(nodeData + BigInt(n) * 8n);
    if (pgdat !== 0n) out.push(pgdat);
  }
  return out;
}
