/**
 * The pruning processor on streams built record by record with the writer (real QEMU streams and real guests are
 * in test/integration/prune-*.test.ts). The judge here is a table of which pages are free: the processor's own
 * rules are under test. Free PAGE records become ZERO records for the same block, offset and CONTINUE state;
 * every other byte passes unchanged, however the stream is chunked; a dry run changes nothing; a judge that
 * fails mid-way, or XBZRLE before anything was dropped, turns the rest into a passthrough; an XBZRLE delta after
 * pages were dropped fails the migration.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { CATEGORY } from "../../src/introspect/classifier.ts";
import type { PageJudge, PageRef } from "../../src/prune/page-judge.ts";
import { PruningProcessor } from "../../src/prune/pruning-processor.ts";
import { StreamParser } from "../../src/stream/parser.ts";
import type { PageHeader, StreamRecord } from "../../src/stream/records.ts";
import { encodeRecord } from "../../src/stream/writer.ts";
import { ramStreamOpening } from "../support/stream-records.ts";

const MiB = 1024 * 1024;
const BLOCK = "ram0";

const header = (addr: number, flags: number, first: boolean): PageHeader => ({
  addr,
  flags: flags | (first ? 0 : 0x20),
  idstr: first ? BLOCK : null,
  block: BLOCK,
});
const section = (type: "START" | "PART" | "END", sectionId = 2): StreamRecord => ({
  kind: "section",
  offset: 0,
  type,
  sectionId,
  idstr: type === "START" ? "ram" : null,
  instanceId: type === "START" ? 0 : null,
  versionId: type === "START" ? 4 : null,
});
const eos: StreamRecord[] = [
  { kind: "ram", type: "eos", offset: 0, value: 0x10 },
  { kind: "footer", offset: 0, sectionId: 2 },
];

/** header, configuration, ram START (MEM_SIZE), PART with `pages` pages (non-zero data), [XBZRLE], END, EOF. */
function stream(pages: number, options: { xbzrleAt?: number } = {}): Buffer {
  const records: StreamRecord[] = ramStreamOpening([{ idstr: BLOCK, length: 2 * MiB }]);
  for (let i = 0; i < pages; i++)
    records.push({
      kind: "ram",
      type: "page",
      offset: 0,
      header: header(i * 4096, 0x08, i === 0),
      data: Buffer.alloc(4096, i + 1),
    });
  records.push(...eos);
  if (options.xbzrleAt !== undefined)
    records.push(
      section("PART"),
      {
        kind: "ram",
        type: "xbzrle",
        offset: 0,
        header: header(options.xbzrleAt * 4096, 0x40, true),
        encoding: 1,
        data: Buffer.from([3, 1, 2, 3]),
      },
      ...eos,
    );
  records.push(section("END"), ...eos, { kind: "eof", offset: 0 });
  return Buffer.concat(records.flatMap(encodeRecord));
}

/** Pages whose index is in `free` are free; `failOnCall` makes that call (1-based) throw. */
function tableJudge(free: Set<number>, failOnCall?: number): PageJudge & { calls: PageRef[][] } {
  const calls: PageRef[][] = [];
  return {
    description: "table",
    calls,
    judge(pages) {
      calls.push([...pages]);
      if (calls.length === failOnCall) throw new Error("struct pages unreadable");
      return Uint8Array.from(pages, (p) =>
        free.has(p.blockOffset / 4096) ? CATEGORY.free : CATEGORY.anonymous,
      );
    },
  };
}

/** Feeds `input` to `push` in chunks of `chunk(i)` bytes (at least 1). */
function feed(input: Buffer, chunk: (i: number) => number, push: (bytes: Buffer) => void): void {
  for (let at = 0, i = 0; at < input.length; i++) {
    const n = Math.max(1, chunk(i));
    push(input.subarray(at, at + n));
    at += n;
  }
}

function run(processor: PruningProcessor, input: Buffer, chunk: (i: number) => number): Buffer {
  const out: Buffer[] = [];
  feed(input, chunk, (bytes) => out.push(...processor.push(bytes)));
  out.push(...processor.end());
  return Buffer.concat(out);
}

