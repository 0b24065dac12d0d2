/**
 * Incremental parser of QEMU's main migration channel (QEMU 7.2 to 10.x; grammar in
 * ../shared/docs/qemu-migration-stream.md §3-4). Feed it chunks of any size with `push`; it returns the records
 * completed by each chunk. Records are views into the input (a record that straddles chunks is assembled in a
 * small buffer of its own, so only straddling records are copied).
 *
 * It interprets the header, configuration, commands (PACKAGED's nested stream is carried unparsed), section
 * headers and footers, and the "ram" section's records, with the block state (CONTINUE) that persists across
 * sections. At the first section it does not interpret (normally the first device FULL section, after RAM has
 * ended; or an iterable other than "ram") it switches to passthrough: it yields that section's header, then
 * every later byte as raw records, and records where passthrough began (`passthroughFrom`).
 *
 * Malformed input raises a `StreamError` naming the offset; with `onError: "passthrough"` the parser instead
 * records the error and passes the rest through raw (what a relay needs: the bytes may still be valid for QEMU).
 * Lengths are validated before anything is allocated, so garbage cannot make it allocate more than one record.
 */
import { Cursor, NeedMore } from "./cursor.ts";
import { StreamError } from "./errors.ts";
import type {
  ConfigSubsection,
  PageHeader,
  RamBlockEntry,
  RamRecord,
  SectionRecord,
  StreamRecord,
} from "./records.ts";
import {
  CMD_PACKAGED,
  CMD_POSTCOPY_ADVISE,
  COMMANDS,
  CONFIG_SUBSECTIONS,
  DEFAULT_TARGET_PAGE_BITS,
  FILE_MAGIC,
  FILE_VERSION,
  LIMITS,
  MAX_COMPRESSED_PAGE,
  MAX_PACKAGED_SIZE,
  RAM_FLAG,
  RAM_IDSTR,
  RAM_SECTION_VERSION,
  SECTION_TYPE_NAMES,
  VM,
  XBZRLE_ENCODING_FLAG,
} from "./wire.ts";

const TWO_32 = 2 ** 32;
/** The largest be64 high half for which hi * 2^32 + lo is still an exact JavaScript number. */
const MAX_SAFE_HI = 2 ** 21 - 1;

type State = "header" | "top" | "ram" | "ramFooter" | "afterEof" | "done" | "passthrough";

export interface ParserOptions {
  /** "throw" (default): malformed input throws StreamError. "passthrough": record it, relay the rest raw. */
  onError?: "throw" | "passthrough";
}

interface Parsed {
  records: StreamRecord[];
  /** Bytes consumed; 0 only when the parser changed state without consuming (then it parses again). */
  consumed: number;
}

export class StreamParser {
  /** Offset in the stream of the next byte not yet consumed by a complete record. */
  offset = 0;
  /** Offset where passthrough began (the first section or field not interpreted), or null. */
  passthroughFrom: number | null = null;
  passthroughReason: string | null = null;
  /** The malformation that stopped parsing (onError "passthrough"), or null. */
  error: StreamError | null = null;
  /** RAM blocks announced by MEM_SIZE, by idstr. */
  readonly blocks = new Map<string, RamBlockEntry>();
  machineType: string | null = null;
  version: number | null = null;
  sawEof = false;

  private state: State = "header";
  private readonly onError: "throw" | "passthrough";
  private pending: { buf: Buffer; len: number } | null = null;
  private needed = 0;
  private anyRecordAfterHeader = false;
  private ramSectionId: number | null = null;
  private currentSectionId = 0;
  private lastBlock: RamBlockEntry | null = null;
  private pageBytes = 2 ** DEFAULT_TARGET_PAGE_BITS;
  private ignoreShared = false;
  private advisedHugePages = false;

  constructor(options: ParserOptions = {}) {
    this.onError = options.onError ?? "throw";
  }

  /** The target page size (2^target-page-bits), kept as a field: it is read for every RAM record. */
  get pageSize(): number {
    return this.pageBytes;
  }

  get passingThrough(): boolean {
    return this.state === "passthrough";
  }

