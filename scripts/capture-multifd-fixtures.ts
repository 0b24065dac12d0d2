/**
 * Captures real multifd channels from the lab for test/fixtures/multifd/: a 512 MiB guest (kernel 6.12) with
 * churned free pages migrates with multifd (2 channels) into a ChannelTap, once per QEMU setup below. Each
 * multifd channel is cut to its MultiFDInit_t and a few verbatim packets (the SYNC packets and those with the
 * fewest pages, in their original order, at most FIXTURE_PAGES pages), gzipped, with a JSON file saying where
 * they came from and the RAM block list of the main channel. Run: node --import tsx scripts/capture-multifd-fixtures.ts
 */
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { gzipSync } from "node:zlib";
import { ChannelTap } from "../src/lab/channel-tap.ts";
import { LabPair } from "../src/lab/lab-vm.ts";
import type { QemuVersion } from "../src/lab/qemu-binaries.ts";
import { workload } from "../src/lab/workloads.ts";
import { runMigration } from "../src/qemu/migration.ts";
import { MultifdParser, type RamPacketHeader } from "../src/stream/multifd.ts";
import { StreamParser } from "../src/stream/parser.ts";

const OUT = join(import.meta.dirname, "../test/fixtures/multifd");
/** Pages kept per channel fixture (4 KiB each): keeps the files small. */
const FIXTURE_PAGES = 48;

interface Setup {
  name: string;
  qemu: QemuVersion;
  parameters: Record<string, unknown>;
}

const SETUPS: Setup[] = [
  { name: "qemu10-nocomp", qemu: "10.0", parameters: { "multifd-channels": 2 } },
  { name: "qemu10-zstd", qemu: "10.0", parameters: { "multifd-channels": 2, "multifd-compression": "zstd" } },
  { name: "qemu72-nocomp", qemu: "7.2", parameters: { "multifd-channels": 2 } },
];

interface Packet {
  bytes: Buffer;
  header: RamPacketHeader | null;
}

/** The init, then every packet of a channel with its payload, verbatim. */
function packets(channel: Buffer): { init: Buffer; packets: Packet[] } {
  const parser = new MultifdParser();
  let init: Buffer | undefined;
  const out: Packet[] = [];
  let current: Buffer[] = [];
  let header: RamPacketHeader | null = null;
  for (const e of [...parser.push(channel), ...parser.end()]) {
    if (e.kind === "init") init = e.bytes;
    else if (e.kind === "ram" || e.kind === "device") {
      current = [e.bytes];
      header = e.kind === "ram" ? e.header : null;
      if (e.payloadBytes === 0) out.push({ bytes: Buffer.concat(current), header });
    } else if (e.kind === "payload") {
      current.push(e.bytes);
      if (e.endsPacket) out.push({ bytes: Buffer.concat(current), header });
    } else throw new Error(`unparsed bytes at ${e.offset}`);
  }
  if (!init) throw new Error("no MultiFDInit_t");
  return { init, packets: out };
}

/** SYNC/empty packets (up to 3) and the packets with the fewest normal pages, in channel order. */
function cut(all: Packet[]): Packet[] {
  const empty = all.filter((p) => (p.header?.normalPages ?? 0) === 0).slice(0, 3);
  const withPages = all
    .map((p, i) => ({ p, i }))
    .filter(({ p }) => (p.header?.normalPages ?? 0) > 0)
    .sort((a, b) => (a.p.header?.normalPages ?? 0) - (b.p.header?.normalPages ?? 0));
  const keep = new Set(empty.map((p) => all.indexOf(p)));
  let pages = 0;
  for (const { p, i } of withPages) {
    const n = p.header?.normalPages ?? 0;
    if (pages + n > FIXTURE_PAGES && pages > 0) break;
    keep.add(i);
    pages += n;
  }
  return all.filter((_, i) => keep.has(i));
}

async function capture(setup: Setup): Promise<void> {
  const pair = await LabPair.boot({ kernel: "6.12", qemu: setup.qemu, memoryMiB: 512 });
  const dir = await mkdtemp(join(tmpdir(), "multifd-capture-"));
  try {
    await pair.src.agent.run(workload.churn("64M", 1), 60_000);
    const tap = await ChannelTap.start(dir);
    const result = await runMigration(pair.src.monitor, tap.uri, {
      capabilities: { multifd: true },
      parameters: setup.parameters,
    });
    const connections = await tap.close();
    const version = (await pair.src.monitor.execute("query-version")).qemu;
    const main = new StreamParser({ onError: "passthrough" });
    const blocks = main
      .push(await readFile(join(dir, "connection-0.bin")))
      .flatMap((r) => (r.kind === "ram" && r.type === "memSize" ? r.blocks : []));
    for (let k = 1; k < connections; k++) {
      const { init, packets: all } = packets(await readFile(join(dir, `connection-${k}.bin`)));
      const kept = cut(all);
      const bytes = Buffer.concat([init, ...kept.map((p) => p.bytes)]);
      const base = `${setup.name}-channel${k}`;
      await writeFile(join(OUT, `${base}.bin.gz`), gzipSync(bytes, { level: 9 }));
      await writeFile(
        join(OUT, `${base}.json`),
        `${JSON.stringify(
          {
            source: `QEMU ${version.major}.${version.minor}.${version.micro} (lab), kernel 6.12, 512 MiB, after vmwork churn 64M 1; multifd capability, parameters ${JSON.stringify(setup.parameters)}; migrated into a ChannelTap (src/lab/channel-tap.ts) by scripts/capture-multifd-fixtures.ts`,
            connection: k,
            packetsInChannel: all.length,
            packetsKept: kept.map((p) => String(p.header?.packetNum ?? "device")),
            bytes: bytes.length,
            ramBlocks: blocks.map((b) => ({ idstr: b.idstr, length: b.length })),
            qemuCounters: result.info.ram,
          },
          null,
          2,
        )}\n`,
      );
      console.error(`${base}: ${all.length} packets, kept ${kept.length} (${bytes.length} bytes)`);
    }
  } finally {
    await pair.stop();
    await rm(dir, { recursive: true, force: true });
  }
}

for (const setup of SETUPS) await capture(setup);
