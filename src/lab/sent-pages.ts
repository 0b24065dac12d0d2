/**
 * What the source QEMU last sent for each page, for the RAM-compare oracle on QEMU 7.2.
 *
 * QEMU 7.2 under TCG loses dirty pages on its own (ram-oracle.test.ts: 1 to 458 pages stale in each of 5 plain
 * migrations, 1 vCPU, none on 10.0): a page the guest (or only its kernel) wrote after QEMU last sent it is never
 * sent again. On 7.2 a pruning oracle therefore cannot blame every differing page on vmprune. This tap sits
 * between the source QEMU and vmprune send, passes every byte on unchanged in both directions, and keeps a
 * SHA-1 of the last record QEMU sent for each page of the main channel. A differing page whose destination bytes
 * are exactly what QEMU last sent was delivered faithfully: vmprune did not drop or alter it (a dropped page
 * arrives as zeros), and QEMU never sent the newer bytes. Every other differing page stays vmprune's to explain.
 *
 * The tap is the project's relay (stream/relay.ts) with SentPages as its main-channel processor, which forwards
 * every chunk as it came. Only the main channel is recorded. Multifd channels are passed on but not parsed, so
 * once one connects the record is incomplete (`complete` false) and exonerates nothing.
 */
import { hash } from "node:crypto";
import { tcpAddress } from "../qemu/migration.ts";
import { StreamParser } from "../stream/parser.ts";
import type { StreamRecord } from "../stream/records.ts";
import { type MainChannelProcessor, Relay } from "../stream/relay.ts";

/** The lab guests' target page size (x86: TARGET_PAGE_BITS 12), the unit of every RAM record. */
const PAGE_SIZE = 4096;
/** SHA-1's digest size. */
const DIGEST_BYTES = 20;

/** The last record QEMU sent for one page, as the bytes it leaves on the destination. */
type LastSent = { kind: "none" } | { kind: "other" } | { kind: "bytes"; sha1: Buffer };

/** Per RAM block: for each page, 0 nothing sent, 1 a record this tap cannot replay (XBZRLE, compressed), 2 bytes. */
class BlockRecord {
  readonly state: Uint8Array;
  readonly digests: Buffer;

  constructor(pages: number) {
    this.state = new Uint8Array(pages);
    this.digests = Buffer.alloc(pages * DIGEST_BYTES);
  }
}

function sha1(bytes: Buffer): Buffer {
  return hash("sha1", bytes, "buffer");
}

/** Digests of a page filled with one byte value (what a ZERO record's fill byte leaves), by that value. */
const filledDigests = new Map<number, Buffer>();
function filledPageDigest(fill: number): Buffer {
  let digest = filledDigests.get(fill);
  if (!digest) {
    digest = sha1(Buffer.alloc(PAGE_SIZE, fill));
    filledDigests.set(fill, digest);
  }
  return digest;
}

export class SentPages implements MainChannelProcessor {
  private readonly blocks = new Map<string, BlockRecord>();
  private readonly parser = new StreamParser({ onError: "passthrough" });
  private ramSectionId: number | null = null;
  /** QEMU sent the RAM section's END: its last RAM records (what follows is device state, left unparsed). */
  private ramEnded = false;
  /** Connections after the main channel (multifd), whose pages this record does not hold. */
  otherChannels = 0;

  /** True when the record holds the whole migration: the main channel parsed to its RAM END, no multifd channel. */
  get complete(): boolean {
    return this.otherChannels === 0 && this.ramEnded && this.parser.error === null;
  }

  /** Why the record is not complete, for the oracle's diagnostics (null when it is). */
  get incompleteBecause(): string | null {
    if (this.otherChannels > 0) return `${this.otherChannels} multifd channel(s) not recorded`;
    if (this.parser.error) return `the main channel did not parse: ${this.parser.error.message}`;
    if (!this.ramEnded) return "the main channel did not reach the RAM section's END";
    return null;
  }

  /** The last record QEMU sent for the page at `offset` (bytes) of RAM block `block`. */
  lastSent(block: string, offset: number): LastSent {
    const record = this.blocks.get(block);
    const page = offset / PAGE_SIZE;
    const state = record?.state[page] ?? 0;
    if (!record || state === 0) return { kind: "none" };
    if (state === 1) return { kind: "other" };
    return { kind: "bytes", sha1: record.digests.subarray(page * DIGEST_BYTES, (page + 1) * DIGEST_BYTES) };
  }

  /** Whether `bytes` (a destination page) are exactly what QEMU last sent for that page. */
  deliveredAsSent(block: string, offset: number, bytes: Buffer): boolean {
    const last = this.lastSent(block, offset);
    return last.kind === "bytes" && last.sha1.equals(sha1(bytes));
  }

  /** The relay's main-channel processor: records the chunk's RAM records and forwards it as it came. */
  push(chunk: Buffer): Buffer[] {
    this.record(this.parser.push(chunk));
    return [chunk];
  }

  end(): Buffer[] {
    this.record(this.parser.end());
    return [];
  }

  private record(records: StreamRecord[]): void {
    for (const r of records) {
      if (r.kind === "section" && r.idstr === "ram" && r.type === "START") this.ramSectionId = r.sectionId;
      if (r.kind === "section" && r.type === "END" && r.sectionId === this.ramSectionId) this.ramEnded = true;
      if (r.kind !== "ram") continue;
      switch (r.type) {
        case "memSize":
          for (const b of r.blocks)
            this.blocks.set(b.idstr, new BlockRecord(Math.ceil(b.length / PAGE_SIZE)));
          break;
        case "page":
          this.set(r.header.block, r.header.addr, r.data.length === PAGE_SIZE ? sha1(r.data) : null);
          break;
        case "zero":
          this.set(r.header.block, r.header.addr, filledPageDigest(r.fill));
          break;
        case "xbzrle":
        case "compress":
          this.set(r.header.block, r.header.addr, null);
          break;
      }
    }
  }

  /** The page's last record: bytes whose digest is `digest`, or (null) a record this tap cannot replay. */
  private set(blockId: string, offset: number, digest: Buffer | null): void {
    const block = this.blocks.get(blockId);
    const page = offset / PAGE_SIZE;
    if (!block || page >= block.state.length) return;
    block.state[page] = digest ? 2 : 1;
    digest?.copy(block.digests, page * DIGEST_BYTES);
  }
}

/**
 * A tap on 127.0.0.1 (any free port) that relays every connection to `to` (tcp:HOST:PORT) and records the main
 * channel in `pages`. Point the source QEMU's `migrate` at `uri`.
 */
export class SentPagesTap {
  private constructor(
    private readonly relay: Relay,
    readonly pages: SentPages,
  ) {}

  static async start(to: string): Promise<SentPagesTap> {
    const pages = new SentPages();
    const relay = await Relay.start({
      listen: { host: "127.0.0.1", port: 0 },
      to: tcpAddress(to),
      createMainProcessor: () => pages,
      createChannelProcessor: () => {
        pages.otherChannels++;
        return { push: (chunk) => [chunk], end: () => [] };
      },
    });
    return new SentPagesTap(relay, pages);
  }

  get uri(): string {
    return `tcp:127.0.0.1:${this.relay.address.port}`;
  }

  stop(): Promise<void> {
    return this.relay.close();
  }
}
