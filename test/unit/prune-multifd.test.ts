/**
 * The multifd pruning processor on real captured channels (test/fixtures/multifd), with a table for a judge: the
 * processor's own rules are under test (the real judge and QEMU are in test/integration/prune-multifd.test.ts).
 * Free normal pages move to the zero list; everything else is QEMU's bytes, however the channel is chunked; the
 * judge sees a packet only once all of it arrived; a SYNC packet is never held; compressed channels, sources
 * whose destination may not read a zero list, packets before the main channel's block list, a failing judge and
 * a corrupt channel all pass unchanged, with the reason in the report.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { CATEGORY } from "../../src/introspect/classifier.ts";
import { type MultifdPruneOptions, MultifdPruningProcessor } from "../../src/prune/multifd-processor.ts";
import type { PageJudge, PageRef, RamBlock } from "../../src/prune/page-judge.ts";
import type { Segment } from "../../src/prune/pruning-processor.ts";
import { type MultifdEvent, MultifdParser } from "../../src/stream/multifd.ts";
import { INIT_BYTES, RAM, ramHeaderBytes } from "../../src/stream/multifd-wire.ts";
import { type FixtureName, multifdFixture } from "../support/multifd-fixtures.ts";

const HEADER = ramHeaderBytes(4096);

/** Pages with (offset / 4096) % 3 === 0 are free; the judge notes when it was called (bytes pushed so far). */
function tableJudge(
  pushed: () => number,
  failOnCall?: number,
): PageJudge & { calls: { pages: PageRef[]; atByte: number }[] } {
  const calls: { pages: PageRef[]; atByte: number }[] = [];
  return {
    description: "table",
    calls,
    judge(pages) {
      calls.push({ pages: [...pages], atByte: pushed() });
      if (calls.length === failOnCall) throw new Error("struct pages unreadable");
      return Uint8Array.from(pages, (p) =>
        (p.blockOffset / 4096) % 3 === 0 ? CATEGORY.free : CATEGORY.anonymous,
      );
    },
  };
}

function blockMap(blocks: RamBlock[]): Map<string, RamBlock> {
  return new Map(blocks.map((b) => [b.idstr, b]));
}

interface Run {
  output: Buffer;
  processor: MultifdPruningProcessor;
  judge: ReturnType<typeof tableJudge>;
}

function run(
  name: FixtureName,
  chunk: number,
  options: Partial<MultifdPruneOptions> = {},
  input = multifdFixture(name).bytes,
  failOnCall?: number,
): Run {
  let pushed = 0;
  const judge = tableJudge(() => pushed, failOnCall);
  const processor = new MultifdPruningProcessor(judge, 1, {
    drop: ["free"],
    zeroList: true,
    ramBlocks: () => blockMap(multifdFixture(name).ramBlocks),
    ...options,
  });
  const out: Buffer[] = [];
  for (let at = 0; at < input.length; at += chunk) {
    const piece = input.subarray(at, at + chunk);
    pushed += piece.length;
    out.push(...processor.push(piece));
  }
  out.push(...processor.end());
  return { output: Buffer.concat(out), processor, judge };
}

function events(bytes: Buffer): MultifdEvent[] {
  const parser = new MultifdParser();
  return [...parser.push(bytes), ...parser.end()];
}

/** Each RAM packet: its header and its pages (4 KiB each, normal list order). */
function packets(
  bytes: Buffer,
): { header: Extract<MultifdEvent, { kind: "ram" }>["header"]; pages: Buffer[] }[] {
  const out: { header: Extract<MultifdEvent, { kind: "ram" }>["header"]; pages: Buffer[] }[] = [];
  let payload: Buffer[] = [];
  for (const e of events(bytes)) {
    if (e.kind === "ram") {
      out.push({ header: e.header, pages: [] });
      payload = [];
    } else if (e.kind === "payload") {
      payload.push(e.bytes);
      if (e.endsPacket) {
        const all = Buffer.concat(payload);
        const last = out[out.length - 1];
        if (last) for (let i = 0; i < all.length; i += 4096) last.pages.push(all.subarray(i, i + 4096));
      }
    }
  }
  return out;
}