  /** Parses as much as the chunk completes; returns the completed records in stream order. */
  push(chunk: Buffer): StreamRecord[] {
    const out: StreamRecord[] = [];
    let pos = 0;
    while (this.pending) {
      // Complete the straddling record in its own buffer, taking from the chunk only what it still needs.
      const pending = this.pending;
      const want = this.needed - pending.len;
      if (want > 0) {
        const n = Math.min(want, chunk.length - pos);
        this.append(chunk.subarray(pos, pos + n));
        pos += n;
        if (pending.len < this.needed) return out;
      }
      const view = pending.buf.subarray(0, pending.len);
      const before = this.offset;
      const step = this.step(view, 0, out, chunk.subarray(pos));
      if (step === "need") continue;
      this.pending = null;
      if (step === "raw") return out;
      const consumed = this.offset - before;
      if (consumed < view.length) {
        // The record was shorter than a peek had asked for: the rest starts the next record.
        const left = Buffer.from(view.subarray(consumed));
        this.pending = { buf: left, len: left.length };
        this.needed = left.length;
      }
    }
    while (pos < chunk.length) {
      if (this.state === "passthrough") {
        out.push({ kind: "raw", offset: this.offset, bytes: chunk.subarray(pos) });
        this.offset += chunk.length - pos;
        return out;
      }
      if (this.state === "ram") {
        const consumed = this.continuedPages(chunk, pos, out);
        pos += consumed;
        if (consumed > 0) continue;
        // Most chunks end inside a continued PAGE record whose header is already here: wait for the rest of it
        // without the general path, which would find out by throwing (once per chunk, a third of the parser's
        // time in a live migration's profile).
        const needed = this.straddlingPageBytes(chunk, pos);
        if (needed > 0) {
          this.needed = needed;
          this.hold(chunk.subarray(pos));
          return out;
        }
      }
      const before = this.offset;
      const step = this.step(chunk, pos, out, Buffer.alloc(0));
      if (step === "raw") return out;
      if (step === "need") {
        this.hold(chunk.subarray(pos));
        return out;
      }
      pos += this.offset - before;
    }
    return out;
  }

  /** The input ended. Throws (or records) a truncation if a record or the stream is incomplete. */
  end(): StreamRecord[] {
    if (this.state === "passthrough" || this.state === "afterEof" || this.state === "done") return [];
    const where = this.pending
      ? `a record of at least ${this.needed} bytes is incomplete`
      : "the stream ended before QEMU_VM_EOF";
    const error = new StreamError("truncated", this.offset, where);
    const raw = this.pending ? this.pending.buf.subarray(0, this.pending.len) : Buffer.alloc(0);
    this.pending = null;
    return this.fail(error, raw, Buffer.alloc(0));
  }

  /** Starts a record that straddles the chunk's end: `rest` waits until `needed` bytes of it are here. */
  private hold(rest: Buffer): void {
    this.pending = { buf: Buffer.allocUnsafe(Math.max(this.needed, 64)), len: 0 };
    this.append(rest);
  }

  /**
   * The length of the continued PAGE record at `p` if its header is complete here but its page is not (what
   * continuedPageAt would parse once it is), else 0: anything else takes the general path.
   */
  private straddlingPageBytes(buf: Buffer, p: number): number {
    if (buf.length - p >= 8 + this.pageSize || this.continuedAddrAt(buf, p) < 0) return 0;
    return this.continuedFlags === (RAM_FLAG.PAGE | RAM_FLAG.CONTINUE) ? 8 + this.pageSize : 0;
  }

  private append(bytes: Buffer): void {
    const pending = this.pending as { buf: Buffer; len: number };
    if (pending.len + bytes.length > pending.buf.length) {
      const grown = Buffer.allocUnsafe(Math.max(pending.len + bytes.length, pending.buf.length * 2));
      pending.buf.copy(grown, 0, 0, pending.len);
      pending.buf = grown;
    }
    bytes.copy(pending.buf, pending.len);
    pending.len += bytes.length;
  }

