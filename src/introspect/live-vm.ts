/**
 * Guest memory of a running QEMU reached through its QMP socket: the RAM layout from `info mtree -f`; each RAM
 * block read from its memory-backend file when QEMU has one mapped with share=on (`qom-get /objects/<id>
 * mem-path`, `share`), otherwise from the QEMU process (/proc/PID/mem at the host addresses gpa2hva reports).
 * The PID is the process that owns the QMP socket, found through /proc unless given.
 */
import { existsSync, readdirSync, readFileSync, readlinkSync, statSync } from "node:fs";
import type { QmpClient } from "../qemu/qmp.ts";
import {
  discoverQemuLayout,
  type GuestMemory,
  openMemoryFiles,
  openProcessMemory,
  type RamMapping,
} from "./guest-memory.ts";

/** The PID of the process listening on a unix socket path (matched by the socket's inode in /proc/net/unix). */
export function pidOfUnixSocket(path: string): number | null {
  const lines = readFileSync("/proc/net/unix", "utf8").split("\n");
  const inodes = new Set<string>();
  for (const line of lines) {
    const fields = line.trim().split(/\s+/);
    if (fields[7] === path && fields[6]) inodes.add(fields[6]);
  }
  if (inodes.size === 0) return null;
  for (const entry of readdirSync("/proc")) {
    if (!/^\d+$/.test(entry)) continue;
    let fds: string[];
    try {
      fds = readdirSync(`/proc/${entry}/fd`);
    } catch {
      continue;
    }
    for (const fd of fds) {
      try {
        const m = /^socket:\[(\d+)\]$/.exec(readlinkSync(`/proc/${entry}/fd/${fd}`));
        if (m?.[1] && inodes.has(m[1])) return Number(entry);
      } catch {
        // fd closed meanwhile
      }
    }
  }
  return null;
}

/** Mappings at least this large are guest RAM (ROM blocks are at most a few MiB). */
const MIN_RAM_BYTES = 16 * 1024 * 1024;

export interface LiveVmMemory {
  memory: GuestMemory;
  /** How each block is read: a file path, or "process <pid>". */
  sources: Record<string, string>;
  /** QEMU's RAM layout: which RAMBlock offset is which guest-physical address. */
  layout: RamMapping[];
}

export async function openLiveVmMemory(qmp: QmpClient, qmpPath: string, pid?: number): Promise<LiveVmMemory> {
  const layout = await discoverQemuLayout((commandLine) => qmp.hmp(commandLine));
  const files: Record<string, string> = {};
  for (const block of new Set(layout.map((m) => m.block))) {
    try {
      const path = await qmp.executeUntyped("qom-get", { path: `/objects/${block}`, property: "mem-path" });
      // A file mapped without share=on holds stale bytes (QEMU's writes stay in its private copy): never judge
      // from it; such a block is read from the process like anonymous RAM (backends/hostmem.c `share`).
      const shared = await qmp.executeUntyped("qom-get", { path: `/objects/${block}`, property: "share" });
      if (shared === true && typeof path === "string" && existsSync(path) && statSync(path).isFile())
        files[block] = path;
    } catch {
      // not a memory-backend-file: read it from the process
    }
  }
  // Firmware and option ROM blocks (small, never guest RAM) need no file; RAM without one is read from QEMU.
  const unfiledRam = layout.filter((m) => !(m.block in files) && m.size >= MIN_RAM_BYTES);
  if (unfiledRam.length === 0 && Object.keys(files).length > 0)
    return { memory: openMemoryFiles(files, layout), sources: files, layout };
  const owner = pid ?? pidOfUnixSocket(qmpPath);
  if (owner === null) throw new Error(`cannot find the QEMU process behind ${qmpPath}: give its PID (--pid)`);
  return {
    memory: openProcessMemory(owner, layout),
    sources: Object.fromEntries(layout.map((m) => [m.block, files[m.block] ?? `process ${owner}`])),
    layout,
  };
}

/** "ram0 from /dev/shm/..., dimm0 from process 1234": for logs. */
export function describeSources(sources: Record<string, string>): string {
  return Object.entries(sources)
    .map(([block, source]) => `${block} from ${source}`)
    .join(", ");
}
