/**
 * Deferred references (prune/pruning-processor.ts): judged cache pages wait, and go out later (as references or
 * whole) where a record may stand. What a destination QEMU loads must not change: the stream receive would hand it
 * (references rebuilt from the "disk") must parse as QEMU's own does, CONTINUE records resolving to the right
 * block, and leave every page with the bytes of its last version in the source's stream, however the stream is
 * chunked and whenever the caller asks for waiting pages. The judge is a table and the disk a map: the
 * processor's own rules are under test (real guests: test/integration).
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { CATEGORY } from "../../src/introspect/classifier.ts";
import type { PageJudge } from "../../src/prune/page-judge.ts";
import { PruningProcessor, type RefsAccepted, type Segment } from "../../src/prune/pruning-processor.ts";
import { StreamParser } from "../../src/stream/parser.ts";
import type { PageHeader, StreamRecord } from "../../src/stream/records.ts";
import { encodeRecord } from "../../src/stream/writer.ts";
import { ramStreamOpening } from "../support/stream-records.ts";

const MiB = 1024 * 1024;
const RAM = "pc.ram";
const VGA = "vga.vram";

const page = (block: string, index: number, fill: number, named: boolean): StreamRecord => ({
  kind: "ram",
  type: "page",
  offset: 0,
  header: {
    addr: index * 4096,
    flags: 0x08 | (named ? 0 : 0x20),
    idstr: named ? block : null,
    block,
  } satisfies PageHeader,
  data: Buffer.alloc(4096, fill),
});
const zero = (block: string, index: number): StreamRecord => ({
  kind: "ram",
  type: "zero",
  offset: 0,
  header: { addr: index * 4096, flags: 0x02 | 0x20, idstr: null, block },
  fill: 0,
});
const section = (type: "PART" | "END"): StreamRecord => ({
  kind: "section",
  offset: 0,
  type,
  sectionId: 2,
  idstr: null,
  instanceId: null,
  versionId: null,
});
const eos: StreamRecord[] = [
  { kind: "ram", type: "eos", offset: 0, value: 0x10 },
  { kind: "footer", offset: 0, sectionId: 2 },
];

/**
 * pc.ram pages 0-39 are clean cache (fill 100 + i, on the disk), 40-59 anonymous (fill 1); then vga.vram pages
 * whose records CONTINUE from one another; a second pass re-sends cache page 5 with new bytes (anonymous now) and
 * pages 60-63 (cache); the END section sends cache pages 64-69 and a zero page. Page 7's bytes are not on the disk.
 */
function stream(): Buffer {
  const records: StreamRecord[] = ramStreamOpening([
    { idstr: RAM, length: 8 * MiB },
    { idstr: VGA, length: 1 * MiB },
  ]);
  for (let i = 0; i < 60; i++) records.push(page(RAM, i, i < 40 ? 100 + i : 1, i === 0));
  for (let i = 0; i < 3; i++) records.push(page(VGA, i, 7, i === 0));
  records.push(...eos, section("PART"), page(RAM, 5, 9, true));
  for (let i = 60; i < 64; i++) records.push(page(RAM, i, 100 + i, false));
  records.push(page(VGA, 3, 8, true), ...eos, section("END"), page(RAM, 64, 164, true));
  for (let i = 65; i < 70; i++) records.push(page(RAM, i, 100 + i, false));
  records.push(zero(RAM, 70), ...eos, { kind: "eof", offset: 0 });
  return Buffer.concat(records.flatMap(encodeRecord));
}

const isCache = (block: string, index: number) =>
  block === RAM && ((index < 40 && index !== 5) || (index >= 60 && index < 70));
// Page 5 is cache when first judged, anonymous when re-sent: the judge sees it as of the call that has it.
let page5Judged = 0;
const judge: PageJudge = {
  description: "table",
  judge: (pages) =>
    Uint8Array.from(pages, (p) => {
      const index = p.blockOffset / 4096;
      if (p.block === RAM && index === 5) return page5Judged++ === 0 ? CATEGORY.cache : CATEGORY.anonymous;
      return isCache(p.block, index) ? CATEGORY.cache : CATEGORY.anonymous;
    }),
};
/** The "disk": blocks 1000 + fill for every cache page's bytes but page 7's. */
const cacheIndex = {
  lookup(data: Buffer) {
    const fill = data[0] ?? 0;
    if (fill < 100 || fill === 107 || !data.every((b) => b === fill)) return null;
    return { target: { kind: "index" as const, block: 1000 + fill }, hash: Buffer.alloc(32, fill) };
  },
};

/** What receive hands the destination QEMU: bytes as they are, a reference as its header and the disk's block. */
function rebuild(segments: Segment[], into: Buffer[]): number {
  let refs = 0;
  for (const s of segments) {
    if (s.kind === "bytes") into.push(...s.buffers);
    else if (s.kind === "ref") {
      assert.equal(s.target.kind, "index");
      const block = s.target.kind === "index" ? s.target.block : 0;
      into.push(s.pageHeader, Buffer.alloc(4096, block - 1000));
      refs++;
    } else assert.fail("no ZEROS on the main channel");
  }
  return refs;
}

/** The RAM a destination ends with: each page's last record, in the order the stream has them; and the records. */
function load(stream: Buffer): { ram: Map<string, string>; records: StreamRecord[] } {
  const parser = new StreamParser();
  const records = [...parser.push(stream), ...parser.end()];
  const ram = new Map<string, string>();
  for (const r of records) {
    assert.notEqual(r.kind, "raw", "the rebuilt stream parses as QEMU's own");
    if (r.kind !== "ram" || !("header" in r)) continue;
    const key = `${r.header.block}:${r.header.addr / 4096}`;
    if (r.type === "page") ram.set(key, `fill ${r.data[0]}`);
    else if (r.type === "zero") ram.set(key, "zero");
  }
  return { ram, records };
}

