/**
 * The running kernel's own type information (BTF), read from guest memory (btf-locate.ts finds it through
 * kallsyms or a scan of the live kernel image; btf.ts parses it) and accepted only when it agrees with every
 * VMCOREINFO value it overlaps: every SIZE(struct), OFFSET(struct.member) and LENGTH(struct.member) that both
 * describe, the page-flag numbers, PG_head_mask and the page-type values. One disagreement rejects the
 * candidate (it is another kernel's BTF, a stale copy, or garbage that happened to parse). The accepted BTF is
 * the source of the layout facts VMCOREINFO does not export (kernel-layout.ts).
 */
import { Btf } from "./btf.ts";
import { locateBtf } from "./btf-locate.ts";
import { IntrospectError } from "./errors.ts";
import type { Kallsyms } from "./kallsyms.ts";
import type { GuestKernel } from "./kernel.ts";
import type { KernelTypes } from "./kernel-layout.ts";
import type { VmcoreInfo } from "./vmcoreinfo.ts";

export interface OpenedTypes {
  types: KernelTypes | null;
  /** Why there are no types (the reason cache pruning is off), or "" when there are. */
  reason: string;
  /** The decoded symbol table when VMCOREINFO exports it (page-poison detection reads a static key with it). */
  kallsyms: Kallsyms | null;
  elapsedMs: number;
}

/** KernelTypes over a parsed BTF blob. */
export class BtfTypes implements KernelTypes {
  constructor(
    readonly btf: Btf,
    readonly origin: string,
  ) {}

  structSize(struct: string): number | undefined {
    return this.btf.structSize(struct);
  }
  memberOffset(struct: string, member: string): number | undefined {
    try {
      return this.btf.memberOffset(struct, member);
    } catch (error) {
      // A bitfield has no byte offset: for the layout that is no fact, not an error.
      if (error instanceof IntrospectError) return undefined;
      throw error;
    }
  }
  arrayLength(struct: string, member: string): number | undefined {
    return this.btf.arrayLength(struct, member);
  }
  enumValue(enumName: string, enumerator: string): number | undefined {
    const v = this.btf.enumValue(enumName, enumerator);
    return v === undefined || v < BigInt(Number.MIN_SAFE_INTEGER) || v > BigInt(Number.MAX_SAFE_INTEGER)
      ? undefined
      : Number(v);
  }
  hasEnum(enumName: string): boolean {
    return this.btf.enumerators(enumName) !== undefined;
  }
}

/**
 * The VMCOREINFO values these types contradict (empty when they agree), and how many were compared. Keys
 * whose struct or member BTF does not have are not compared: BTF may lack a typedef-only name.
 */
export function disagreements(
  types: KernelTypes,
  info: VmcoreInfo,
): { mismatches: string[]; compared: number } {
  const mismatches: string[] = [];
  let compared = 0;
  const check = (key: string, expected: number, actual: number | undefined) => {
    if (actual === undefined) return;
    compared++;
    if (actual !== expected) mismatches.push(`${key}=${expected}, BTF says ${actual}`);
  };
  const numbers = info.numbers();
  for (const [key, value] of numbers) {
    const m = /^(SIZE|OFFSET|LENGTH|NUMBER)\(([A-Za-z0-9_]+)(?:\.([A-Za-z0-9_.]+))?\)$/.exec(key);
    if (!m) continue;
    const [, kind, struct = "", member] = m;
    if (kind === "SIZE" && member === undefined) check(key, value, types.structSize(struct));
    else if (kind === "OFFSET" && member !== undefined) check(key, value, types.memberOffset(struct, member));
    else if (kind === "LENGTH" && member !== undefined) check(key, value, types.arrayLength(struct, member));
    else if (kind === "NUMBER" && /^PG_[a-z_0-9]+$/.test(struct) && struct !== "PG_head_mask")
      check(key, value, types.enumValue("pageflags", struct));
  }
  const headMask = numbers.get("NUMBER(PG_head_mask)");
  const head = types.enumValue("pageflags", "PG_head");
  if (headMask !== undefined && head !== undefined) check("NUMBER(PG_head_mask)", headMask, 2 ** head);
  const buddy = numbers.get("NUMBER(PAGE_BUDDY_MAPCOUNT_VALUE)");
  if (buddy !== undefined) {
    const word = buddy >>> 0;
    const top = types.enumValue("pagetype", "PGTY_buddy");
    const bit = types.enumValue("pagetype", "PG_buddy");
    // 6.12+: PGTY_buddy << 24; 6.10-6.11: ~PG_buddy (include/linux/page-flags.h of each).
    if (top !== undefined) check("NUMBER(PAGE_BUDDY_MAPCOUNT_VALUE)", word, (top << 24) >>> 0);
    else if (bit !== undefined) check("NUMBER(PAGE_BUDDY_MAPCOUNT_VALUE)", word, ~bit >>> 0);
  }
  return { mismatches, compared };
}

/** Finds, parses and checks the kernel's BTF. Never throws for what the guest holds: it says why instead. */
export function openKernelTypes(kernel: GuestKernel): OpenedTypes {
  const started = performance.now();
  let kallsyms: Kallsyms | null = null;
  const done = (types: KernelTypes | null, reason: string): OpenedTypes => ({
    types,
    reason,
    kallsyms,
    elapsedMs: performance.now() - started,
  });
  let location: ReturnType<typeof locateBtf>;
  try {
    location = locateBtf(kernel);
  } catch (error) {
    if (!(error instanceof IntrospectError)) throw error;
    return done(null, `no BTF found in the guest kernel (${error.message})`);
  }
  kallsyms = location.kallsyms;
  const rejected: string[] = [];
  for (const candidate of location.candidates) {
    const where = `BTF at 0x${candidate.va.toString(16)} (${candidate.source === "kallsyms" ? "kallsyms __start_BTF" : "found in the kernel image"})`;
    let btf: Btf;
    try {
      btf = Btf.parse(candidate.bytes);
    } catch (error) {
      if (!(error instanceof IntrospectError)) throw error;
      rejected.push(`${where}: ${error.message}`);
      continue;
    }
    const types = new BtfTypes(btf, where);
    const { mismatches, compared } = disagreements(types, kernel.info);
    if (mismatches.length > 0) {
      rejected.push(`${where} disagrees with VMCOREINFO: ${mismatches.slice(0, 3).join("; ")}`);
      continue;
    }
    if (compared < 3) {
      rejected.push(`${where} describes almost nothing VMCOREINFO does (${compared} values in common)`);
      continue;
    }
    return done(types, "");
  }
  const notes = location.notes.length > 0 ? ` (${location.notes.join("; ")})` : "";
  return done(
    null,
    rejected.length > 0
      ? `the guest kernel's BTF was not accepted: ${rejected.slice(0, 2).join("; ")}`
      : `no BTF found in the guest kernel${notes}`,
  );
}