  /**
   * Parses one record of `buf` at `start`. Returns "ok" (records pushed, offset advanced), "need" (this.needed
   * set), or "raw" (the parser switched to passthrough; `buf` from `start` and then `rest` were pushed raw).
   */
  private step(buf: Buffer, start: number, out: StreamRecord[], rest: Buffer): "ok" | "need" | "raw" {
    for (;;) {
      let parsed: Parsed;
      try {
        parsed = this.parseOne(new Cursor(buf, start));
      } catch (e) {
        if (e instanceof NeedMore) {
          this.needed = e.bytesFromStart;
          return "need";
        }
        if (e instanceof StreamError) {
          for (const r of this.fail(e, buf.subarray(start), rest)) out.push(r);
          return "raw";
        }
        throw e;
      }
      for (const r of parsed.records) out.push(r);
      this.offset += parsed.consumed;
      if (this.state === "passthrough") {
        const tail = buf.subarray(start + parsed.consumed);
        if (tail.length) out.push({ kind: "raw", offset: this.offset, bytes: tail });
        this.offset += tail.length;
        if (rest.length) out.push({ kind: "raw", offset: this.offset, bytes: rest });
        this.offset += rest.length;
        return "raw";
      }
      if (parsed.consumed > 0) return "ok";
    }
  }

  private fail(error: StreamError, here: Buffer, rest: Buffer): StreamRecord[] {
    this.error = error;
    if (this.onError === "throw") throw error;
    this.state = "passthrough";
    this.passthroughFrom = this.offset;
    this.passthroughReason = error.message;
    const out: StreamRecord[] = [];
    if (here.length) out.push({ kind: "raw", offset: this.offset, bytes: here });
    this.offset += here.length;
    if (rest.length) out.push({ kind: "raw", offset: this.offset, bytes: rest });
    this.offset += rest.length;
    return out;
  }

  private startPassthrough(at: number, reason: string): void {
    this.state = "passthrough";
    this.passthroughFrom = at;
    this.passthroughReason = reason;
  }

  private parseOne(cur: Cursor): Parsed {
    switch (this.state) {
      case "header":
        return this.parseHeader(cur);
      case "top":
        return this.parseTop(cur);
      case "ram":
        return { records: [this.parseRam(cur)], consumed: cur.pos - cur.start };
      case "ramFooter":
        return this.parseFooter(cur);
      case "afterEof":
        return this.parseVmdesc(cur);
      case "done":
        throw new StreamError("trailing-bytes", this.offset, "bytes after the stream's end (EOF and vmdesc)");
      case "passthrough":
        throw new Error("unreachable: passthrough is handled by push");
    }
  }

  private parseHeader(cur: Cursor): Parsed {
    const magic = cur.be32();
    if (magic !== FILE_MAGIC)
      throw new StreamError(
        "bad-magic",
        this.offset,
        `not a QEMU migration stream: magic 0x${magic.toString(16).padStart(8, "0")}, expected 0x5145564d ("QEVM")`,
      );
    const version = cur.be32();
    if (version !== FILE_VERSION)
      throw new StreamError("bad-version", this.offset + 4, `stream version ${version}, only 3 is supported`);
    this.version = version;
    this.state = "top";
    return { records: [{ kind: "header", offset: this.offset, version }], consumed: 8 };
  }

  private parseTop(cur: Cursor): Parsed {
    const at = this.offset;
    const type = cur.u8();
    const first = !this.anyRecordAfterHeader;
    switch (type) {
      case VM.CONFIGURATION: {
        if (!first)
          throw new StreamError(
            "unknown-section-type",
            at,
            "a configuration section after the stream's start",
          );
        return this.parseConfiguration(cur, at);
      }
      case VM.COMMAND:
        this.anyRecordAfterHeader = true;
        return this.parseCommand(cur, at);
      case VM.SECTION_START:
      case VM.SECTION_FULL:
      case VM.SECTION_PART:
      case VM.SECTION_END:
        this.anyRecordAfterHeader = true;
        return this.parseSection(cur, at, type);
      case VM.EOF:
        this.anyRecordAfterHeader = true;
        this.state = "afterEof";
        this.sawEof = true;
        return { records: [{ kind: "eof", offset: at }], consumed: 1 };
      default:
        throw new StreamError(
          "unknown-section-type",
          at,
          `unknown top-level record type 0x${type.toString(16)} (expected a section, command or EOF)`,
        );
    }
  }

