/**
 * The captured multifd channels of test/fixtures/multifd (scripts/capture-multifd-fixtures.ts): real QEMU 10.0
 * (uncompressed and zstd) and 7.2 channels, each cut to its MultiFDInit_t and a few verbatim packets, with the
 * main channel's RAM block list beside them.
 */
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { gunzipSync } from "node:zlib";
import type { RamBlock } from "../../src/prune/page-judge.ts";

export type FixtureName =
  | "qemu10-nocomp-channel1"
  | "qemu10-nocomp-channel2"
  | "qemu10-zstd-channel1"
  | "qemu72-nocomp-channel1";

export interface MultifdFixture {
  bytes: Buffer;
  /** packet_num of each packet kept, in order. */
  packetsKept: string[];
  ramBlocks: RamBlock[];
}

const DIR = join(import.meta.dirname, "../fixtures/multifd");

export function multifdFixture(name: FixtureName): MultifdFixture {
  const meta = JSON.parse(readFileSync(join(DIR, `${name}.json`), "utf8")) as {
    packetsKept: string[];
    ramBlocks: RamBlock[];
  };
  return {
    bytes: gunzipSync(readFileSync(join(DIR, `${name}.bin.gz`))),
    packetsKept: meta.packetsKept,
    ramBlocks: meta.ramBlocks,
  };
}
