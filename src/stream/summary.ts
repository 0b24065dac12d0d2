/**
 * What a migration stream contains, counted record by record: the `vmprune stream inspect` report and the
 * relay's record counts. Feed it the parser's records; it keeps no payloads.
 */
import { createHash, type Hash } from "node:crypto";
import { StreamParser } from "./parser.ts";
import type { StreamRecord } from "./records.ts";
import type { SectionType } from "./wire.ts";

export interface RamRecordCounts {
  page: number;
  zero: number;
  xbzrle: number;
  compress: number;
  eos: number;
  memSize: number;
  multifdFlush: number;
}

export interface StreamSummaryJson {
  version: number | null;
  machineType: string | null;
  bytes: number;
  sha256: string;
  sections: { type: SectionType; id: number; idstr: string | null; offset: number }[];
  commands: { name: string; offset: number; length: number }[];
  ram: {
    blocks: { id: string; length: number }[];
    totalBytes: number;
    records: RamRecordCounts;
    zeroPayloadPages: number;
    /** Bytes of RAM records (headers and payloads) in the stream. */
    wireBytes: number;
    /** Bytes of XBZRLE records (headers and deltas). */
    xbzrleWireBytes: number;
  };
  eof: boolean;
  vmdescBytes: number | null;
  passthroughFrom: number | null;
  passthroughReason: string | null;
  error: { code: string; offset: number; message: string } | null;
}

export class StreamSummary {
  bytes = 0;
  readonly sections: StreamSummaryJson["sections"] = [];
  readonly commands: StreamSummaryJson["commands"] = [];
  readonly records: RamRecordCounts = {
    page: 0,
    zero: 0,
    xbzrle: 0,
    compress: 0,
    eos: 0,
    memSize: 0,
    multifdFlush: 0,
  };
  zeroPayloadPages = 0;
  ramWireBytes = 0;
  xbzrleWireBytes = 0;
  totalBytes = 0;
  vmdescBytes: number | null = null;
  private readonly hash: Hash | null;
  private readonly zeroPage: Buffer;
  private lastRamOffset = -1;

  constructor(options: { sha256?: boolean; pageSize?: number } = {}) {
    this.hash = options.sha256 === false ? null : createHash("sha256");
    this.zeroPage = Buffer.alloc(options.pageSize ?? 4096);
  }

  /** Counts the raw bytes (size, hash) of a chunk as it came. */
  chunk(bytes: Buffer): void {
    this.bytes += bytes.length;
    this.hash?.update(bytes);
  }

  record(r: StreamRecord): void {
    switch (r.kind) {
      case "section":
        this.sections.push({ type: r.type, id: r.sectionId, idstr: r.idstr, offset: r.offset });
        break;
      case "command":
        this.commands.push({ name: r.name, offset: r.offset, length: r.payload.length });
        break;
      case "vmdesc":
        this.vmdescBytes = r.json.length;
        break;
      case "ram": {
        this.records[r.type]++;
        if (r.type === "page" && r.data.equals(this.zeroPage)) this.zeroPayloadPages++;
        if (r.type === "memSize") this.totalBytes = r.total;
        if (r.type === "xbzrle")
          this.xbzrleWireBytes +=
            8 + (r.header.idstr === null ? 0 : 1 + r.header.idstr.length) + 3 + r.data.length;
        break;
      }
    }
    // RAM wire bytes: from each RAM record to the next record of any kind.
    if (this.lastRamOffset >= 0) this.ramWireBytes += r.offset - this.lastRamOffset;
    this.lastRamOffset = r.kind === "ram" ? r.offset : -1;
  }

  toJSON(parser: StreamParser): StreamSummaryJson {
    return {
      version: parser.version,
      machineType: parser.machineType,
      bytes: this.bytes,
      sha256: this.hash ? this.hash.copy().digest("hex") : "",
      sections: this.sections,
      commands: this.commands,
      ram: {
        blocks: [...parser.blocks.values()].map((b) => ({ id: b.idstr, length: b.length })),
        totalBytes: this.totalBytes,
        records: { ...this.records },
        zeroPayloadPages: this.zeroPayloadPages,
        wireBytes: this.ramWireBytes,
        xbzrleWireBytes: this.xbzrleWireBytes,
      },
      eof: parser.sawEof,
      vmdescBytes: this.vmdescBytes,
      passthroughFrom: parser.passthroughFrom,
      passthroughReason: parser.passthroughReason,
      error: parser.error
        ? { code: parser.error.code, offset: parser.error.offset, message: parser.error.message }
        : null,
    };
  }
}

/** Parses a whole stream from an async source of chunks into its summary (errors recorded, not thrown). */
export async function summarizeStream(source: AsyncIterable<Buffer>): Promise<StreamSummaryJson> {
  const parser = new StreamParser({ onError: "passthrough" });
  const summary = new StreamSummary();
  for await (const chunk of source) {
    summary.chunk(chunk);
    for (const r of parser.push(chunk)) summary.record(r);
  }
  for (const r of parser.end()) summary.record(r);
  return summary.toJSON(parser);
}