/** The chunkings every rewrite must survive: whole, a byte at a time, a page and a bit, pseudo-random sizes. */
function chunkings(length: number, seed: number): ((i: number) => number)[] {
  let state = seed;
  return [
    () => length,
    () => 1,
    () => 4096 + 9,
    () => {
      state = (state * 48271) % 2147483647;
      return state % 9000;
    },
  ];
}

function records(buf: Buffer): StreamRecord[] {
  const parser = new StreamParser();
  return [...parser.push(buf), ...parser.end()];
}

test("free PAGE records become ZERO records (same block, offset, CONTINUE); the rest is unchanged, for any chunking", () => {
  const input = stream(8);
  const free = new Set([0, 3, 7]);
  for (const chunk of chunkings(input.length, 1)) {
    const p = new PruningProcessor(tableJudge(free), { drop: ["free"] });
    const output = run(p, input, chunk);
    const before = records(input);
    const after = records(output);
    assert.equal(after.length, before.length);
    for (let i = 0; i < before.length; i++) {
      const a = before[i] as StreamRecord;
      const b = after[i] as StreamRecord;
      if (a.kind === "ram" && a.type === "page" && free.has(a.header.addr / 4096)) {
        assert.ok(b.kind === "ram" && b.type === "zero", `page ${a.header.addr / 4096} became a ZERO record`);
        assert.equal(b.header.addr, a.header.addr);
        assert.equal(b.header.idstr, a.header.idstr, "the same CONTINUE state");
        assert.equal(b.fill, 0);
      } else assert.deepEqual(Buffer.concat(encodeRecord(b)), Buffer.concat(encodeRecord(a)));
    }
    const r = p.report();
    assert.equal(r.pages.seen, 8);
    assert.equal(r.pages.pruned, 3);
    assert.equal(r.pages.byCategory.free, 3);
    assert.equal(r.bytesSaved, 3 * 4095);
    assert.equal(output.length, input.length - r.bytesSaved);
  }
});

test("a dry run judges and counts, and forwards every byte unchanged", () => {
  const input = stream(8);
  const p = new PruningProcessor(tableJudge(new Set([1, 2])), { drop: ["free"], dryRun: true });
  assert.deepEqual(
    run(p, input, () => 5000),
    input,
  );
  assert.equal(p.report().mode, "dry-run");
  assert.equal(p.report().pages.pruned, 2);
});

test("without a judge (introspection unavailable) the stream passes through and the report says why", () => {
  const input = stream(4);
  const p = new PruningProcessor("no VMCOREINFO found: migrating without pruning", { drop: ["free"] });
  assert.deepEqual(
    run(p, input, () => 3000),
    input,
  );
  assert.equal(p.report().mode, "passthrough");
  assert.match(p.report().degraded ?? "", /no VMCOREINFO/);
  assert.equal(p.report().pages.seen, 4);
});

test("a judge failing mid-way: what was judged stays pruned, the rest passes through unchanged", () => {
  const input = stream(8);
  const judge = tableJudge(new Set([0, 1, 2, 3, 4, 5, 6, 7]), 2);
  const logs: string[] = [];
  const p = new PruningProcessor(judge, { drop: ["free"], log: (l) => logs.push(l) });
  // One page record per chunk from the second page on: the second judge call fails.
  const output = run(p, input, (i) => (i === 0 ? input.indexOf(Buffer.alloc(4096, 2)) : 4105));
  const r = p.report();
  assert.match(r.degraded ?? "", /introspection failed mid-way: struct pages unreadable/);
  assert.equal(r.pages.pruned, judge.calls[0]?.length);
  assert.ok(r.pages.pruned >= 1 && r.pages.pruned < 8);
  assert.equal(output.length, input.length - r.bytesSaved);
  const pages = records(output).filter((x) => x.kind === "ram" && (x.type === "page" || x.type === "zero"));
  assert.equal(pages.length, 8);
  assert.equal(pages.filter((x) => x.kind === "ram" && x.type === "page").length, 8 - r.pages.pruned);
  assert.ok(logs.some((l) => l.includes("passing the rest of the stream through")));
});