const isFree = (offset: number) => (offset / 4096) % 3 === 0;

test("free normal pages move to the zero list, the rest is QEMU's, for any chunking (QEMU 10.0 channels)", () => {
  for (const name of ["qemu10-nocomp-channel1", "qemu10-nocomp-channel2"] as const) {
    const input = multifdFixture(name).bytes;
    const before = packets(input);
    let reference: Buffer | undefined;
    for (const chunk of [input.length, 1, 1000, 4096 + 9]) {
      const { output, processor } = run(name, chunk);
      reference ??= output;
      assert.ok(output.equals(reference), `${name}: chunks of ${chunk} give the same output`);
      assert.ok(output.subarray(0, INIT_BYTES).equals(input.subarray(0, INIT_BYTES)), "the init is QEMU's");
      const after = packets(output);
      assert.equal(after.length, before.length);
      let pruned = 0;
      for (const [i, b] of before.entries()) {
        const a = after[i];
        assert.ok(a);
        const normal = b.header.offsets.slice(0, b.header.normalPages);
        const kept = normal.map((o, k) => ({ o, page: b.pages[k] })).filter(({ o }) => !isFree(o));
        const moved = normal.filter(isFree);
        pruned += moved.length;
        assert.deepEqual(
          a.header.offsets.slice(0, a.header.normalPages),
          kept.map((k) => k.o),
        );
        assert.deepEqual(a.header.offsets.slice(a.header.normalPages), [
          ...moved,
          ...b.header.offsets.slice(b.header.normalPages),
        ]);
        assert.equal(a.header.pagesAlloc, b.header.pagesAlloc);
        assert.equal(a.header.packetNum, b.header.packetNum);
        assert.deepEqual(
          a.pages,
          kept.map((k) => k.page),
          "kept pages are QEMU's bytes",
        );
      }
      const r = processor.report();
      assert.ok(pruned > 0, `${name}: the fixture has pages the table calls free`);
      assert.equal(r.pagesPruned, pruned);
      assert.equal(r.bytesSaved, pruned * 4096);
      assert.equal(input.length - output.length, r.bytesSaved);
      assert.equal(r.byCategory.free, pruned);
      assert.equal(r.channelId, name.endsWith("1") ? 0 : 1);
      assert.equal(r.unpruned, null);
    }
  }
});

test("the judge sees a packet only once all of it arrived (invariant 1), and a SYNC packet is never held", () => {
  const name = "qemu10-nocomp-channel1";
  const input = multifdFixture(name).bytes;
  const ends = new Map<number, number>();
  let start = 0;
  for (const e of events(input)) {
    if (e.kind === "ram") start = e.offset;
    if (e.kind === "payload" && e.endsPacket) ends.set(start, e.offset + e.bytes.length);
  }
  const { judge } = run(name, 333);
  assert.ok(judge.calls.length > 0);
  const packetEnds = [...ends.values()];
  for (const call of judge.calls)
    assert.ok(
      packetEnds.some((end) => call.atByte >= end && call.atByte < end + 333),
      `judged at byte ${call.atByte}, after its packet ended`,
    );

  // The init and the first packet (10.0's SYNC, no pages) come out as soon as they are in.
  const processor = new MultifdPruningProcessor(
    tableJudge(() => 0),
    1,
    {
      drop: ["free"],
      zeroList: true,
      ramBlocks: () => blockMap(multifdFixture(name).ramBlocks),
    },
  );
  const head = input.subarray(0, INIT_BYTES + HEADER);
  assert.ok(Buffer.concat(processor.push(head)).equals(head), "the SYNC packet was not held");
  // Of a packet with pages, nothing goes out before its last byte; then all of it.
  const next = input.subarray(INIT_BYTES + HEADER, (ends.get(INIT_BYTES + HEADER) as number) - 1);
  assert.equal(Buffer.concat(processor.push(next)).length, 0, "held while it arrives");
  const last = input.subarray(next.length + head.length, next.length + head.length + 1);
  assert.ok(Buffer.concat(processor.push(last)).length > HEADER, "released with its last byte");
});

