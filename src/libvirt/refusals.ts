/**
 * When vmprune must not prune a libvirt migration, and why: the stream would be unreadable (QEMU's own TLS),
 * out of reach (libvirt's tunnel), built on page contents pruning changes (xbzrle), compressed (mt), in a mode the relay has not been proven on (postcopy), or judged from
 * stale bytes (a file-backed RAM block without share=on). Each refusal names the way out. Pure functions of
 * what the caller gathered (virsh flags, QEMU's capabilities and parameters, RAM sources, the domain XML).
 */
import type { DomainDescription } from "./domain-xml.ts";
import type { RamBlockSource } from "./guest-ram.ts";

export interface PruneRefusal {
  /** What was found ("--tls", "xbzrle capability on", "pc.ram file without share=on"). */
  cause: string;
  reason: string;
  wayOut: string;
}

const WITHOUT_DROP = "or migrate without --drop (vmprune then relays every byte unchanged)";

/** virsh migrate options (virsh's `migrate --help`, libvirt 9.0) that make pruning impossible or unsafe. */
export function refusalsForVirshOptions(args: readonly string[]): PruneRefusal[] {
  const refusals: PruneRefusal[] = [];
  const has = (flag: string) => args.includes(flag);
  const compMethodsAt = args.indexOf("--comp-methods");
  const compMethods = compMethodsAt >= 0 ? (args[compMethodsAt + 1] ?? "").split(",") : [];
  if (has("--tls"))
    refusals.push({
      cause: "--tls",
      reason:
        "QEMU encrypts the migration stream itself (tls-creds): vmprune would relay ciphertext it cannot parse",
      wayOut: `leave out --tls: the link between vmprune send and receive is TLS 1.3 already (--link-key or --tls-creds), ${WITHOUT_DROP}`,
    });
  if (has("--tunnelled"))
    refusals.push({
      cause: "--tunnelled",
      reason:
        "libvirt carries the stream inside its own RPC connection: there is no socket for vmprune to sit on (libvirt 9.0 also rejects --migrateuri with it)",
      wayOut: "leave out --tunnelled (vmprune's link is encrypted)",
    });
  if (has("--compressed") || compMethods.includes("xbzrle"))
    refusals.push({
      cause: has("--compressed") ? "--compressed" : "--comp-methods xbzrle",
      reason:
        "xbzrle sends deltas against the page contents QEMU believes the destination holds; a page vmprune zeroed would be patched into garbage",
      wayOut: `leave out --compressed / xbzrle, ${WITHOUT_DROP}`,
    });
  if (compMethods.includes("mt"))
    refusals.push({
      cause: "--comp-methods mt",
      reason: "multithread compression sends pages compressed: vmprune cannot see which page a record holds",
      wayOut: `leave out --comp-methods mt, ${WITHOUT_DROP}`,
    });
  if (has("--postcopy") || has("--postcopy-after-precopy") || has("--timeout-postcopy"))
    refusals.push({
      cause: "--postcopy",
      reason:
        "in postcopy the destination runs the guest and pulls pages on demand, with the device state packaged inside the stream: vmprune's relay has not been proven on that path",
      wayOut: `leave out --postcopy, ${WITHOUT_DROP}`,
    });
  return refusals;
}

/**
 * What may run unpruned: with multifd (virsh --parallel, or the capability) every page travels on the parallel
 * channels, whose free pages send prunes only for a destination that reads a packet's zero list (a source QEMU
 * 9.0+ with zero-page-detection 'multifd': migrate/multifd-zero-list.ts) and only on uncompressed channels. Said
 * once, so an operator knows why little may be saved; send's report says per channel what happened.
 */
export function unprunedNotes(
  args: readonly string[],
  capabilities: readonly { capability: string; state: boolean }[],
): string[] {
  const multifd =
    args.includes("--parallel") || capabilities.some((c) => c.capability === "multifd" && c.state);
  return multifd
    ? [
        "multifd (--parallel): the pages travel on the parallel channels; uncompressed, their free pages are pruned when the source QEMU is 9.0+ with zero-page-detection 'multifd' (moved to the packets' zero lists) or the link goes to vmprune receive (which writes zeros in their place), and their clean cache pages go as references through receive; otherwise vmprune relays them unpruned (send's report says why a channel was not pruned)",
      ]
    : [];
}

/** QEMU's migration state before libvirt starts (an operator may have set capabilities by hand). */
export function refusalsForQemuState(
  capabilities: readonly { capability: string; state: boolean }[],
  parameters: { "tls-creds"?: string },
): PruneRefusal[] {
  const on = new Set(capabilities.filter((c) => c.state).map((c) => c.capability));
  const refusals: PruneRefusal[] = [];
  if (on.has("xbzrle"))
    refusals.push({
      cause: "xbzrle capability on",
      reason: "xbzrle deltas build on page contents vmprune would have zeroed",
      wayOut: `turn it off (virsh qemu-monitor-command DOMAIN '{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"xbzrle","state":false}]}}'), ${WITHOUT_DROP}`,
    });
  if (on.has("postcopy-ram"))
    refusals.push({
      cause: "postcopy-ram capability on",
      reason: "postcopy has not been proven through vmprune's relay",
      wayOut: `turn the capability off, ${WITHOUT_DROP}`,
    });
  if (parameters["tls-creds"])
    refusals.push({
      cause: `tls-creds ${parameters["tls-creds"]}`,
      reason: "QEMU encrypts the migration stream itself",
      wayOut: `clear tls-creds, ${WITHOUT_DROP}`,
    });
  return refusals;
}

/**
 * A RAM block in a file QEMU maps without share=on: the file holds stale bytes. The way out names the domain XML
 * elements that make it shared (formatdomain.rst "Memory Backing", "NUMA Node Tuning").
 */
export function refusalsForRam(
  sources: readonly RamBlockSource[],
  domain: DomainDescription,
  allowProcessMemory: boolean,
): PruneRefusal[] {
  if (allowProcessMemory) return [];
  return sources
    .filter((s) => s.kind === "private-file")
    .map((s) => ({
      cause: `${s.block} in ${"memPath" in s ? s.memPath : "a file"} without share=on`,
      reason:
        "QEMU maps that file privately (MAP_PRIVATE): the guest's writes never reach it, so it holds stale bytes and would be judged as a past state of the guest",
      wayOut:
        domain.ram.cells.length > 0
          ? `set memAccess='shared' on each <cpu><numa><cell> (or <memoryBacking><access mode='shared'/>) in domain ${domain.name} and restart it; or give --ram-from-process to read guest RAM from the QEMU process (/proc/PID/mem) instead; ${WITHOUT_DROP}`
          : `in domain ${domain.name}'s XML (virsh edit), make the file backing shared: <memoryBacking><source type='file'/><access mode='shared'/></memoryBacking>, then restart the domain; or give --ram-from-process to read guest RAM from the QEMU process (/proc/PID/mem) instead; ${WITHOUT_DROP}`,
    }));
}

/** One message for all refusals: what was found, why it blocks pruning, the way out. */
export function describeRefusals(refusals: readonly PruneRefusal[]): string {
  return refusals.map((r) => `${r.cause}: ${r.reason}. Way out: ${r.wayOut}.`).join("\n");
}
