/**
 * Which RAMBlock a `--guest-memory` RAM file holds, learnt from the stream's block list (MEM_SIZE) before the
 * first page record: the block of the file's size, or the one named; what cannot be told is refused before any
 * page is judged, naming the blocks, and the stream then passes through unchanged. And the report's warning when
 * more than 1% of the judged pages were unknown, with the cause. The judge here is the real frame mapping of
 * every judge (FrameJudge) with a table in place of struct-page reads, over a sparse RAM file.
 */
import assert from "node:assert/strict";
import { mkdtempSync, rmSync, truncateSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, test } from "node:test";
import { CATEGORY } from "../../src/introspect/classifier.ts";
import { type GuestMemory, openRawSnapshot, type RamMapping } from "../../src/introspect/guest-memory.ts";
import { RAM_BELOW_4G_MAX_BYTES, rawFileLayout } from "../../src/migrate/guest-judge.ts";
import { FrameJudge, type RamBlock, type RamLayoutSource } from "../../src/prune/page-judge.ts";
import { PruningProcessor } from "../../src/prune/pruning-processor.ts";
import { StreamParser } from "../../src/stream/parser.ts";
import type { StreamRecord } from "../../src/stream/records.ts";
import { encodeRecord } from "../../src/stream/writer.ts";

const MiB = 1024 * 1024;
const PAGE = 4096;
const BLOCKS: RamBlock[] = [
  { idstr: "pc.ram", length: 512 * MiB },
  { idstr: "vga.vram", length: 16 * MiB },
];

const dir = mkdtempSync(join(tmpdir(), "vmprune-ram-blocks-"));
after(() => rmSync(dir, { recursive: true, force: true }));

/** A sparse RAM file of `bytes`, opened as guest memory (offset = guest-physical address). */
function ramFile(bytes: number): { path: string; memory: GuestMemory } {
  const path = join(dir, `${bytes / MiB}.ram`);
  writeFileSync(path, "");
  truncateSync(path, bytes);
  const memory = openRawSnapshot(path);
  after(() => memory.close());
  return { path, memory };
}

/** Frames in `free` are free, every other mapped frame anonymous: only the frame mapping is under test. */
class TableJudge extends FrameJudge {
  readonly description = "table";
  readonly framesAsked: number[] = [];
  constructor(
    memory: GuestMemory,
    layout: RamLayoutSource,
    private readonly free: Set<number>,
  ) {
    super(memory, layout);
  }
  protected classifyFrames(pfns: readonly number[]): Uint8Array {
    this.framesAsked.push(...pfns);
    return Uint8Array.from(pfns, (pfn) => (this.free.has(pfn) ? CATEGORY.free : CATEGORY.anonymous));
  }
}

const section = (type: "START" | "PART" | "END"): StreamRecord => ({
  kind: "section",
  offset: 0,
  type,
  sectionId: 2,
  idstr: type === "START" ? "ram" : null,
  instanceId: type === "START" ? 0 : null,
  versionId: type === "START" ? 4 : null,
});
const eos: StreamRecord[] = [
  { kind: "ram", type: "eos", offset: 0, value: 0x10 },
  { kind: "footer", offset: 0, sectionId: 2 },
];

/**
 * A stream whose block list is `blocks`, then PAGE records for `pages` (block, page index), with CONTINUE where
 * QEMU sets it.
 */
function stream(blocks: readonly RamBlock[], pages: readonly [string, number][]): Buffer {
  const records: StreamRecord[] = [
    { kind: "header", offset: 0, version: 3 },
    { kind: "configuration", offset: 0, machineType: "pc-q35-10.0", subsections: [] },
    section("START"),
    {
      kind: "ram",
      type: "memSize",
      offset: 0,
      total: blocks.reduce((a, b) => a + b.length, 0),
      flags: 0x04,
      blocks: blocks.map((b) => ({ ...b })),
    },
    ...eos,
    section("PART"),
  ];
  let last: string | null = null;
  for (const [block, index] of pages) {
    records.push({
      kind: "ram",
      type: "page",
      offset: 0,
      header: {
        addr: index * PAGE,
        flags: 0x08 | (block === last ? 0x20 : 0),
        idstr: block === last ? null : block,
        block,
      },
      data: Buffer.alloc(PAGE, (index % 250) + 1),
    });
    last = block;
  }
  records.push(...eos, section("END"), ...eos, { kind: "eof", offset: 0 });
  return Buffer.concat(records.flatMap(encodeRecord));
}