test("XBZRLE: after pages were dropped the migration fails; before any drop, pruning turns itself off", () => {
  const late = new PruningProcessor(tableJudge(new Set([2])), { drop: ["free"] });
  // Chunks of one page record: page 2 is dropped before the delta arrives.
  assert.throws(
    () => run(late, stream(4, { xbzrleAt: 2 }), () => 4105),
    /XBZRLE delta after vmprune had zeroed/,
  );

  const input = stream(4, { xbzrleAt: 2 });
  // In one chunk, the delta is seen before the batch's pages are judged: nothing is dropped at all.
  const early = new PruningProcessor(tableJudge(new Set([2])), { drop: ["free"] });
  assert.deepEqual(
    run(early, input, () => 1 << 20),
    input,
  );
  assert.match(early.report().degraded ?? "", /XBZRLE deltas \(xbzrle is on\)/);
});

test("references: with a receiver, cache pages found on the disk become REF segments; the rest are the very input bytes, for any chunking", () => {
  const input = stream(12);
  // Pages 1, 4, 5 and 11 are clean cache; the disk holds the bytes of pages 1, 5 and 11 (4's were rewritten).
  const cache = new Set([1, 4, 5, 11]);
  const onDisk = new Map([1, 5, 11].map((i) => [Buffer.alloc(4096, i + 1).toString("latin1"), 100 + i]));
  const judge: PageJudge = {
    description: "table",
    judge: (pages) =>
      Uint8Array.from(pages, (p) => (cache.has(p.blockOffset / 4096) ? CATEGORY.cache : CATEGORY.anonymous)),
  };
  const cacheIndex = {
    lookup(page: Buffer) {
      const block = onDisk.get(page.toString("latin1"));
      return block === undefined
        ? null
        : { target: { kind: "index" as const, block }, hash: Buffer.alloc(32, block) };
    },
  };
  const ways = chunkings(input.length, 7);
  for (const chunk of ways) {
    const p = new PruningProcessor(judge, { drop: ["free", "cache"], cacheIndex });
    const rebuilt: Buffer[] = [];
    const inputViews = new Set<ArrayBufferLike>();
    const refs: number[] = [];
    const take = (segments: ReturnType<PruningProcessor["pushSegments"]>) => {
      for (const s of segments) {
        if (s.kind === "bytes") {
          for (const b of s.buffers) inputViews.add(b.buffer);
          rebuilt.push(...s.buffers);
          continue;
        }
        // What receive does: the record's header as QEMU wrote it, then the block's bytes.
        if (s.kind === "zeros") assert.fail("the main channel makes ZERO records, never ZEROS");
        assert.equal(s.target.kind, "index");
        const block = s.target.kind === "index" ? s.target.block : -1;
        refs.push(block);
        assert.equal(s.page.blockOffset, (block - 100) * 4096);
        rebuilt.push(s.pageHeader, Buffer.alloc(4096, block - 99));
      }
    };
    feed(input, chunk, (bytes) => take(p.pushSegments(bytes)));
    take(p.endSegments());
    assert.deepEqual(refs, [101, 105, 111], "a reference for each cache page on the disk, in stream order");
    assert.ok(Buffer.concat(rebuilt).equals(input), "rebuilt, the stream is the input byte for byte");
    if (chunk === ways[0])
      assert.deepEqual([...inputViews], [input.buffer], "forwarded as views of the input, not copies");
    const r = p.report();
    assert.equal(r.refs, 3);
    assert.equal(r.cacheMisses, 1);
    assert.equal(r.pages.byCategory.cache, 4);
  }
});

test("a stream cut mid-record: every byte received still goes on, the unfinished record as it came", () => {
  const whole = stream(6);
  const cut = whole.subarray(0, whole.indexOf(Buffer.alloc(4096, 4)) + 100);
  const p = new PruningProcessor(tableJudge(new Set([0, 3])), { drop: ["free"] });
  const output = run(p, cut, () => 3000);
  // Page 0 was complete and free: a ZERO record; page 3 is the cut one and goes on unjudged.
  assert.equal(output.length, cut.length - 4095);
  assert.equal(p.report().pages.pruned, 1);
  assert.ok(output.subarray(-8192).equals(cut.subarray(-8192)), "pages 2 and the cut 3 as they came");
});
