/**
 * The opening of a QEMU RAM migration stream as records (stream/records.ts), for tests that build streams with
 * the writer: header, configuration, the RAM section's START with its MEM_SIZE block list, EOS, footer, and the
 * first PART section header, after which the test appends its pages.
 */
import type { StreamRecord } from "../../src/stream/records.ts";

export function ramStreamOpening(
  blocks: readonly { idstr: string; length: number }[],
  machineType = "pc-q35-10.0",
): StreamRecord[] {
  return [
    { kind: "header", offset: 0, version: 3 },
    { kind: "configuration", offset: 0, machineType, subsections: [] },
    { kind: "section", offset: 0, type: "START", sectionId: 2, idstr: "ram", instanceId: 0, versionId: 4 },
    {
      kind: "ram",
      type: "memSize",
      offset: 0,
      total: blocks.reduce((sum, b) => sum + b.length, 0),
      flags: 0x04,
      blocks: [...blocks],
    },
    { kind: "ram", type: "eos", offset: 0, value: 0x10 },
    { kind: "footer", offset: 0, sectionId: 2 },
    {
      kind: "section",
      offset: 0,
      type: "PART",
      sectionId: 2,
      idstr: null,
      instanceId: null,
      versionId: null,
    },
  ];
}
