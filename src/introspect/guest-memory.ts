/**
 * Guest-physical memory, read from outside the guest. QEMU keeps guest RAM in RAMBlocks (a memory-backend file
 * for the lab's "ram0"); the guest sees them through its memory map, where one block may appear in pieces: on
 * pc/q35 machines RAM is split around the PCI hole, so GPA 4 GiB continues at block offset `below4g` (q35: 2 GiB
 * once RAM ≥ 2.75 GiB; ../shared/docs/linux-page-introspection.md §1.5). `info mtree -f` (the flat view of
 * address space "memory") gives each piece as `start-end (prio p, ram): block @offset`; `gpa2hva` gives the host
 * address of a GPA inside QEMU, so a VM without a shared memory file is read through /proc/PID/mem.
 *
 * Three sources share one implementation (sorted segments GPA → positional reads of a file descriptor):
 *   - memory-backend files with a layout (position = RAMBlock offset),
 *   - raw snapshots (a file where position = GPA, or a copy of a RAM file with its layout),
 *   - /proc/PID/mem of QEMU (position = host virtual address).
 * All reads are positional (`fs.readSync` at an offset) into caller buffers; nothing reads a whole file.
 * This module does not talk to QEMU: `discoverQemuLayout` takes a function that runs an HMP command.
 */
import { closeSync, fstatSync, openSync, readSync } from "node:fs";
import { GuestMemoryError, hex } from "./errors.ts";

/** A range of guest-physical addresses, [gpa, gpa + size). */
export interface GpaRange {
  gpa: number;
  size: number;
}

/** One piece of guest RAM in QEMU's memory map: GPA range → offset in a RAMBlock. */
export interface RamMapping extends GpaRange {
  /** RAMBlock (memory region) name, e.g. "ram0", "pc.ram", "dimm0". */
  block: string;
  /** Offset of `gpa` inside the block: the offset of the backing file, and of migration-stream RAM records. */
  blockOffset: number;
  /** Host virtual address of `gpa` in the QEMU process (from gpa2hva), when known. */
  hva?: number;
}

export interface GuestMemory {
  /** Readable guest-physical ranges, sorted, not overlapping. */
  readonly ranges: readonly GpaRange[];
  /** Total readable bytes. */
  readonly size: number;
  /** One past the highest readable guest-physical address. */
  readonly end: number;
  /** Whether [gpa, gpa+length) is entirely readable. */
  contains(gpa: number, length: number): boolean;
  /** Reads [gpa, gpa+length) into `into` at `offset`; throws GuestMemoryError on an unmapped byte. */
  readInto(gpa: number, into: Uint8Array, offset?: number, length?: number): void;
  /** A fresh buffer with [gpa, gpa+length); for small reads (hot paths use readInto with a reused buffer). */
  read(gpa: number, length: number): Buffer;
  close(): void;
}

/** Largest allocation `read()` makes on a caller's behalf (guest-provided sizes must not allocate unboundedly). */
export const MAX_READ_BYTES = 64 * 1024 * 1024;

interface Segment {
  gpa: number;
  size: number;
  fd: number;
  /** Position of `gpa` in the file descriptor. */
  position: number;
  label: string;
}

/** Reads from byte sources (file descriptors, or a buffer in tests) mapped at guest-physical ranges. */
class SegmentedMemory implements GuestMemory {
  readonly ranges: readonly GpaRange[];
  readonly size: number;
  readonly end: number;
  private readonly starts: number[];
  private last = 0;
  private closed = false;

  constructor(
    private readonly segments: Segment[],
    private readonly fds: number[],
    private readonly describe: string,
    private readonly pread: (
      fd: number,
      into: Uint8Array,
      offset: number,
      length: number,
      pos: number,
    ) => number,
  ) {
    segments.sort((a, b) => a.gpa - b.gpa);
    for (let i = 1; i < segments.length; i++) {
      const prev = segments[i - 1] as Segment;
      const cur = segments[i] as Segment;
      if (prev.gpa + prev.size > cur.gpa)
        throw new GuestMemoryError(
          "bad-layout",
          `${describe}: RAM ranges overlap at GPA ${hex(cur.gpa)} (${prev.label}, ${cur.label})`,
        );
    }
    this.starts = segments.map((s) => s.gpa);
    this.ranges = segments.map((s) => ({ gpa: s.gpa, size: s.size }));
    this.size = segments.reduce((sum, s) => sum + s.size, 0);
    const top = segments.at(-1);
    this.end = top ? top.gpa + top.size : 0;
  }

