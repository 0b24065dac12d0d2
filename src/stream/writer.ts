/**
 * Encodes parsed records back into QEMU's wire format. For every record the parser yields, `encodeRecord`
 * produces exactly the bytes it was parsed from (parse → write is byte-identical); a changed record (a PAGE
 * turned into a ZERO, say) is encoded the way QEMU would have written it. Payloads are not copied: the result
 * is a list of buffers, headers freshly encoded and payload views as they came.
 */
import type { PageHeader, RamRecord, StreamRecord } from "./records.ts";
import { FILE_MAGIC, RAM_FLAG, VM } from "./wire.ts";

const TWO_32 = 2 ** 32;

const SECTION_TYPE_BYTES = {
  START: VM.SECTION_START,
  PART: VM.SECTION_PART,
  END: VM.SECTION_END,
  FULL: VM.SECTION_FULL,
};

function be64(buf: Buffer, at: number, value: number): number {
  buf.writeUInt32BE(Math.floor(value / TWO_32), at);
  buf.writeUInt32BE(value % TWO_32, at + 4);
  return at + 8;
}

function counted(buf: Buffer, at: number, text: string): number {
  buf[at] = text.length;
  buf.write(text, at + 1, "latin1");
  return at + 1 + text.length;
}

/** The be64 offset|flags word and, unless CONTINUE, the block's idstr. */
export function encodePageHeader(header: PageHeader, extra = 0): { buf: Buffer; end: number } {
  const buf = Buffer.allocUnsafe(pageHeaderBytes(header) + extra);
  return { buf, end: writePageHeader(header, header.flags, buf, 0) };
}

/** The bytes of a RAM record's header: the be64 offset|flags word and, unless CONTINUE, the counted idstr. */
export function pageHeaderBytes(header: PageHeader): number {
  return 8 + (header.idstr === null ? 0 : 1 + header.idstr.length);
}

/** Writes `header`, with `flags`, into `buf` at `at`; returns where the record's payload starts. */
function writePageHeader(header: PageHeader, flags: number, buf: Buffer, at: number): number {
  const end = be64(buf, at, header.addr + flags);
  return header.idstr === null ? end : counted(buf, end, header.idstr);
}

/** The bytes of the ZERO record a PAGE record with this header becomes (pageToZero): header + fill byte. */
export function zeroRecordBytes(header: PageHeader): number {
  return pageHeaderBytes(header) + 1;
}

/**
 * Writes the ZERO record that PAGE record `page` becomes (exactly encodeRecord(pageToZero(page))) into `buf` at
 * `at`, without allocating; returns the offset after it.
 */
export function writeZeroRecord(page: Extract<RamRecord, { type: "page" }>, buf: Buffer, at: number): number {
  const flags = (page.header.flags & ~RAM_FLAG.PAGE) | RAM_FLAG.ZERO;
  const end = writePageHeader(page.header, flags, buf, at);
  buf[end] = 0;
  return end + 1;
}

function encodeRam(r: RamRecord): Buffer[] {
  switch (r.type) {
    case "page":
      return [encodePageHeader(r.header).buf, r.data];
    case "zero": {
      const { buf, end } = encodePageHeader(r.header, 1);
      buf[end] = r.fill;
      return [buf];
    }
    case "xbzrle": {
      const { buf, end } = encodePageHeader(r.header, 3);
      buf[end] = r.encoding;
      buf.writeUInt16BE(r.data.length, end + 1);
      return [buf, r.data];
    }
    case "compress": {
      const { buf, end } = encodePageHeader(r.header, 4);
      buf.writeUInt32BE(r.data.length, end);
      return [buf, r.data];
    }
    case "memSize": {
      let size = 8;
      for (const b of r.blocks)
        size += 1 + b.idstr.length + 8 + (b.pageSize === undefined ? 0 : 8) + (b.addr === undefined ? 0 : 8);
      const buf = Buffer.allocUnsafe(size);
      let at = be64(buf, 0, r.total + r.flags);
      for (const b of r.blocks) {
        at = counted(buf, at, b.idstr);
        at = be64(buf, at, b.length);
        if (b.pageSize !== undefined) at = be64(buf, at, b.pageSize);
        if (b.addr !== undefined) at = be64(buf, at, b.addr);
      }
      return [buf];
    }
    case "eos":
    case "multifdFlush": {
      const buf = Buffer.allocUnsafe(8);
      be64(buf, 0, r.value);
      return [buf];
    }
  }
}

