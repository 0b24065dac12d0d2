/**
 * When send makes references (link-send.ts RefsWhen), on a real link socket after a real handshake: with
 * "link-busy" (the default), clean cache pages go whole while the link has room, and as references once bytes
 * queue for it (the peer stops reading), unless the link was measured draining faster than references pay for;
 * with "always", as references from the first page. The pruning processor counts the pages it sent whole for
 * that reason.
 */
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { once } from "node:events";
import { connect, createServer, Socket } from "node:net";
import { type TestContext, test } from "node:test";
import { CATEGORY } from "../../src/introspect/classifier.ts";
import { serverHandshake } from "../../src/link/handshake.ts";
import { CAPABILITY, encodeMessage, type Load, MSG } from "../../src/link/protocol.ts";
import { LinkSendCodec, REFS_WHEN_QUEUED_BYTES, type RefsWhen } from "../../src/migrate/link-send.ts";
import type { PageJudge } from "../../src/prune/page-judge.ts";
import { PruningProcessor } from "../../src/prune/pruning-processor.ts";
import type { PageHeader } from "../../src/stream/records.ts";
import { encodeRecord } from "../../src/stream/writer.ts";
import { ramStreamOpening } from "../support/stream-records.ts";

const BLOCK = "ram0";
const PAGES = 4096; // 16 MiB of cache pages, more than the queue that switches to references

const header = (addr: number, first: boolean): PageHeader => ({
  addr,
  flags: 0x08 | (first ? 0 : 0x20),
  idstr: first ? BLOCK : null,
  block: BLOCK,
});

/** A stream's start (header, MEM_SIZE), then PAGES cache pages of distinct bytes, each its own chunk. */
function streamChunks(): Buffer[] {
  const start = ramStreamOpening([{ idstr: BLOCK, length: PAGES * 4096 }]);
  const chunks = [Buffer.concat(start.flatMap(encodeRecord))];
  for (let i = 0; i < PAGES; i++) {
    const data = Buffer.alloc(4096, i % 251);
    data.writeUInt32LE(i, 0);
    chunks.push(
      Buffer.concat(
        encodeRecord({ kind: "ram", type: "page", offset: 0, header: header(i * 4096, i === 0), data }),
      ),
    );
  }
  return chunks;
}

/** Every page is clean cache, and every one is on the shared disk. */
function cacheProcessor(): PruningProcessor {
  const judge: PageJudge = {
    description: "all cache",
    judge: (pages) => new Uint8Array(pages.length).fill(CATEGORY.cache),
  };
  const cacheIndex = {
    lookup: (page: Buffer) => ({
      target: { kind: "index" as const, block: page.readUInt32LE(0) },
      hash: Buffer.alloc(32),
    }),
  };
  return new PruningProcessor(judge, { drop: ["free", "cache"], cacheIndex });
}

/** What a receive says in its LOADs (link "Load reports"), sent every LOAD_EVERY_MS after the handshake. */
type ReceiveLoad = Omit<Load, "type">;
const LOAD_EVERY_MS = 20;

/**
 * A receive that completes the handshake and then reads nothing (or, with `readEveryMs`, 4 KiB that often):
 * bytes queue on send's side once the kernel's buffers are full. With `load`, it offers load reports and sends
 * that LOAD over and over.
 */