  /** Index of the segment holding `gpa`, or -1. */
  private find(gpa: number): number {
    const hint = this.segments[this.last];
    if (hint && gpa >= hint.gpa && gpa < hint.gpa + hint.size) return this.last;
    let lo = 0;
    let hi = this.starts.length - 1;
    while (lo <= hi) {
      const mid = (lo + hi) >>> 1;
      if ((this.starts[mid] as number) <= gpa) lo = mid + 1;
      else hi = mid - 1;
    }
    const seg = this.segments[hi];
    if (!seg || gpa >= seg.gpa + seg.size) return -1;
    this.last = hi;
    return hi;
  }

  contains(gpa: number, length: number): boolean {
    if (!Number.isSafeInteger(gpa) || gpa < 0 || !Number.isSafeInteger(length) || length < 0) return false;
    let at = gpa;
    const stop = gpa + length;
    while (at < stop) {
      const i = this.find(at);
      if (i < 0) return false;
      const seg = this.segments[i] as Segment;
      at = seg.gpa + seg.size;
    }
    return true;
  }

  readInto(gpa: number, into: Uint8Array, offset = 0, length = into.length - offset): void {
    if (this.closed) throw new GuestMemoryError("read-failed", `${this.describe}: already closed`, gpa);
    if (!Number.isSafeInteger(gpa) || gpa < 0 || length < 0 || offset < 0 || offset + length > into.length)
      throw new GuestMemoryError(
        "unmapped-gpa",
        `${this.describe}: bad read of ${length} bytes at ${gpa}`,
        gpa,
      );
    let done = 0;
    while (done < length) {
      const at = gpa + done;
      const i = this.find(at);
      if (i < 0)
        throw new GuestMemoryError(
          "unmapped-gpa",
          `${this.describe}: guest-physical address ${hex(at)} is not RAM`,
          at,
        );
      const seg = this.segments[i] as Segment;
      const n = Math.min(length - done, seg.gpa + seg.size - at);
      let got = 0;
      while (got < n) {
        let r: number;
        try {
          r = this.pread(seg.fd, into, offset + done + got, n - got, seg.position + (at - seg.gpa) + got);
        } catch (error) {
          throw new GuestMemoryError(
            "read-failed",
            `${this.describe}: reading GPA ${hex(at + got)} (${seg.label}) failed: ${(error as Error).message}`,
            at + got,
          );
        }
        if (r <= 0)
          throw new GuestMemoryError(
            "read-failed",
            `${this.describe}: GPA ${hex(at + got)} (${seg.label}) is past the end of its backing`,
            at + got,
          );
        got += r;
      }
      done += n;
    }
  }

  read(gpa: number, length: number): Buffer {
    if (!Number.isSafeInteger(length) || length < 0 || length > MAX_READ_BYTES)
      throw new GuestMemoryError("read-failed", `${this.describe}: refusing a ${length}-byte read`, gpa);
    const buf = Buffer.allocUnsafe(length);
    this.readInto(gpa, buf, 0, length);
    return buf;
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    for (const fd of this.fds) closeSync(fd);
  }
}

const fdRead = (fd: number, into: Uint8Array, offset: number, length: number, pos: number): number =>
  readSync(fd, into, offset, length, pos);

/**
 * Guest RAM from memory-backend files (`-object memory-backend-file,id=ram0,mem-path=…`), one per RAMBlock
 * name, placed at the GPAs `layout` gives. Mappings of blocks without a file are not readable.
 */