/** The wire bytes of one record. */
export function encodeRecord(r: StreamRecord): Buffer[] {
  switch (r.kind) {
    case "header": {
      const buf = Buffer.allocUnsafe(8);
      buf.writeUInt32BE(FILE_MAGIC, 0);
      buf.writeUInt32BE(r.version, 4);
      return [buf];
    }
    case "configuration": {
      const parts: Buffer[] = [];
      const head = Buffer.allocUnsafe(5 + r.machineType.length);
      head[0] = VM.CONFIGURATION;
      head.writeUInt32BE(r.machineType.length, 1);
      head.write(r.machineType, 5, "latin1");
      parts.push(head);
      for (const s of r.subsections) {
        const sub = Buffer.allocUnsafe(2 + s.name.length + 4);
        sub[0] = VM.SUBSECTION;
        const at = counted(sub, 1, s.name);
        sub.writeUInt32BE(s.version, at);
        parts.push(sub);
        if (s.name === "configuration/target-page-bits") {
          const b = Buffer.allocUnsafe(4);
          b.writeUInt32BE(s.bits, 0);
          parts.push(b);
        } else if (s.name === "configuration/capabilities") {
          const b = Buffer.allocUnsafe(4 + s.capabilities.reduce((n, c) => n + 1 + c.length, 0));
          b.writeUInt32BE(s.capabilities.length, 0);
          let at2 = 4;
          for (const c of s.capabilities) at2 = counted(b, at2, c);
          parts.push(b);
        } else {
          parts.push(s.uuid);
        }
      }
      return parts;
    }
    case "command": {
      const head = Buffer.allocUnsafe(5);
      head[0] = VM.COMMAND;
      head.writeUInt16BE(r.cmd, 1);
      head.writeUInt16BE(r.payload.length, 3);
      return r.packaged ? [head, r.payload, r.packaged] : [head, r.payload];
    }
    case "section": {
      const named = r.type === "START" || r.type === "FULL";
      const buf = Buffer.allocUnsafe(5 + (named ? 1 + (r.idstr ?? "").length + 8 : 0));
      buf[0] = SECTION_TYPE_BYTES[r.type];
      buf.writeUInt32BE(r.sectionId, 1);
      if (named) {
        const at = counted(buf, 5, r.idstr ?? "");
        buf.writeUInt32BE(r.instanceId ?? 0, at);
        buf.writeUInt32BE(r.versionId ?? 0, at + 4);
      }
      return [buf];
    }
    case "footer": {
      const buf = Buffer.allocUnsafe(5);
      buf[0] = VM.SECTION_FOOTER;
      buf.writeUInt32BE(r.sectionId, 1);
      return [buf];
    }
    case "ram":
      return encodeRam(r);
    case "eof":
      return [Buffer.from([VM.EOF])];
    case "vmdesc": {
      const head = Buffer.allocUnsafe(5);
      head[0] = VM.VMDESCRIPTION;
      head.writeUInt32BE(r.json.length, 1);
      return [head, r.json];
    }
    case "raw":
      return [r.bytes];
  }
}

/** A PAGE record re-encoded as a ZERO record for the same page: same block, offset and CONTINUE state. */
export function pageToZero(r: Extract<RamRecord, { type: "page" }>): Extract<RamRecord, { type: "zero" }> {
  const flags = (r.header.flags & ~RAM_FLAG.PAGE) | RAM_FLAG.ZERO;
  return { kind: "ram", type: "zero", offset: r.offset, header: { ...r.header, flags }, fill: 0 };
}