  private parseConfiguration(cur: Cursor, at: number): Parsed {
    const len = cur.be32();
    if (len > LIMITS.machineTypeName)
      throw new StreamError("impossible-length", at + 1, `machine type name of ${len} bytes`);
    const machineType = cur.bytes(len).toString("latin1");
    const subsections: ConfigSubsection[] = [];
    let unknown: { at: number; name: string } | null = null;
    // Subsections have no terminator: the loader peeks for the next 0x05 (vmstate_subsection_load,
    // migration/vmstate.c@v7.2.0:444).
    while (cur.peekU8() === VM.SUBSECTION) {
      const subAt = cur.pos;
      cur.u8();
      const name = cur.countedString();
      const version = cur.be32();
      if (name === CONFIG_SUBSECTIONS.TARGET_PAGE_BITS) {
        const bits = cur.be32();
        if (bits < 10 || bits > 16)
          throw new StreamError(
            "impossible-length",
            at + (cur.pos - cur.start) - 4,
            `target page bits ${bits}`,
          );
        subsections.push({ name, version, bits });
      } else if (name === CONFIG_SUBSECTIONS.CAPABILITIES) {
        const count = cur.be32();
        if (count > LIMITS.capabilities)
          throw new StreamError("impossible-length", at + (cur.pos - cur.start) - 4, `${count} capabilities`);
        const capabilities: string[] = [];
        for (let i = 0; i < count; i++) capabilities.push(cur.countedString());
        subsections.push({ name, version, capabilities });
      } else if (name === CONFIG_SUBSECTIONS.UUID) {
        subsections.push({ name, version, uuid: cur.bytes(16) });
      } else {
        cur.pos = subAt;
        unknown = { at: at + (subAt - cur.start), name };
        break;
      }
    }
    this.machineType = machineType;
    this.anyRecordAfterHeader = true;
    for (const s of subsections) {
      if (s.name === CONFIG_SUBSECTIONS.TARGET_PAGE_BITS) this.pageBytes = 2 ** s.bits;
      if (s.name === CONFIG_SUBSECTIONS.CAPABILITIES)
        this.ignoreShared = s.capabilities.includes("x-ignore-shared");
    }
    if (unknown) this.startPassthrough(unknown.at, `unknown configuration subsection "${unknown.name}"`);
    return {
      records: [{ kind: "configuration", offset: at, machineType, subsections }],
      consumed: cur.pos - cur.start,
    };
  }

  private parseCommand(cur: Cursor, at: number): Parsed {
    const cmd = cur.be16();
    const len = cur.be16();
    const spec = COMMANDS[cmd];
    if (!spec) throw new StreamError("unknown-command", at, `unknown command ${cmd}`);
    const ok = typeof spec.len === "number" ? spec.len === -1 || spec.len === len : spec.len.includes(len);
    if (!ok)
      throw new StreamError("bad-command-length", at, `command ${spec.name} with a ${len}-byte payload`);
    const payload = cur.bytes(len);
    let packaged: Buffer | undefined;
    if (cmd === CMD_PACKAGED) {
      const size = payload.readUInt32BE(0);
      if (size > MAX_PACKAGED_SIZE)
        throw new StreamError(
          "impossible-length",
          at + 5,
          `PACKAGED blob of ${size} bytes (QEMU's limit is 16 MiB)`,
        );
      packaged = cur.bytes(size);
    }
    if (cmd === CMD_POSTCOPY_ADVISE && len === 16) {
      // be64 ram_pagesize_summary (OR of every block's page size), be64 target page size (savevm.c@v7.2.0:1686).
      const summaryLo = payload.readUInt32BE(4);
      const summaryHi = payload.readUInt32BE(0);
      this.advisedHugePages = summaryHi !== 0 || summaryLo !== this.pageSize;
    }
    const record = { kind: "command" as const, offset: at, cmd, name: spec.name, payload };
    return { records: [packaged ? { ...record, packaged } : record], consumed: cur.pos - cur.start };
  }