export function openMemoryFiles(
  files: Readonly<Record<string, string>>,
  layout: readonly RamMapping[],
): GuestMemory {
  const fds: number[] = [];
  try {
    const opened = new Map<string, { fd: number; size: number; path: string }>();
    for (const [block, path] of Object.entries(files)) {
      const fd = openSync(path, "r");
      fds.push(fd);
      opened.set(block, { fd, size: fstatSync(fd).size, path });
    }
    const segments: Segment[] = [];
    for (const m of layout) {
      const file = opened.get(m.block);
      if (!file) continue;
      if (m.blockOffset + m.size > file.size)
        throw new GuestMemoryError(
          "bad-layout",
          `${file.path}: ${m.size} bytes at block offset ${hex(m.blockOffset)} (GPA ${hex(m.gpa)}) exceed the file (${file.size} bytes); is this the RAM file of block ${m.block}?`,
        );
      segments.push({ gpa: m.gpa, size: m.size, fd: file.fd, position: m.blockOffset, label: m.block });
    }
    if (segments.length === 0)
      throw new GuestMemoryError(
        "bad-layout",
        `no RAM mapping of block(s) ${Object.keys(files).join(", ")} in the memory map`,
      );
    return new SegmentedMemory(segments, fds, `guest RAM (${Object.values(files).join(", ")})`, fdRead);
  } catch (error) {
    for (const fd of fds) closeSync(fd);
    throw error;
  }
}

/** Guest RAM from one memory-backend file of block `block` (default the lab's "ram0"). */
export function openMemoryFile(path: string, layout: readonly RamMapping[], block = "ram0"): GuestMemory {
  return openMemoryFiles({ [block]: path }, layout);
}

/**
 * A raw RAM snapshot. Without a layout the file is flat guest-physical memory (offset = GPA, as `pmemsave 0
 * <size>` writes it, or a RAM file of a guest whose RAM is not split); with a layout it is a copy of a RAMBlock
 * file (offset = block offset).
 */
export function openRawSnapshot(path: string, layout?: readonly RamMapping[], block = "ram0"): GuestMemory {
  if (layout) return openMemoryFile(path, layout, block);
  const fd = openSync(path, "r");
  const size = fstatSync(fd).size;
  return new SegmentedMemory(
    [{ gpa: 0, size, fd, position: 0, label: "snapshot" }],
    [fd],
    `RAM snapshot ${path}`,
    fdRead,
  );
}

/**
 * Guest RAM read from the QEMU process itself (/proc/PID/mem at the host addresses gpa2hva reported): works for
 * any RAM backend, needs ptrace access to the process (same user; root, or its parent under Yama scope 1).
 */
export function openProcessMemory(pid: number, layout: readonly RamMapping[]): GuestMemory {
  const segments: Segment[] = [];
  const path = `/proc/${pid}/mem`;
  const fd = openSync(path, "r");
  for (const m of layout) {
    if (m.hva === undefined) continue;
    segments.push({ gpa: m.gpa, size: m.size, fd, position: m.hva, label: `${m.block}@${hex(m.hva)}` });
  }
  if (segments.length === 0) {
    closeSync(fd);
    throw new GuestMemoryError("bad-layout", `${path}: no RAM mapping with a host address (run gpa2hva)`);
  }
  return new SegmentedMemory(segments, [fd], `QEMU process ${pid} memory`, fdRead);
}

/** Guest memory held in a buffer (tests, small snapshots): offset in `buf` = GPA unless `layout` says otherwise. */
export function bufferMemory(buf: Uint8Array, layout?: readonly RamMapping[]): GuestMemory {
  const mappings = layout ?? [{ gpa: 0, size: buf.length, block: "buffer", blockOffset: 0 }];
  const segments = mappings.map((m) => {
    if (m.blockOffset + m.size > buf.length)
      throw new GuestMemoryError("bad-layout", `buffer memory: mapping at ${hex(m.gpa)} exceeds the buffer`);
    return { gpa: m.gpa, size: m.size, fd: 0, position: m.blockOffset, label: m.block };
  });
  return new SegmentedMemory(segments, [], "buffer memory", (_fd, into, offset, length, pos) => {
    const n = Math.max(0, Math.min(length, buf.length - pos));
    into.set(buf.subarray(pos, pos + n), offset);
    return n;
  });
}

// ---------------------------------------------------------------------------------------------------------
// QEMU's memory map

/** Region kinds that are guest RAM backed by a RAMBlock (QEMU memory_region_type(): "ram", "rom"). */
const RAM_KINDS = new Set(["ram", "rom"]);
/** A flat-view line: `  0000000100000000-000000019fffffff (prio 0, ram): ram0 @0000000080000000 …`. */
const FLAT_LINE =
  /^\s*([0-9a-f]{1,16})-([0-9a-f]{1,16}) \(prio -?\d+, (?:nv-)?([a-z/]+)\): (\S+)(?: @([0-9a-f]{1,16}))?/;

