/**
 * Opens the Linux kernel running in a guest from its physical memory alone: the entry point of introspection
 * (layers: guest-memory.ts → vmcoreinfo.ts → address-space.ts → memmap.ts).
 *
 * 1. Scan guest RAM for VMCOREINFO candidates and validate each against the memory it describes.
 * 2. Validated copies of one kernel (the ELF note and the `vmcoreinfo_data` page hold the same text) form one
 *    kernel. More than one kernel means stale copies of an earlier boot whose page tables survived (QEMU's
 *    system_reset and kexec do not clear RAM; doc §1.5). The running one is chosen by, in order:
 *    - the vCPU's CR3 when the caller has it (the kernel half of the active top-level table, entries 256..511,
 *      is the live kernel's `init_top_pgt`'s; doc §1.4 check 4);
 *    - else the memmaps: the live kernel sees every other kernel's VMCOREINFO page as free (buddy) while its own
 *      is in use. A forged kernel built in user memory cannot pass this (the live kernel sees its pages in use),
 *      so a forgery ends in "ambiguous", never in trusting the forgery.
 * 3. Decode mem_section → struct page addresses.
 */
import type { AddressSpace, PagingLevels } from "./address-space.ts";
import { hex, IntrospectError, VmcoreinfoError } from "./errors.ts";
import type { GuestMemory } from "./guest-memory.ts";
import { MemMap } from "./memmap.ts";
import {
  type ScanOptions,
  type ScanResult,
  scanForVmcoreinfo,
  type ValidatedKernel,
  VmcoreInfo,
  validateVmcoreinfo,
} from "./vmcoreinfo.ts";

export { AddressSpace, type PagingLevels } from "./address-space.ts";
export * from "./errors.ts";
export * from "./guest-memory.ts";
export { MemMap, type PfnRange } from "./memmap.ts";
export { scanForVmcoreinfo, VmcoreInfo, type VmcoreinfoCandidate, validateVmcoreinfo } from "./vmcoreinfo.ts";

export interface OpenKernelOptions {
  /** The vCPU's CR3 (e.g. from `info registers`), to pick the running kernel among stale ones. */
  cr3?: bigint;
  scan?: ScanOptions;
}

export interface RejectedCandidate {
  gpa: number;
  reason: string;
}

export interface GuestKernel {
  info: VmcoreInfo;
  addressSpace: AddressSpace;
  memmap: MemMap;
  /** `uname -r` of the guest (OSRELEASE, checked against init_uts_ns). */
  release: string;
  pagingLevels: PagingLevels;
  physBase: bigint;
  kernelOffset: bigint | undefined;
  /** Guest-physical addresses of `init_top_pgt` and `_stext`. */
  rootPa: number;
  stextPa: number;
  /** Guest-physical addresses of the live VMCOREINFO copies (note header or data page). */
  vmcoreinfoGpas: number[];
  /** `page_offset_base` (start of the direct map) if it could be derived, else null. */
  directMapBase: bigint | null;
  scan: Omit<ScanResult, "candidates" | "copies"> & { candidates: number; rejected: RejectedCandidate[] };
}

interface KernelGroup {
  kernel: ValidatedKernel;
  gpas: number[];
}

const MIB = 1024 * 1024;

/** Finds, validates and opens the running guest kernel. Throws IntrospectError subclasses only. */
export function openGuestKernel(memory: GuestMemory, options: OpenKernelOptions = {}): GuestKernel {
  const scan = scanForVmcoreinfo(memory, options.scan);
  if (scan.candidates.length === 0)
    throw new VmcoreinfoError(
      "no-vmcoreinfo",
      `no VMCOREINFO found in ${Math.round(scan.scannedBytes / MIB)} MiB of guest RAM (is this a Linux guest past early boot?)`,
    );
  const rejected: RejectedCandidate[] = [];
  const groups = new Map<string, KernelGroup>();
  scan.candidates.forEach((candidate, i) => {
    try {
      const kernel = validateVmcoreinfo(memory, VmcoreInfo.parse(candidate.text));
      const key = `${kernel.rootPa}:${kernel.stextPa}:${kernel.info.osRelease}`;
      const group = groups.get(key);
      const gpas = scan.copies[i] ?? [candidate.gpa];
      if (group) group.gpas.push(...gpas);
      else groups.set(key, { kernel, gpas: [...gpas] });
    } catch (error) {
      if (!(error instanceof IntrospectError)) throw error;
      rejected.push({ gpa: candidate.gpa, reason: error.message });
    }
  });
  if (groups.size === 0)
    throw new VmcoreinfoError(
      "unvalidated-vmcoreinfo",
      `${scan.candidates.length} VMCOREINFO candidate(s) in guest RAM, none consistent with it: ${rejected
        .slice(0, 3)
        .map((r) => `${hex(r.gpa)}: ${r.reason}`)
        .join("; ")}`,
    );
  const chosen = chooseLive([...groups.values()], memory, options.cr3, rejected);
  const { kernel, memmap } = chosen;
  for (const g of groups.values())
    if (g !== chosen.group)
      for (const gpa of g.gpas) rejected.push({ gpa, reason: "stale: a kernel that is not the running one" });
  const info = kernel.info;
  return {
    info,
    addressSpace: kernel.addressSpace,
    memmap,
    release: info.osRelease,
    pagingLevels: info.pagingLevels,
    physBase: info.physBase,
    kernelOffset: info.kernelOffset,
    rootPa: kernel.rootPa,
    stextPa: kernel.stextPa,
    vmcoreinfoGpas: chosen.group.gpas.sort((a, b) => a - b),
    directMapBase: directMapBase(kernel),
    scan: {
      scannedBytes: scan.scannedBytes,
      elapsedMs: scan.elapsedMs,
      truncated: scan.truncated,
      candidates: scan.candidates.length,
      rejected,
    },
  };
}