  private parseSection(cur: Cursor, at: number, type: number): Parsed {
    const sectionId = cur.be32();
    let idstr: string | null = null;
    let instanceId: number | null = null;
    let versionId: number | null = null;
    if (type === VM.SECTION_START || type === VM.SECTION_FULL) {
      idstr = cur.countedString();
      instanceId = cur.be32();
      versionId = cur.be32();
    }
    const record: SectionRecord = {
      kind: "section",
      offset: at,
      type: SECTION_TYPE_NAMES[type as keyof typeof SECTION_TYPE_NAMES],
      sectionId,
      idstr,
      instanceId,
      versionId,
    };
    const consumed = cur.pos - cur.start;
    if (type === VM.SECTION_START && idstr === RAM_IDSTR && instanceId === 0) {
      if (versionId !== RAM_SECTION_VERSION) {
        this.startPassthrough(
          at,
          `"ram" section version ${versionId} (only ${RAM_SECTION_VERSION} is known)`,
        );
      } else {
        this.ramSectionId = sectionId;
        this.currentSectionId = sectionId;
        this.state = "ram";
      }
    } else if ((type === VM.SECTION_PART || type === VM.SECTION_END) && sectionId === this.ramSectionId) {
      this.currentSectionId = sectionId;
      this.state = "ram";
    } else {
      const name = idstr ?? `section ${sectionId}`;
      this.startPassthrough(at, `${record.type} section "${name}" is not interpreted`);
    }
    return { records: [record], consumed };
  }

  private parseFooter(cur: Cursor): Parsed {
    if (cur.peekU8() !== VM.SECTION_FOOTER) {
      // Footers are off for old machine types (send-section-footer=off): go on without one.
      this.state = "top";
      return { records: [], consumed: 0 };
    }
    cur.u8();
    const sectionId = cur.be32();
    if (sectionId !== this.currentSectionId)
      throw new StreamError(
        "footer-mismatch",
        this.offset,
        `section footer for section ${sectionId} closes section ${this.currentSectionId}`,
      );
    this.state = "top";
    return { records: [{ kind: "footer", offset: this.offset, sectionId }], consumed: 5 };
  }

  private parseVmdesc(cur: Cursor): Parsed {
    const type = cur.u8();
    if (type !== VM.VMDESCRIPTION)
      throw new StreamError(
        "trailing-bytes",
        this.offset,
        `byte 0x${type.toString(16)} after EOF (expected vmdesc)`,
      );
    const len = cur.be32();
    if (len > LIMITS.vmdesc)
      throw new StreamError("impossible-length", this.offset + 1, `vmdesc of ${len} bytes`);
    const json = cur.bytes(len);
    this.state = "done";
    return { records: [{ kind: "vmdesc", offset: this.offset, json }], consumed: cur.pos - cur.start };
  }

  /** A be64 that must be an exact JavaScript number (lengths, offsets). */
  private be64Number(cur: Cursor, what: string): number {
    const at = this.offset + (cur.pos - cur.start);
    const { hi, lo } = cur.be64Parts();
    if (hi > MAX_SAFE_HI) throw new StreamError("impossible-length", at, `${what} of 2^53 bytes or more`);
    return hi * TWO_32 + lo;
  }