async function stalledReceive(
  t: TestContext,
  psk: Buffer,
  readEveryMs?: number,
  load?: ReceiveLoad,
): Promise<Socket> {
  const server = createServer((socket) => {
    socket.on("error", () => {});
    void serverHandshake(socket, {
      psk,
      capabilities: [
        CAPABILITY.REF_SHA256,
        CAPABILITY.REF_FS_SHA256,
        CAPABILITY.ZERO_FILL,
        ...(load ? [CAPABILITY.LOAD_REPORT] : []),
      ],
    }).then(() => {
      socket.pause();
      if (load) {
        const loads = setInterval(
          () => socket.write(encodeMessage({ type: MSG.LOAD, ...load })),
          LOAD_EVERY_MS,
        );
        t.after(() => clearInterval(loads));
      }
      if (readEveryMs === undefined) return;
      const timer = setInterval(() => socket.read(4096), readEveryMs);
      t.after(() => clearInterval(timer));
    });
    t.after(() => socket.destroy());
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  t.after(() => server.close());
  const address = server.address();
  assert.ok(address && typeof address === "object");
  const upstream = connect({ host: "127.0.0.1", port: address.port });
  upstream.on("error", () => {});
  t.after(() => upstream.destroy());
  await once(upstream, "connect");
  return upstream;
}

/** Feeds the stream through a codec towards a receive that reads nothing; where the first reference came. */
async function migrate(
  t: TestContext,
  {
    refsWhen,
    slow,
    queueBoundBytes,
    load,
    receiveOnThisHost,
  }: {
    refsWhen?: RefsWhen;
    slow?: { readEveryMs: number; waitMs: number; refsPayBelowBytesPerSecond?: number };
    queueBoundBytes?: number;
    load?: ReceiveLoad;
    /** Default false: the test's receive, on loopback, stands for one across a network; "detect": as send does. */
    receiveOnThisHost?: boolean | "detect";
  } = {},
): Promise<{
  processor: PruningProcessor;
  queuedAtFirstRef: number | null;
  wholeAfterRefs: number;
  refsWithShortQueue: number;
  maxQueued: number;
}> {
  const psk = randomBytes(32);
  const upstream = await stalledReceive(t, psk, slow?.readEveryMs, load);
  const processor = cacheProcessor();
  const codec = new LinkSendCodec(0, {
    psk,
    processor,
    ...(refsWhen ? { refsWhen } : {}),
    ...(slow?.refsPayBelowBytesPerSecond !== undefined
      ? { refsPayBelowBytesPerSecond: slow.refsPayBelowBytesPerSecond }
      : {}),
    ...(queueBoundBytes ? { queueBoundBytes: () => queueBoundBytes } : {}),
    // A loaded test host may stall longer than the default freshness between two LOADs.
    loadFreshMs: 60_000,
    ...(receiveOnThisHost === "detect" ? {} : { receiveOnThisHost: receiveOnThisHost ?? false }),
  });
  await codec.open({ source: new Socket(), upstream });
  if (load) {
    // receive's answers go to the codec, as the relay hands them over; start once the first LOAD arrived.
    upstream.on("data", (chunk: Buffer) => codec.fromUpstream(chunk));
    upstream.resume();
    while (codec.loadReports === 0) await new Promise((resolve) => setTimeout(resolve, LOAD_EVERY_MS));
  }
  let queuedAtFirstRef: number | null = null;
  let wholeAfterRefs = 0;
  let refsWithShortQueue = 0;
  let maxQueued = 0;
  for (const chunk of streamChunks()) {
    const queued = upstream.writableLength;
    maxQueued = Math.max(maxQueued, queued);
    const before = processor.report();
    for (const frame of codec.fromSource(chunk).toUpstream ?? []) upstream.write(frame);
    const after = processor.report();
    if (queuedAtFirstRef === null && after.refs > before.refs) queuedAtFirstRef = queued;
    if (queuedAtFirstRef !== null && queued >= REFS_WHEN_QUEUED_BYTES)
      wholeAfterRefs += after.cacheWhole - before.cacheWhole;
    if (queued < REFS_WHEN_QUEUED_BYTES) refsWithShortQueue += after.refs - before.refs;
    // Let the socket hand what it can to the kernel, as the event loop does between the source's reads; with a
    // slow receive, the source waits as the relay's backpressure would make it.
    const busyAt = Math.min(REFS_WHEN_QUEUED_BYTES, (queueBoundBytes ?? Number.POSITIVE_INFINITY) / 4);
    if (queued < busyAt) await new Promise((resolve) => setImmediate(resolve));
    else if (slow) await new Promise((resolve) => setTimeout(resolve, slow.waitMs));
  }
  return { processor, queuedAtFirstRef, wholeAfterRefs, refsWithShortQueue, maxQueued };
}

test("link-busy: cache pages go whole while the link has room, as references once bytes queue for it", async (t) => {
  const { processor, queuedAtFirstRef } = await migrate(t);
  const r = processor.report();
  t.diagnostic(
    `${r.cacheWhole} whole, ${r.refs} references; first reference at ${queuedAtFirstRef} B queued`,
  );
  assert.ok(r.cacheWhole > 0, "pages went whole while the link had room");
  assert.ok(r.refs > 0, "references once the link was backed up");
  assert.ok(
    queuedAtFirstRef !== null && queuedAtFirstRef >= REFS_WHEN_QUEUED_BYTES,
    `no reference before ${REFS_WHEN_QUEUED_BYTES} B queued (first at ${queuedAtFirstRef})`,
  );
  assert.equal(r.cacheWhole + r.refs, PAGES, "every cache page went one way or the other");
  assert.equal(r.cacheMisses, 0);
});

test("link-busy under a small relay bound (a slow link near the end): references from a quarter of it", async (t) => {
  const bound = 512 * 1024;
  const { processor, queuedAtFirstRef } = await migrate(t, { queueBoundBytes: bound });
  const r = processor.report();
  t.diagnostic(
    `${r.cacheWhole} whole, ${r.refs} references; first reference at ${queuedAtFirstRef} B queued`,
  );
  assert.ok(r.refs > 0, "references although 2 MiB never queue under this bound");
  assert.ok(
    queuedAtFirstRef !== null && queuedAtFirstRef >= bound / 4 && queuedAtFirstRef < REFS_WHEN_QUEUED_BYTES,
    `the first reference at a quarter of the bound (${queuedAtFirstRef} B queued)`,
  );
});

test("link-busy: a backed-up link measured faster than references pay for gets whole pages again", async (t) => {
  // The receive reads 4 KiB every 2 ms, slower than the source: bytes queue, and the link drains at a rate the
  // meter can measure; any
  // measured rate counts as fast here (1 B/s), so once 500 ms of backlog gave a rate, pages go whole again.
  const { processor, queuedAtFirstRef, wholeAfterRefs } = await migrate(t, {
    slow: { readEveryMs: 2, waitMs: 1, refsPayBelowBytesPerSecond: 1 },
  });
  const r = processor.report();
  t.diagnostic(
    `${r.cacheWhole} whole, ${r.refs} references, ${wholeAfterRefs} whole with bytes queued after`,
  );
  assert.ok(queuedAtFirstRef !== null, "references while the link's rate was unknown");
  assert.ok(wholeAfterRefs > 0, "whole pages with bytes queued, once the link measured fast");
  assert.equal(r.cacheWhole + r.refs, PAGES);
});

test("link-busy: a link measured slower than references pay for gets them even while little queues", async (t) => {
  // The receive reads 4 KiB every 2 ms (2 MB/s): once 500 ms of backlog measured that, far below
  // REFS_PAY_BELOW_BYTES_PER_SECOND, references go on while the queue they shrink is short. (Before a rate is
  // measured, only a queue of REFS_WHEN_QUEUED_BYTES makes them.)
  const { processor, refsWithShortQueue } = await migrate(t, { slow: { readEveryMs: 2, waitMs: 1 } });
  const r = processor.report();
  t.diagnostic(
    `${r.cacheWhole} whole, ${r.refs} references, ${refsWithShortQueue} of them with a short queue`,
  );
  assert.ok(refsWithShortQueue > 0, "references with less than the busy queue, once the link measured slow");
  assert.equal(r.cacheWhole + r.refs, PAGES);
});

test("link-busy: a receive on this host (loopback) gets whole pages however the link backs up", async (t) => {
  const { processor, maxQueued } = await migrate(t, { receiveOnThisHost: "detect" });
  const r = processor.report();
  t.diagnostic(`${r.cacheWhole} whole, ${r.refs} references; up to ${maxQueued} B queued`);
  assert.ok(maxQueued >= REFS_WHEN_QUEUED_BYTES, `the link backed up (${maxQueued} B queued)`);
  assert.equal(r.refs, 0, "no reference: no network lies between send and receive");
  assert.equal(r.cacheWhole, PAGES);
});

for (const { name, load, refs } of [
  { name: "its event loop busy", load: { busyPermille: 900, destinationQueuedBytes: 0 }, refs: false },
  {
    name: "bytes backed up towards its QEMU",
    load: { busyPermille: 100, destinationQueuedBytes: 4 * 1024 * 1024 },
    refs: false,
  },
  { name: "room (waiting on the link)", load: { busyPermille: 100, destinationQueuedBytes: 0 }, refs: true },
]) {
  test(`link-busy: a backed-up link whose receive reports ${name} gets ${refs ? "references" : "whole pages"}`, async (t) => {
    const { processor, queuedAtFirstRef } = await migrate(t, { load });
    const r = processor.report();
    t.diagnostic(
      `${r.cacheWhole} whole, ${r.refs} references; first reference at ${queuedAtFirstRef} B queued`,
    );
    assert.equal(r.cacheWhole + r.refs, PAGES);
    if (refs)
      assert.ok(r.refs > 0 && queuedAtFirstRef !== null && queuedAtFirstRef >= REFS_WHEN_QUEUED_BYTES);
    else assert.equal(r.refs, 0, "no reference while receive said it was what drained slowly");
  });
}

test("always: every cache page on the disk goes as a reference, from the first", async (t) => {
  const { processor, queuedAtFirstRef } = await migrate(t, { refsWhen: "always" });
  const r = processor.report();
  assert.equal(r.refs, PAGES);
  assert.equal(r.cacheWhole, 0);
  assert.equal(queuedAtFirstRef, 0, "the first page was a reference, with nothing queued");
});

test("the processor sends cache pages whole when told the link has room, and says how many", () => {
  const processor = cacheProcessor();
  const input = streamChunks();
  const out: Buffer[] = [];
  for (const chunk of input)
    for (const s of processor.pushSegments(chunk, {
      index: false,
      filesystem: false,
      zeroFill: true,
      linkHasRoom: true,
    }))
      if (s.kind === "bytes") out.push(...s.buffers);
      else assert.fail(`a ${s.kind} segment while the link has room`);
  assert.ok(Buffer.concat(out).equals(Buffer.concat(input)), "the stream goes on as it came");
  const r = processor.report();
  assert.equal(r.cacheWhole, PAGES);
  assert.equal(r.refs, 0);
  assert.equal(r.pages.byCategory.cache, PAGES);
});
