/**
 * The records of QEMU's main migration channel as the parser yields them. Byte payloads (`data`, `payload`,
 * `bytes`) are views into the parser's input, not copies: use them before the input buffer is reused.
 * Every record carries what the writer needs to re-emit it byte for byte.
 */
import type { SectionType } from "./wire.ts";

interface At {
  /** Offset of the record's first byte in the stream. */
  offset: number;
}

export interface HeaderRecord extends At {
  kind: "header";
  version: number;
}

export type ConfigSubsection =
  | { name: "configuration/target-page-bits"; version: number; bits: number }
  | { name: "configuration/capabilities"; version: number; capabilities: string[] }
  | { name: "configuration/uuid"; version: number; uuid: Buffer };

export interface ConfigurationRecord extends At {
  kind: "configuration";
  /** Latin-1 decoding of the raw name bytes (round-trips exactly). */
  machineType: string;
  subsections: ConfigSubsection[];
}

export interface CommandRecord extends At {
  kind: "command";
  cmd: number;
  name: string;
  payload: Buffer;
  /** PACKAGED only: the nested stream (LISTEN, device sections, RUN) that follows the be32 length, unparsed. */
  packaged?: Buffer;
}

export interface SectionRecord extends At {
  kind: "section";
  type: SectionType;
  sectionId: number;
  /** START and FULL carry the handler's idstr, instance and version; PART and END only the id. */
  idstr: string | null;
  instanceId: number | null;
  versionId: number | null;
}

export interface FooterRecord extends At {
  kind: "footer";
  sectionId: number;
}

/** What every RAM page record starts with: the page offset in its RAMBlock, the flags, and the block. */
export interface PageHeader {
  /** Byte offset within the RAMBlock (the be64's high bits). */
  addr: number;
  /** The be64's low (target page size - 1) bits, CONTINUE included. */
  flags: number;
  /** The idstr as sent; null when CONTINUE (same block as the previous record on this channel). */
  idstr: string | null;
  /** The block the record applies to (resolved through CONTINUE). */
  block: string;
}

export interface RamBlockEntry {
  idstr: string;
  length: number;
  /** Present iff postcopy was advised and the block's page size differs from the host's (ram.c@v7.2.0:3235-3237). */
  pageSize?: number;
  /** Present iff x-ignore-shared is on (ram.c@v7.2.0:3240): the block's guest-physical address. */
  addr?: number;
}

export type RamRecord =
  | (At & { kind: "ram"; type: "page"; header: PageHeader; data: Buffer })
  | (At & { kind: "ram"; type: "zero"; header: PageHeader; fill: number })
  | (At & { kind: "ram"; type: "xbzrle"; header: PageHeader; encoding: number; data: Buffer })
  | (At & { kind: "ram"; type: "compress"; header: PageHeader; data: Buffer })
  | (At & { kind: "ram"; type: "memSize"; total: number; flags: number; blocks: RamBlockEntry[] })
  | (At & { kind: "ram"; type: "eos"; value: number })
  | (At & { kind: "ram"; type: "multifdFlush"; value: number });

export interface EofRecord extends At {
  kind: "eof";
}

export interface VmdescRecord extends At {
  kind: "vmdesc";
  json: Buffer;
}

/** Bytes the parser did not interpret (after it switched to passthrough). */
export interface RawRecord extends At {
  kind: "raw";
  bytes: Buffer;
}

export type StreamRecord =
  | HeaderRecord
  | ConfigurationRecord
  | CommandRecord
  | SectionRecord
  | FooterRecord
  | RamRecord
  | EofRecord
  | VmdescRecord
  | RawRecord;
