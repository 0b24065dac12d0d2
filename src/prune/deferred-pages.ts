/**
 * Clean cache pages whose reference waits for a better moment: copies of their PAGE records, in the order they
 * arrived, and which (block, offset) each stands for, so a later record of the same page can send it first.
 *
 * Why wait: making a reference costs send ~10 µs of CPU per page (the page's place, SHA-256), and the
 * destination's side as much again, while QEMU walks guest RAM in address order. Where a long run of cache pages
 * comes before dense ones, every reference would be made while the link has nothing to carry; held here, the
 * run costs send a copy, QEMU reaches the dense pages sooner, and the references are made while the link is busy
 * with them (pruning-processor.ts, "Deferred references").
 *
 * Memory: pages are copied into 1 MiB slabs (one allocation per 256 pages, not per page); a slab is let go once
 * every page in it has left. The caller bounds how many bytes wait ({@link DeferredPages.bytes}).
 */
import type { PageHeader } from "../stream/records.ts";

/** One waiting PAGE record: the block and offset it is for, its flags as QEMU sent them, and its bytes. */
export interface DeferredPage {
  block: string;
  addr: number;
  /** The PAGE record's flags, CONTINUE included as it came (the record goes out later with its block named). */
  flags: number;
  data: Buffer;
}

const SLAB_BYTES = 1024 * 1024;

export class DeferredPages {
  private queue: DeferredPage[] = [];
  /** queue[head] is the oldest waiting page. */
  private head = 0;
  /** Waiting pages by block, then by offset within it. */
  private readonly where = new Map<string, Set<number>>();
  private slab = Buffer.alloc(0);
  private slabUsed = 0;
  private waitingBytes = 0;

  get size(): number {
    return this.queue.length - this.head;
  }

  /** Bytes of page data waiting (what the caller bounds). */
  get bytes(): number {
    return this.waitingBytes;
  }

  /** Copies a PAGE record's bytes to wait here. */
  add(header: PageHeader, data: Buffer): void {
    if (this.slabUsed + data.length > this.slab.length) {
      this.slab = Buffer.allocUnsafe(Math.max(SLAB_BYTES, data.length));
      this.slabUsed = 0;
    }
    const copy = this.slab.subarray(this.slabUsed, this.slabUsed + data.length);
    data.copy(copy);
    this.slabUsed += data.length;
    this.queue.push({ block: header.block, addr: header.addr, flags: header.flags, data: copy });
    let offsets = this.where.get(header.block);
    if (!offsets) {
      offsets = new Set();
      this.where.set(header.block, offsets);
    }
    offsets.add(header.addr);
    this.waitingBytes += data.length;
  }

  /** Whether a page of `block` at `addr` waits here. */
  has(block: string, addr: number): boolean {
    return this.where.get(block)?.has(addr) ?? false;
  }

  /** The oldest `count` waiting pages (all of them by default), which leave. */
  take(count = this.size): DeferredPage[] {
    const n = Math.min(count, this.size);
    const taken = this.queue.slice(this.head, this.head + n);
    this.head += n;
    for (const page of taken) {
      this.where.get(page.block)?.delete(page.addr);
      this.waitingBytes -= page.data.length;
    }
    if (this.head === this.queue.length) {
      this.queue = [];
      this.head = 0;
    } else if (this.head > 4096 && this.head * 2 > this.queue.length) {
      this.queue = this.queue.slice(this.head);
      this.head = 0;
    }
    return taken;
  }
}