const REFS: RefsAccepted = { index: true, filesystem: false, mayDefer: true };

test("waiting cache pages: the destination loads the same RAM, whatever the chunking and whenever they are asked for", () => {
  const input = stream();
  const expected = load(input).ram;
  let seed = 11;
  const random = () => {
    seed = (seed * 48271) % 2147483647;
    return seed;
  };
  const ways: [string, (i: number) => number, (i: number) => number][] = [
    ["whole, never asked", () => input.length, () => 0],
    ["a byte at a time, a page every 3000 bytes", () => 1, (i) => (i % 3000 === 0 ? 1 : 0)],
    ["a page and a bit, two pages each time", () => 4096 + 9, () => 2],
    ["random chunks, random asks", () => random() % 9000, () => random() % 4],
  ];
  for (const [name, chunkBytes, askPages] of ways) {
    page5Judged = 0;
    const p = new PruningProcessor(judge, {
      drop: ["free", "cache"],
      cacheIndex,
      deferBytes: () => 64 * MiB,
    });
    const out: Buffer[] = [];
    let refs = 0;
    for (let at = 0, i = 0; at < input.length; i++) {
      const n = Math.max(1, chunkBytes(i));
      refs += rebuild(p.pushSegments(input.subarray(at, at + n), REFS), out);
      refs += rebuild(p.flushDeferred(REFS, askPages(i)), out);
      at += n;
    }
    refs += rebuild(p.endSegments(REFS), out);
    const { ram, records } = load(Buffer.concat(out));
    assert.deepEqual(ram, expected, `${name}: every page as its last version in the source's stream`);
    assert.equal(p.deferredBytes, 0, `${name}: nothing left waiting`);
    // 50 pages judged cache (page 5's first version among them), but page 7 is not on the disk: whole.
    assert.equal(refs, 49, name);
    const report = p.report();
    assert.equal(report.refs, 49, name);
    assert.equal(report.cacheMisses, 1, name);
    assert.ok((report.deferred?.pages ?? 0) > 0, `${name}: pages waited`);
    // The END's pages go out before its EOS: after the last RAM record come only EOS, footer and EOF.
    const tail = records.slice(-3).map((r) => (r.kind === "ram" ? r.type : r.kind));
    assert.deepEqual(tail, ["eos", "footer", "eof"], name);
    if (name.startsWith("whole")) {
      // Nothing asked for: the first pass's cache pages went out at the END, after the anonymous pages.
      const order = records.flatMap((r) =>
        r.kind === "ram" && r.type === "page" && r.header.block === RAM ? [r.header.addr / 4096] : [],
      );
      assert.ok(
        order.indexOf(40) < order.indexOf(0),
        "an anonymous page went before the cache pages ahead of it",
      );
      assert.ok(order.indexOf(5) < order.lastIndexOf(5), "page 5's waiting version before its later one");
      assert.ok((report.deferred?.headersNamed ?? 0) > 0, "a CONTINUE record had to name its block");
    }
  }
});

test("without mayDefer (or without deferBytes), references are made as pages arrive, in stream order", () => {
  const input = stream();
  for (const [refs, deferBytes] of [
    [{ index: true, filesystem: false }, 64 * MiB],
    [REFS, undefined],
  ] as const) {
    page5Judged = 0;
    const p = new PruningProcessor(judge, {
      drop: ["free", "cache"],
      cacheIndex,
      ...(deferBytes ? { deferBytes: () => deferBytes } : {}),
    });
    const out: Buffer[] = [];
    rebuild(p.pushSegments(input, refs), out);
    rebuild(p.endSegments(refs), out);
    assert.ok(Buffer.concat(out).equals(input), "rebuilt, the input byte for byte");
    assert.equal(p.report().deferred?.pages ?? 0, 0);
  }
});

test("waiting pages stay within deferBytes; the rest get their reference as they arrive", () => {
  page5Judged = 0;
  const input = stream();
  const p = new PruningProcessor(judge, { drop: ["free", "cache"], cacheIndex, deferBytes: () => 3 * 4096 });
  const out: Buffer[] = [];
  let peak = 0;
  for (let at = 0; at < input.length; at += 5000) {
    rebuild(p.pushSegments(input.subarray(at, at + 5000), REFS), out);
    peak = Math.max(peak, p.deferredBytes);
  }
  rebuild(p.endSegments(REFS), out);
  assert.ok(peak <= 3 * 4096 && peak > 0, `at most 3 pages waited (${peak / 4096})`);
  page5Judged = 0;
  assert.deepEqual(load(Buffer.concat(out)).ram, load(input).ram);
});

test("a stream that stops parsing while pages wait: they go out before the unparsed bytes, which follow as they came", () => {
  page5Judged = 0;
  const whole = stream();
  // Cut after pc.ram page 45 (a dense page after the waiting cache pages) and append bytes no parser takes.
  const cut = whole.indexOf(Buffer.alloc(4096, 1)) + 6 * (4096 + 8);
  const garbage = Buffer.from([0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 1, 2, 3]);
  const input = Buffer.concat([whole.subarray(0, cut), garbage]);
  const p = new PruningProcessor(judge, { drop: ["free", "cache"], cacheIndex, deferBytes: () => 64 * MiB });
  const out: Buffer[] = [];
  rebuild(p.pushSegments(input, REFS), out);
  rebuild(p.endSegments(REFS), out);
  const rebuilt = Buffer.concat(out);
  assert.ok(rebuilt.subarray(-garbage.length).equals(garbage), "the unparsed bytes last, as they came");
  assert.equal(p.deferredBytes, 0);
  assert.equal(p.report().refs, 39, "the 39 waiting cache pages on the disk went out before them");
});