function run(processor: PruningProcessor, input: Buffer, chunk: number): Buffer {
  const out: Buffer[] = [];
  for (let at = 0; at < input.length; at += chunk)
    out.push(...processor.push(input.subarray(at, at + chunk)));
  out.push(...processor.end());
  return Buffer.concat(out);
}

function records(buf: Buffer): StreamRecord[] {
  const parser = new StreamParser();
  return [...parser.push(buf), ...parser.end()];
}

const PC_RAM_PAGES: [string, number][] = [0, 1, 2, 3, 1000, 131071].map((i) => ["pc.ram", i]);
const VRAM_PAGES: [string, number][] = [
  ["vga.vram", 0],
  ["vga.vram", 1],
];

test("a 512 MiB guest-memory file holds the stream's 512 MiB block: its pages are mapped and free ones pruned, for any chunking", () => {
  const { path, memory } = ramFile(512 * MiB);
  const input = stream(BLOCKS, [...PC_RAM_PAGES, ...VRAM_PAGES]);
  for (const chunk of [input.length, 1, PAGE + 9]) {
    const logs: string[] = [];
    const judge = new TableJudge(
      memory,
      rawFileLayout({ path, sizeBytes: memory.size, log: (l) => logs.push(l) }),
      new Set([1, 1000]),
    );
    const p = new PruningProcessor(judge, { drop: ["free"] });
    const output = run(p, input, chunk);
    const r = p.report();
    assert.equal(r.mode, "prune");
    assert.equal(r.degraded, null);
    assert.equal(r.pages.seen, 8);
    assert.equal(r.pages.pruned, 2, "pc.ram pages 1 and 1000 were free");
    assert.equal(r.pages.byCategory.anonymous, 4);
    assert.deepEqual(
      [...judge.framesAsked].sort((a, b) => a - b),
      [0, 1, 2, 3, 1000, 131071],
      "pc.ram's offsets are guest-physical frames; vga.vram is not guest RAM",
    );
    assert.equal(r.pages.byCategory.unknown, 2, "the two vga.vram pages");
    assert.match(logs.join("\n"), /holds RAM block 'pc\.ram'/);
    const zeroed = records(output).filter((x) => x.kind === "ram" && x.type === "zero");
    assert.deepEqual(
      zeroed.map((x) =>
        x.kind === "ram" && x.type === "zero" ? [x.header.block, x.header.addr / PAGE] : [],
      ),
      [
        ["pc.ram", 1],
        ["pc.ram", 1000],
      ],
    );
    // 2 of 8 judged pages unknown: the report says so, and why.
    assert.match(r.unknownWarning ?? "", /^2 of 8 judged pages \(25\.0%\) were unknown/);
    assert.match(
      r.unknownWarning ?? "",
      /2 pages of block 'vga\.vram' that are not guest RAM in the layout \(RAM blocks in it: 'pc\.ram'\)/,
    );
  }
});

test("a file no block is as large as: refused at the block list, before any page is judged, naming the blocks; the stream passes through", () => {
  const { path, memory } = ramFile(300 * MiB);
  const input = stream(BLOCKS, [...PC_RAM_PAGES, ...VRAM_PAGES]);
  for (const chunk of [input.length, 1]) {
    const logs: string[] = [];
    const judge = new TableJudge(
      memory,
      rawFileLayout({ path, sizeBytes: memory.size, chooseBlockHint: "--ram-block NAME" }),
      new Set([0, 1, 2, 3]),
    );
    const p = new PruningProcessor(judge, { drop: ["free"], log: (l) => logs.push(l) });
    assert.deepEqual(run(p, input, chunk), input, "every byte as it came");
    const r = p.report();
    assert.equal(r.mode, "passthrough");
    assert.equal(r.batches, 0, "no page was judged");
    assert.deepEqual(judge.framesAsked, []);
    assert.equal(r.pages.seen, 8);
    assert.equal(r.pages.pruned, 0);
    assert.match(
      r.degraded ?? "",
      /no RAM block is as large as the guest-memory file .*300\.ram \(300 MiB\)/,
    );
    assert.match(r.degraded ?? "", /'pc\.ram' \(512 MiB\), 'vga\.vram' \(16 MiB\)/);
    assert.match(r.degraded ?? "", /name the block the file holds \(--ram-block NAME\)/);
    assert.ok(
      logs.some(
        (l) => l.includes("'pc.ram' (512 MiB)") && l.includes("passing the rest of the stream through"),
      ),
      "said on the log at once",
    );
  }
});