function unchanged(
  name: FixtureName,
  options: Partial<MultifdPruneOptions>,
  reason: RegExp,
  failOnCall?: number,
) {
  const input = multifdFixture(name).bytes;
  for (const chunk of [input.length, 777]) {
    const { output, processor } = run(name, chunk, options, input, failOnCall);
    assert.ok(output.equals(input), `${name}: unchanged (chunks of ${chunk})`);
    const r = processor.report();
    const reasons = [r.unpruned ?? "", ...r.unjudged.map((u) => u.reason)].join("; ");
    assert.match(reasons, reason);
    if (!failOnCall) assert.equal(r.pagesPruned, 0);
  }
}

test("a zstd channel passes unchanged, the reason in the report", () => {
  unchanged("qemu10-zstd-channel1", {}, /^zstd compression: .* relayed unchanged from packet \d+ on/);
});

test("a destination that may not read the zero list: every packet passes, with the reason (QEMU 7.2)", () => {
  const why = "the source QEMU is 7.2.0: its multifd packets have no zero-page list";
  unchanged("qemu72-nocomp-channel1", { zeroList: why }, /source QEMU is 7\.2\.0/);
  const r = run("qemu72-nocomp-channel1", 4096, { zeroList: why }).processor.report();
  assert.equal(r.unjudged[0]?.pages, r.normalPages, "every page with bytes counted unjudged");
});

test("packets before the main channel's block list, or of a block it lacks, pass unjudged", () => {
  unchanged(
    "qemu10-nocomp-channel1",
    { ramBlocks: () => "it arrived before the main channel's RAM block list" },
    /before the main channel's RAM block list/,
  );
  unchanged(
    "qemu10-nocomp-channel1",
    { ramBlocks: () => new Map() },
    /RAM block 'ram0' is not in the main channel's block list/,
  );
});

test("pages outside their block are not judged", () => {
  const { processor, judge } = run("qemu10-nocomp-channel1", 4096, {
    ramBlocks: () => blockMap([{ idstr: "ram0", length: 4096 }]),
  });
  for (const call of judge.calls) for (const p of call.pages) assert.equal(p.blockOffset, 0);
  assert.ok(processor.report().pagesJudged < processor.report().normalPages);
});

test("a judge that fails passes the rest unchanged; a dry run counts but changes nothing", () => {
  unchanged("qemu10-nocomp-channel1", {}, /introspection failed mid-way: struct pages unreadable/, 1);
  const input = multifdFixture("qemu10-nocomp-channel1").bytes;
  const dry = run("qemu10-nocomp-channel1", 1000, { dryRun: true });
  assert.ok(dry.output.equals(input));
  assert.ok(dry.processor.report().pagesPruned > 0);
  unchanged("qemu10-nocomp-channel1", { drop: [] }, /free pages are not asked to be dropped/);
});

test("a corrupt channel: what came before is pruned, the rest passes unchanged from the bad packet on", () => {
  const input = Buffer.from(multifdFixture("qemu10-nocomp-channel2").bytes);
  const starts = events(input).flatMap((e) => (e.kind === "ram" ? [e.offset] : []));
  const bad = starts[3] as number;
  input.writeUInt32BE(0xdeadbeef, bad + RAM.magic);
  const clean = run("qemu10-nocomp-channel2", input.length, {}, input.subarray(0, bad));
  for (const chunk of [input.length, 500]) {
    const { output, processor } = run("qemu10-nocomp-channel2", chunk, {}, input);
    assert.ok(
      output.subarray(output.length - (input.length - bad)).equals(input.subarray(bad)),
      "the rest unchanged",
    );
    assert.ok(
      output.subarray(0, output.length - (input.length - bad)).equals(clean.output),
      "before: pruned",
    );
    assert.match(processor.report().unpruned ?? "", /byte \d+: packet magic 0xdeadbeef.*relayed unparsed/);
  }
  // A channel that is not multifd at all (postcopy preempt, a stray main channel) passes too.
  const notMultifd = Buffer.from(input);
  notMultifd.writeUInt32BE(0x5145564d, 0);
  const { output } = run("qemu10-nocomp-channel2", 100, {}, notMultifd);
  assert.ok(output.equals(notMultifd));
});