  private parseRam(cur: Cursor): RamRecord {
    const at = this.offset;
    const fast = this.parseContinuedPage(cur, at);
    if (fast) return fast;
    const { hi, lo } = cur.be64Parts();
    const mask = this.pageSize - 1;
    const flags = lo & mask;
    const type = flags & ~RAM_FLAG.CONTINUE;
    const value = () => {
      if (hi > MAX_SAFE_HI) throw new StreamError("impossible-offset", at, "page offset of 2^53 or more");
      return hi * TWO_32 + (lo - flags);
    };
    switch (type) {
      case RAM_FLAG.PAGE:
      case RAM_FLAG.ZERO:
      case RAM_FLAG.XBZRLE:
      case RAM_FLAG.COMPRESS_PAGE: {
        const header = this.pageHeader(cur, at, value(), flags);
        let record: RamRecord;
        if (type === RAM_FLAG.PAGE) {
          record = { kind: "ram", type: "page", offset: at, header, data: cur.bytes(this.pageSize) };
        } else if (type === RAM_FLAG.ZERO) {
          record = { kind: "ram", type: "zero", offset: at, header, fill: cur.u8() };
        } else if (type === RAM_FLAG.XBZRLE) {
          const encoding = cur.u8();
          if (encoding !== XBZRLE_ENCODING_FLAG)
            throw new StreamError(
              "unknown-ram-flags",
              at,
              `XBZRLE record with encoding byte 0x${encoding.toString(16)}`,
            );
          const len = cur.be16();
          if (len > this.pageSize)
            throw new StreamError(
              "impossible-length",
              at,
              `XBZRLE record of ${len} bytes for a ${this.pageSize}-byte page`,
            );
          record = { kind: "ram", type: "xbzrle", offset: at, header, encoding, data: cur.bytes(len) };
        } else {
          const len = cur.be32();
          if (len > MAX_COMPRESSED_PAGE)
            throw new StreamError("impossible-length", at, `compressed page of ${len} bytes`);
          record = { kind: "ram", type: "compress", offset: at, header, data: cur.bytes(len) };
        }
        this.lastBlock = this.blocks.get(header.block) ?? null;
        return record;
      }
      case RAM_FLAG.MEM_SIZE:
        if (hi > MAX_SAFE_HI)
          throw new StreamError("impossible-length", at, "RAM total of 2^53 bytes or more");
        return this.parseMemSize(cur, at, value(), flags);
      case RAM_FLAG.EOS:
        if (flags !== RAM_FLAG.EOS) break;
        this.state = "ramFooter";
        return { kind: "ram", type: "eos", offset: at, value: value() + flags };
      case RAM_FLAG.MULTIFD_FLUSH:
        if (flags !== RAM_FLAG.MULTIFD_FLUSH) break;
        return { kind: "ram", type: "multifdFlush", offset: at, value: value() + flags };
    }
    throw new StreamError(
      "unknown-ram-flags",
      at,
      `unknown combination of RAM flags 0x${flags.toString(16)}`,
    );
  }

  /**
   * The hot path: a complete PAGE or ZERO record of the current block (CONTINUE), most of any stream. Returns
   * null for anything else, which the general path then parses (and validates) in full.
   */
  private parseContinuedPage(cur: Cursor, at: number): RamRecord | null {
    const record = this.continuedPageAt(cur.buf, cur.pos, at);
    if (record) cur.pos = this.continuedEnd;
    return record;
  }

  /** Where the record continuedPageAt last returned ends in its buffer. */
  private continuedEnd = 0;

  /**
   * Parses every complete continued PAGE or ZERO record at `pos` of `chunk` onwards (RAM state only), without
   * the general path's per-record cursor and wrapper; returns the bytes consumed (0: the next record needs the
   * general path, or is incomplete).
   */
  private continuedPages(chunk: Buffer, pos: number, out: StreamRecord[]): number {
    let p = pos;
    for (;;) {
      const record = this.continuedPageAt(chunk, p, this.offset);
      if (!record) return p - pos;
      out.push(record);
      this.offset += this.continuedEnd - p;
      p = this.continuedEnd;
    }
  }

  /** The flags of the header continuedAddrAt last read. */
  private continuedFlags = 0;

  /**
   * The page address in the current block of the record header (be64 address | flags) at `p` of `buf`, its flags
   * in continuedFlags; -1 without a current block, a whole header, or an address inside the block.
   */
  private continuedAddrAt(buf: Buffer, p: number): number {
    const block = this.lastBlock;
    const pageSize = this.pageSize;
    if (!block || buf.length - p < 8) return -1;
    const hi = buf.readUInt32BE(p);
    const lo = buf.readUInt32BE(p + 4);
    const flags = lo & (pageSize - 1);
    if (hi > MAX_SAFE_HI) return -1;
    const addr = hi * TWO_32 + (lo - flags);
    if (addr + pageSize > block.length) return -1;
    this.continuedFlags = flags;
    return addr;
  }

