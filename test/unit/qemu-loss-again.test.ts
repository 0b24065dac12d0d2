/**
 * againWhileQemuLoses (src/lab/prune-oracle.ts): a migration in which QEMU 7.2 lost pages of its own is run again,
 * its destination stopped and the source resumed first, until one loses none or the attempts are used up; every attempt is handed to the
 * oracle's checks, and the last one is returned.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { againWhileQemuLoses } from "../../src/lab/prune-oracle.ts";

function pairResumed(log: string[]) {
  return {
    src: {
      monitor: {
        execute: async (command: string) => {
          log.push(command);
          return {};
        },
      },
    },
  } as unknown as Parameters<typeof againWhileQemuLoses>[0];
}

test("a migration with QEMU's own loss is run again after resuming the source; one without is kept", async () => {
  const log: string[] = [];
  const losses = [[{ pfn: 1 }], [{ pfn: 2 }, { pfn: 3 }], []];
  let runs = 0;
  const checked: number[] = [];
  const m = await againWhileQemuLoses(
    pairResumed(log),
    async () => {
      log.push(`migrate ${++runs}`);
      const run = runs;
      return {
        qemuUnsent: losses[run - 1] ?? [],
        run,
        dst: { stop: async () => void log.push(`stop ${run}`) },
      };
    },
    (each, attempt) => checked.push(attempt * 10 + each.run),
  );
  assert.equal(m.run, 3, "the first run without QEMU's loss is returned");
  assert.deepEqual(checked, [11, 22, 33], "every attempt is checked");
  assert.deepEqual(log, ["migrate 1", "stop 1", "cont", "migrate 2", "stop 2", "cont", "migrate 3"]);
});

test("after the last attempt the migration is returned even with QEMU's loss; a check that throws ends it", async () => {
  const log: string[] = [];
  let runs = 0;
  const m = await againWhileQemuLoses(
    pairResumed(log),
    async () => ({
      qemuUnsent: [{ pfn: ++runs }],
      run: runs,
      dst: { stop: async () => void log.push("stop") },
    }),
    () => {},
    2,
  );
  assert.equal(m.run, 2);
  assert.deepEqual(log, ["stop", "cont"]);
  await assert.rejects(
    againWhileQemuLoses(
      pairResumed([]),
      async () => ({ qemuUnsent: [{ pfn: 1 }], dst: { stop: async () => {} } }),
      () => assert.fail("a page not free differs"),
    ),
    /a page not free differs/,
  );
});