/** What receive writes for segments: bytes as they are, a reference's page from `pages` (filesystem offset / 4096), zeros. */
function rebuild(segments: Segment[], pages: ReadonlyMap<number, Buffer>): Buffer {
  return Buffer.concat(
    segments.flatMap((s) => {
      if (s.kind === "bytes") return s.buffers;
      if (s.kind === "zeros") return [Buffer.alloc(s.pages * 4096)];
      const page = pages.get(s.target.kind === "filesystem" ? s.target.offset / 4096 : -1);
      assert.ok(page, "the reference names a page the index placed");
      assert.equal(s.pageHeader.length, 0, "a reference inside a packet has no record header");
      return [page];
    }),
  );
}

/**
 * Cache pages as references inside packets (link 1.3): a table judge calls pages with (offset / 4096) % 3 === 1
 * cache, a fake index places each at a filesystem offset of its own; the segments, with each reference replaced
 * by the page bytes it stands for (what receive writes), must be the channel with free pages moved, for any
 * chunking, and a receiver that takes no references inside packets gets no reference.
 */
test("cache pages become bare filesystem references inside packets; rebuilt, the channel is QEMU's (free moved)", () => {
  const name = "qemu10-nocomp-channel1";
  const input = multifdFixture(name).bytes;
  const isCache = (offset: number) => (offset / 4096) % 3 === 1;
  const expected = run(name, input.length).output; // free pages moved, nothing else changed
  for (const chunk of [input.length, 1000, 4096 + 9]) {
    const judge: PageJudge = {
      description: "table",
      judge: (pages) =>
        Uint8Array.from(pages, (p) =>
          isFree(p.blockOffset)
            ? CATEGORY.free
            : isCache(p.blockOffset)
              ? CATEGORY.cache
              : CATEGORY.anonymous,
        ),
      pfnOf: (p) => p.blockOffset / 4096,
    };
    const placed = new Map<number, Buffer>();
    const uuid = Buffer.alloc(16, 7);
    const processor = new MultifdPruningProcessor(judge, 1, {
      drop: ["free", "cache"],
      zeroList: true,
      ramBlocks: () => blockMap(multifdFixture(name).ramBlocks),
      cacheIndex: {
        lookup(page, pfn, accepted) {
          assert.equal(accepted.filesystem, true);
          placed.set(pfn, Buffer.from(page));
          return { target: { kind: "filesystem", uuid, offset: pfn * 4096 }, hash: Buffer.alloc(32) };
        },
      },
    });
    const segments: Segment[] = [];
    const all = { index: true, filesystem: true, multifd: true };
    for (let at = 0; at < input.length; at += chunk)
      segments.push(...processor.pushSegments(input.subarray(at, at + chunk), all));
    segments.push(...processor.endSegments(all));
    const refs = segments.filter((x) => x.kind === "ref").length;
    assert.ok(
      rebuild(segments, placed).equals(expected),
      `chunks of ${chunk}: rebuilt channel = free-pruned channel`,
    );
    const report = processor.report();
    assert.ok(
      refs > 0 && refs === report.pagesReferenced,
      `${refs} references, reported ${report.pagesReferenced}`,
    );
    assert.equal(report.cacheMisses, 0);
    // The same processor for a receiver without references inside packets: no reference, cache pages whole.
    const plain = new MultifdPruningProcessor(judge, 1, {
      drop: ["free", "cache"],
      zeroList: true,
      ramBlocks: () => blockMap(multifdFixture(name).ramBlocks),
      cacheIndex: { lookup: () => assert.fail("no lookup without references") },
    });
    const none = { index: true, filesystem: true, multifd: false };
    const out = [...plain.pushSegments(input, none), ...plain.endSegments(none)];
    assert.ok(out.every((s) => s.kind === "bytes"));
    assert.ok(Buffer.concat(out.flatMap((s) => (s.kind === "bytes" ? s.buffers : []))).equals(expected));
  }
});