  private continuedPageAt(buf: Buffer, p: number, at: number): RamRecord | null {
    const block = this.lastBlock;
    const pageSize = this.pageSize;
    if (!block || buf.length - p < 9) return null;
    const addr = this.continuedAddrAt(buf, p);
    if (addr < 0) return null;
    const flags = this.continuedFlags;
    if (flags === (RAM_FLAG.PAGE | RAM_FLAG.CONTINUE) && buf.length - p >= 8 + pageSize) {
      this.continuedEnd = p + 8 + pageSize;
      const header: PageHeader = { addr, flags, idstr: null, block: block.idstr };
      return { kind: "ram", type: "page", offset: at, header, data: buf.subarray(p + 8, p + 8 + pageSize) };
    }
    if (flags === (RAM_FLAG.ZERO | RAM_FLAG.CONTINUE)) {
      this.continuedEnd = p + 9;
      const header: PageHeader = { addr, flags, idstr: null, block: block.idstr };
      return { kind: "ram", type: "zero", offset: at, header, fill: buf[p + 8] as number };
    }
    return null;
  }

  private pageHeader(cur: Cursor, at: number, addr: number, flags: number): PageHeader {
    let block: RamBlockEntry | undefined;
    let idstr: string | null = null;
    if (flags & RAM_FLAG.CONTINUE) {
      if (!this.lastBlock)
        throw new StreamError(
          "no-current-block",
          at,
          "a CONTINUE page record before any record named its block",
        );
      block = this.lastBlock;
    } else {
      idstr = cur.countedString();
      block = this.blocks.get(idstr);
      if (!block) throw new StreamError("unknown-block", at, `page record for unknown RAM block "${idstr}"`);
    }
    if (addr + this.pageSize > block.length)
      throw new StreamError(
        "impossible-offset",
        at,
        `page offset 0x${addr.toString(16)} beyond block "${block.idstr}" (${block.length} bytes)`,
      );
    return { addr, flags, idstr, block: block.idstr };
  }

  private parseMemSize(cur: Cursor, at: number, total: number, flags: number): RamRecord {
    if (flags !== RAM_FLAG.MEM_SIZE)
      throw new StreamError("unknown-ram-flags", at, `MEM_SIZE with flags 0x${flags.toString(16)}`);
    if (total > LIMITS.ramTotal)
      throw new StreamError("impossible-length", at, `RAM total of ${total} bytes`);
    const blocks: RamBlockEntry[] = [];
    let remaining = total;
    while (remaining > 0) {
      const entryAt = this.offset + (cur.pos - cur.start);
      const idstr = cur.countedString();
      if (idstr.length === 0)
        throw new StreamError("impossible-length", entryAt, "RAM block with an empty idstr");
      const length = this.be64Number(cur, "RAM block length");
      if (length > remaining || length === 0)
        throw new StreamError(
          "impossible-length",
          entryAt,
          `RAM block "${idstr}" of ${length} bytes (${remaining} left of the announced total)`,
        );
      const entry: RamBlockEntry = { idstr, length };
      if (this.advisedHugePages) {
        // Present only for blocks whose page size differs from the host's (ram.c@v7.2.0:3235-3237); the stream does
        // not say which, so recognise it: a power of two above the target page size, unlike an idstr or EOS.
        const { hi, lo } = cur.peekBe64Parts();
        const candidate = hi * TWO_32 + lo;
        if (hi <= MAX_SAFE_HI && candidate > this.pageSize && Number.isInteger(Math.log2(candidate))) {
          cur.be64Parts();
          entry.pageSize = candidate;
        }
      }
      if (this.ignoreShared) entry.addr = this.be64Number(cur, "RAM block address");
      blocks.push(entry);
      remaining -= length;
    }
    for (const b of blocks) this.blocks.set(b.idstr, b);
    return { kind: "ram", type: "memSize", offset: at, total, flags, blocks };
  }
}