test("a named block: used when the stream has it (the file may be larger), refused naming the blocks when it has not", () => {
  const { path, memory } = ramFile(600 * MiB);
  const input = stream(BLOCKS, PC_RAM_PAGES);
  const named = new PruningProcessor(
    new TableJudge(memory, rawFileLayout({ path, sizeBytes: memory.size, ramBlock: "pc.ram" }), new Set([3])),
    { drop: ["free"] },
  );
  run(named, input, 5000);
  assert.equal(named.report().degraded, null);
  assert.equal(named.report().pages.pruned, 1);
  assert.equal(named.report().unknownWarning, null);

  const missing = new PruningProcessor(
    new TableJudge(memory, rawFileLayout({ path, sizeBytes: memory.size, ramBlock: "ram0" }), new Set([3])),
    { drop: ["free"] },
  );
  assert.deepEqual(run(missing, input, 5000), input);
  assert.match(
    missing.report().degraded ?? "",
    /is to hold RAM block 'ram0', but this migration sends 'pc\.ram' \(512 MiB\), 'vga\.vram' \(16 MiB\)/,
  );
  assert.match(missing.report().degraded ?? "", /the ramBlock option/, "library words without a CLI hint");
});

test("ambiguous files are refused: two blocks of the file's size, a block larger than the file, a block that may be split around the PCI hole", () => {
  const decide = (sizeBytes: number, blocks: RamBlock[], ramBlock?: string) => {
    const layout = rawFileLayout({ path: "/ram", sizeBytes, ...(ramBlock ? { ramBlock } : {}) });
    assert.equal(typeof layout, "function");
    return (layout as (b: readonly RamBlock[]) => readonly RamMapping[] | string)(blocks);
  };
  assert.match(
    String(
      decide(256 * MiB, [
        { idstr: "node0", length: 256 * MiB },
        { idstr: "node1", length: 256 * MiB },
      ]),
    ),
    /^2 RAM blocks are as large as .*'node0' \(256 MiB\), 'node1' \(256 MiB\)/,
  );
  assert.match(
    String(decide(256 * MiB, BLOCKS, "pc.ram")),
    /'pc\.ram' \(512 MiB\) is larger than the guest-memory file/,
  );
  assert.match(
    String(decide(4 * 1024 * MiB, [{ idstr: "pc.ram", length: 4 * 1024 * MiB }])),
    /'pc\.ram' \(4 GiB\) may be split around the PCI hole.*QMP socket/,
  );
  assert.equal(
    typeof decide(RAM_BELOW_4G_MAX_BYTES, [{ idstr: "m", length: RAM_BELOW_4G_MAX_BYTES }]),
    "string",
  );
  assert.deepEqual(
    decide(RAM_BELOW_4G_MAX_BYTES - 4 * MiB, [{ idstr: "m", length: RAM_BELOW_4G_MAX_BYTES - 4 * MiB }]),
    [{ gpa: 0, size: RAM_BELOW_4G_MAX_BYTES - 4 * MiB, block: "m", blockOffset: 0 }],
  );
});

test("a layout that misses the stream's block (the old fixed 'ram0' guess for a backend 'mem0'): every page unknown, and the report says why", () => {
  const { memory } = ramFile(512 * MiB);
  const guess: RamMapping[] = [{ gpa: 0, size: 512 * MiB, block: "ram0", blockOffset: 0 }];
  const input = stream(
    [{ idstr: "mem0", length: 512 * MiB }],
    [0, 1, 2, 3].map((i) => ["mem0", i]),
  );
  const p = new PruningProcessor(new TableJudge(memory, guess, new Set([0, 1, 2, 3])), { drop: ["free"] });
  run(p, input, input.length);
  const r = p.report();
  assert.equal(r.pages.pruned, 0);
  assert.equal(r.pages.byCategory.unknown, 4);
  assert.equal(
    r.unknownWarning,
    "4 of 4 judged pages (100.0%) were unknown and not pruned: 4 pages of block 'mem0' that are not guest RAM in the layout (RAM blocks in it: 'ram0')",
  );

  // At most 1% unknown: no warning.
  const many: [string, number][] = Array.from({ length: 200 }, (_, i) => ["ram0", i]);
  const fine = new PruningProcessor(new TableJudge(memory, guess, new Set()), { drop: ["free"] });
  run(
    fine,
    stream(
      [
        { idstr: "ram0", length: 512 * MiB },
        { idstr: "pc.bios", length: 256 * 1024 },
      ],
      [...many, ["pc.bios", 0], ["pc.bios", 1]],
    ),
    1 << 20,
  );
  assert.equal(fine.report().pages.byCategory.unknown, 2);
  assert.equal(fine.report().unknownWarning, null);
});
