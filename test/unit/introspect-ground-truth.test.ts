/**
 * kpageflags → allowed categories (the classifier's ground truth) and the agreement figures: free blocks, file
 * pages clean or not, shmem, anon, kernel, flagless pages either way, 6.1 tails taking their head's set, and
 * a classifier "free" that the guest does not call free counted as the dangerous error.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { CATEGORY } from "../../src/introspect/classifier.ts";
import {
  allowedCategories,
  compareWithGroundTruth,
  KPF,
  type KpageflagsDump,
} from "../../src/introspect/ground-truth.ts";

const f = (...bits: number[]) => bits.reduce((a, b) => a | (1n << BigInt(b)), 0n);

function dump(flags: bigint[]): KpageflagsDump {
  return {
    pfns: flags.length,
    flags: BigUint64Array.from(flags),
    counts: new BigUint64Array(flags.length),
    takenAtNs: 0n,
  };
}

test("kpageflags map to the categories they allow", () => {
  const d = dump([
    f(KPF.BUDDY),
    f(KPF.LRU, KPF.UPTODATE),
    f(KPF.LRU, KPF.UPTODATE, KPF.DIRTY),
    f(KPF.LRU, KPF.UPTODATE, KPF.MMAP),
    f(KPF.LRU, KPF.UPTODATE, KPF.SWAPBACKED),
    f(KPF.LRU, KPF.ANON, KPF.SWAPBACKED, KPF.MMAP),
    f(KPF.SLAB),
    0n,
    f(KPF.COMPOUND_HEAD, KPF.LRU, KPF.UPTODATE),
    f(KPF.COMPOUND_TAIL),
    f(KPF.RESERVED),
  ]);
  const allowed = allowedCategories(d);
  const only = (c: keyof typeof CATEGORY) => 1 << CATEGORY[c];
  assert.deepEqual(
    [...allowed],
    [
      only("free"),
      only("cache"),
      only("inode"),
      only("inode"),
      only("shmem"),
      only("anonymous"),
      only("kernel"),
      only("free") | only("kernel"),
      only("cache"),
      only("cache"),
      only("kernel"),
    ],
  );
  const ours = Uint8Array.from([1, 2, 3, 3, 5, 4, 6, 6, 2, 2, 1]);
  const a = compareWithGroundTruth(ours, allowed, d);
  assert.equal(a.agreeing, 10);
  assert.equal(a.falseFree, 1, "calling a reserved page free is the dangerous error");
  assert.deepEqual(a.falseFreePfns, [10], "and which page it is");
  assert.equal(a.groundFree, 1);
  assert.equal(a.freeRatio, 1);
  assert.deepEqual(a.confusion, { "free→kernel": 1 });
});