test("a 7.2 destination (no zero list): free pages stay, cache pages still become references", () => {
  const name = "qemu10-nocomp-channel1";
  const input = multifdFixture(name).bytes;
  const judge: PageJudge = {
    description: "table",
    judge: (pages) =>
      Uint8Array.from(pages, (p) => ((p.blockOffset / 4096) % 2 === 0 ? CATEGORY.cache : CATEGORY.free)),
    pfnOf: (p) => p.blockOffset / 4096,
  };
  const pages = new Map<number, Buffer>();
  const processor = new MultifdPruningProcessor(judge, 1, {
    drop: ["free", "cache"],
    zeroList: "the source QEMU is 7.2",
    ramBlocks: () => blockMap(multifdFixture(name).ramBlocks),
    cacheIndex: {
      lookup(page, pfn) {
        pages.set(pfn, Buffer.from(page));
        return {
          target: { kind: "filesystem", uuid: Buffer.alloc(16), offset: pfn * 4096 },
          hash: Buffer.alloc(32),
        };
      },
    },
  });
  const all = { index: true, filesystem: true, multifd: true };
  const segments = [...processor.pushSegments(input, all), ...processor.endSegments(all)];
  assert.ok(
    rebuild(segments, pages).equals(input),
    "rebuilt, the channel is exactly QEMU's: no page moved to the zero list",
  );
  const report = processor.report();
  assert.ok(report.pagesReferenced > 0);
  assert.equal(report.pagesPruned, report.pagesReferenced, "only references: free pages went whole");
});

test("a 7.2 destination through a receiver that writes zeros: free pages become ZEROS in place, nothing else changes", () => {
  for (const name of ["qemu10-nocomp-channel1", "qemu72-nocomp-channel1"] as const) {
    const input = multifdFixture(name).bytes;
    // Expected: the input with every free normal page's bytes zeroed (headers and the rest unchanged).
    const expected = Buffer.from(input);
    let free = 0;
    let offset = 0;
    for (const e of events(input)) {
      if (e.kind === "ram") {
        const normal = e.header.offsets.slice(0, e.header.normalPages);
        normal.forEach((o, k) => {
          if (!isFree(o)) return;
          const at = offset + e.bytes.length + k * 4096;
          expected.fill(0, at, at + 4096);
          free++;
        });
      }
      offset += e.bytes.length;
    }
    assert.ok(free > 0, `${name}: the table calls some pages free`);
    for (const chunk of [input.length, 777]) {
      let pushed = 0;
      const judge = tableJudge(() => pushed);
      const processor = new MultifdPruningProcessor(judge, 1, {
        drop: ["free"],
        zeroList: "the source QEMU is 7.2",
        ramBlocks: () => blockMap(multifdFixture(name).ramBlocks),
      });
      const segments: Segment[] = [];
      const refs = { index: false, filesystem: false, zeroFill: true };
      for (let at = 0; at < input.length; at += chunk) {
        const piece = input.subarray(at, at + chunk);
        pushed += piece.length;
        segments.push(...processor.pushSegments(piece, refs));
      }
      segments.push(...processor.endSegments(refs));
      assert.equal(processor.report().pagesPruned, free, `${name}: every free page pruned`);
      assert.ok(
        segments.some((x) => x.kind === "zeros"),
        `${name}: as ZEROS`,
      );
      assert.ok(
        rebuild(segments, new Map()).equals(expected),
        `${name}, chunks of ${chunk}: rebuilt = input, free pages zeroed`,
      );
    }
  }
});