function chooseLive(
  groups: KernelGroup[],
  memory: GuestMemory,
  cr3: bigint | undefined,
  rejected: RejectedCandidate[],
): { group: KernelGroup; kernel: ValidatedKernel; memmap: MemMap } {
  const withMemmap = (group: KernelGroup) => ({
    group,
    kernel: group.kernel,
    memmap: MemMap.decode(group.kernel.addressSpace, group.kernel.info),
  });
  const only = groups[0];
  if (groups.length === 1 && only) return withMemmap(only);
  if (cr3 !== undefined) {
    const matching = groups.filter((g) => sameKernelHalf(memory, cr3, g.kernel.rootPa));
    const [one] = matching;
    if (matching.length === 1 && one) return withMemmap(one);
  }
  // Memmap cross-check: X is live if every other kernel's VMCOREINFO pages are free in X's view and X's are not.
  const views: { group: KernelGroup; kernel: ValidatedKernel; memmap: MemMap }[] = [];
  for (const group of groups) {
    try {
      views.push(withMemmap(group));
    } catch (error) {
      if (!(error instanceof IntrospectError)) throw error;
      for (const gpa of group.gpas) rejected.push({ gpa, reason: `memmap unusable: ${error.message}` });
    }
  }
  const live = views.filter((x) => {
    const free = (gpa: number) => x.memmap.isBuddyFree(Math.floor(gpa / 4096), x.kernel.info);
    if (x.group.gpas.some((gpa) => free(gpa) !== false)) return false;
    return views.every((y) => y === x || y.group.gpas.every((gpa) => free(gpa) === true));
  });
  const [winner] = live;
  if (live.length === 1 && winner) return winner;
  throw new VmcoreinfoError(
    "ambiguous-vmcoreinfo",
    `${groups.length} self-consistent kernels in guest RAM (${groups
      .map((g) => `${g.kernel.info.osRelease} with page tables at ${hex(g.kernel.rootPa)}`)
      .join(", ")}) and nothing shows which one runs; pass the vCPU's CR3 to choose`,
  );
}

/** Whether the top-level table at CR3 has the same kernel half (entries 256..511) as the one at rootPa. */
function sameKernelHalf(memory: GuestMemory, cr3: bigint, rootPa: number): boolean {
  // CR3: bits 12..51 are the table; the low 12 bits are PCID/flags, bit 63 no-flush. PTI user tables sit at +4 KiB.
  const table = Number(cr3 & 0x000ffffffffff000n);
  if (table === rootPa) return true;
  for (const candidate of [table, table - 4096, table + 4096]) {
    if (!memory.contains(candidate, 4096) || !memory.contains(rootPa, 4096)) continue;
    const a = memory.read(candidate + 2048, 2048);
    const b = memory.read(rootPa + 2048, 2048);
    if (a.equals(b) && a.some((x) => x !== 0)) return true;
  }
  return false;
}

/** `page_offset_base`: mem_section's root array is in the direct map, which is linear and 1 GiB aligned. */
function directMapBase(kernel: ValidatedKernel): bigint | null {
  if (!kernel.info.has("SYMBOL(mem_section)")) return null;
  const va = kernel.info.symbol("SYMBOL(mem_section)");
  const pa = kernel.addressSpace.tryTranslate(va);
  if (pa < 0) return null;
  const base = (va - BigInt(pa)) & ((1n << 64n) - 1n);
  return base % (1n << 30n) === 0n ? base : null;
}