function parseHex(text: string, what: string): number {
  const value = BigInt(`0x${text}`);
  if (value > BigInt(Number.MAX_SAFE_INTEGER))
    throw new GuestMemoryError("bad-layout", `info mtree -f: ${what} ${text} is beyond 2^53`);
  return Number(value);
}

/**
 * RAM pieces of address space "memory" from `info mtree -f` output (QEMU's flat views), sorted by GPA, with
 * adjacent pieces of one block merged (the BIOS shadow below 1 MiB appears as alternating ram/rom pieces).
 */
export function parseMtreeFlat(text: string): RamMapping[] {
  const views = text.split(/^FlatView #\d+$/m);
  const view = views.find((v) => /^\s*AS "memory"/m.test(v));
  if (!view)
    throw new GuestMemoryError("bad-layout", `info mtree -f: no flat view of address space "memory"`);
  const out: RamMapping[] = [];
  for (const line of view.split("\n")) {
    const m = FLAT_LINE.exec(line);
    if (!m?.[1] || !m[2] || !m[3] || !m[4] || !RAM_KINDS.has(m[3])) continue;
    const gpa = parseHex(m[1], "start");
    const last = parseHex(m[2], "end");
    if (last < gpa)
      throw new GuestMemoryError("bad-layout", `info mtree -f: empty range in "${line.trim()}"`);
    const mapping: RamMapping = {
      gpa,
      size: last - gpa + 1,
      block: m[4],
      blockOffset: m[5] ? parseHex(m[5], "offset") : 0,
    };
    const prev = out.at(-1);
    if (
      prev &&
      prev.block === mapping.block &&
      prev.gpa + prev.size === mapping.gpa &&
      prev.blockOffset + prev.size === mapping.blockOffset
    )
      prev.size += mapping.size;
    else out.push(mapping);
  }
  out.sort((a, b) => a.gpa - b.gpa);
  if (out.length === 0)
    throw new GuestMemoryError("bad-layout", "info mtree -f: no RAM in address space memory");
  return out;
}

/** `gpa2hva` answer: "Host virtual address for 0x1000 (ram0) is 0x7f8d2c000000". */
export function parseGpa2hva(text: string): number | undefined {
  const m = /Host virtual address for 0x[0-9a-f]+ \(.*\) is 0x([0-9a-f]+)/i.exec(text);
  return m?.[1] ? parseHex(m[1], "host address") : undefined;
}

/** Runs one HMP command (e.g. through QMP `human-monitor-command`) and returns its output. */
export type HmpRunner = (commandLine: string) => Promise<string>;

/**
 * The guest's RAM layout from a running (or paused) QEMU: `info mtree -f` for GPA ↔ RAMBlock offset, then
 * `gpa2hva` at the start of each piece for the host address (needed only by openProcessMemory).
 */
export async function discoverQemuLayout(hmp: HmpRunner): Promise<RamMapping[]> {
  const layout = parseMtreeFlat(await hmp("info mtree -f"));
  for (const m of layout) {
    const hva = parseGpa2hva(await hmp(`gpa2hva ${hex(m.gpa)}`));
    if (hva !== undefined) m.hva = hva;
  }
  return layout;
}

/** The GPA of an offset in a RAMBlock (inverse of the layout), or null if the block offset is not mapped. */
export function blockOffsetToGpa(
  layout: readonly RamMapping[],
  block: string,
  blockOffset: number,
): number | null {
  for (const m of layout)
    if (m.block === block && blockOffset >= m.blockOffset && blockOffset < m.blockOffset + m.size)
      return m.gpa + (blockOffset - m.blockOffset);
  return null;
}

/** The RAMBlock and offset holding a GPA, or null if the GPA is not RAM. */
export function gpaToBlockOffset(
  layout: readonly RamMapping[],
  gpa: number,
): { block: string; blockOffset: number } | null {
  for (const m of layout)
    if (gpa >= m.gpa && gpa < m.gpa + m.size)
      return { block: m.block, blockOffset: m.blockOffset + (gpa - m.gpa) };
  return null;
}
