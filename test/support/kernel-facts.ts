/**
 * Kernel facts for tests, written down from the kernel sources (include/linux/page-flags.h, mm_types.h of each
 * version; ../shared/docs/kernel-layouts.md): VMCOREINFO texts captured from the lab's Debian guests
 * (test/fixtures/vmcoreinfo-*.txt), variants of them for the versions Debian does not package (6.2-6.11, 7.1+),
 * and a table-driven stand-in for BTF (`TableTypes`) holding what a kernel's BTF would say. The real BTF of real
 * guests is checked by the integration tests.
 */
import { readFileSync } from "node:fs";
import { join } from "node:path";
import type { KernelTypes } from "../../src/introspect/kernel-layout.ts";
import { VmcoreInfo } from "../../src/introspect/vmcoreinfo.ts";

const FIXTURES = join(import.meta.dirname, "..", "fixtures");

export const RELEASE_61 = "6.1.0-57-cloud-amd64";
export const RELEASE_612 = "6.12.95+deb12-cloud-amd64";

export function vmcoreinfoText(release: string): string {
  return readFileSync(join(FIXTURES, `vmcoreinfo-${release}.txt`), "latin1");
}

/** A VMCOREINFO text with keys replaced (value string) or removed (null). */
export function editVmcoreinfo(
  text: string,
  edits: Record<string, string | null>,
  release?: string,
): VmcoreInfo {
  const lines = text.split("\n").filter((l) => l !== "");
  const out: string[] = [];
  const seen = new Set<string>();
  for (const line of lines) {
    const key = line.slice(0, line.indexOf("="));
    if (key in edits) {
      seen.add(key);
      const v = edits[key];
      if (v !== null && v !== undefined) out.push(`${key}=${v}`);
    } else if (key === "OSRELEASE" && release) out.push(`OSRELEASE=${release}`);
    else out.push(line);
  }
  for (const [key, v] of Object.entries(edits)) if (!seen.has(key) && v !== null) out.push(`${key}=${v}`);
  return VmcoreInfo.parse(`${out.join("\n")}\n`);
}

export interface TypeTable {
  structs: Record<
    string,
    { size?: number; members: Record<string, number>; arrays?: Record<string, number> }
  >;
  enums: Record<string, Record<string, number>>;
}

/** KernelTypes from a table: what a kernel's BTF would answer. */
export class TableTypes implements KernelTypes {
  readonly origin = "test table";
  constructor(private readonly table: TypeTable) {}
  structSize(struct: string): number | undefined {
    return this.table.structs[struct]?.size;
  }
  memberOffset(struct: string, member: string): number | undefined {
    return this.table.structs[struct]?.members[member];
  }
  arrayLength(struct: string, member: string): number | undefined {
    return this.table.structs[struct]?.arrays?.[member];
  }
  enumValue(enumName: string, enumerator: string): number | undefined {
    if (enumName !== "") return this.table.enums[enumName]?.[enumerator];
    for (const e of Object.values(this.table.enums)) if (enumerator in e) return e[enumerator];
    return undefined;
  }
  hasEnum(enumName: string): boolean {
    return enumName in this.table.enums;
  }
}

const PAGE_COMMON = { flags: 0, compound_head: 8, mapping: 24, private: 40, _mapcount: 48, _refcount: 52 };

/** enum pageflags of Debian's 6.1 cloud kernel (x86-64: PG_uncached with X86_PAT; no MEMORY_FAILURE). */
export const PAGEFLAGS_61 = {
  PG_locked: 0,
  PG_referenced: 1,
  PG_uptodate: 2,
  PG_dirty: 3,
  PG_lru: 4,
  PG_active: 5,
  PG_workingset: 6,
  PG_waiters: 7,
  PG_error: 8,
  PG_slab: 9,
  PG_owner_priv_1: 10,
  PG_arch_1: 11,
  PG_reserved: 12,
  PG_private: 13,
  PG_private_2: 14,
  PG_writeback: 15,
  PG_head: 16,
  PG_mappedtodisk: 17,
  PG_reclaim: 18,
  PG_swapbacked: 19,
  PG_unevictable: 20,
  PG_mlocked: 21,
  PG_uncached: 22,
  __NR_PAGEFLAGS: 24,
  PG_swapcache: 10,
};

/** enum pageflags of 6.12 (page-flags.h@v6.12, with MEMORY_FAILURE). */
export const PAGEFLAGS_612 = {
  PG_locked: 0,
  PG_writeback: 1,
  PG_referenced: 2,
  PG_uptodate: 3,
  PG_dirty: 4,
  PG_lru: 5,
  PG_head: 6,
  PG_waiters: 7,
  PG_active: 8,
  PG_workingset: 9,
  PG_owner_priv_1: 10,
  PG_owner_2: 11,
  PG_arch_1: 12,
  PG_reserved: 13,
  PG_private: 14,
  PG_private_2: 15,
  PG_reclaim: 16,
  PG_swapbacked: 17,
  PG_unevictable: 18,
  PG_mlocked: 19,
  PG_hwpoison: 20,
  __NR_PAGEFLAGS: 21,
  PG_swapcache: 10,
};

/** What 6.1's BTF says (struct page's compound fields in page[1]: mm_types.h@v6.1). */
export const TYPES_61 = new TableTypes({
  structs: {
    page: {
      size: 64,
      members: { ...PAGE_COMMON, compound_dtor: 16, compound_order: 17, compound_mapcount: 20 },
    },
    zone: { members: {}, arrays: { free_area: 11 } },
  },
  enums: { pageflags: PAGEFLAGS_61, compound_dtor_id: { HUGETLB_PAGE_DTOR: 2 } },
});

/** What 6.12's BTF says (struct folio: mm_types.h@v6.12; enum pagetype PGTY_*). */
export const TYPES_612 = new TableTypes({
  structs: {
    page: { size: 64, members: PAGE_COMMON },
    folio: { members: { _flags_1: 64, _large_mapcount: 80, _entire_mapcount: 84, _nr_pages_mapped: 88 } },
    zone: { members: {}, arrays: { free_area: 11 } },
  },
  enums: {
    pageflags: PAGEFLAGS_612,
    pagetype: {
      PGTY_buddy: 0xf0,
      PGTY_offline: 0xf1,
      PGTY_table: 0xf2,
      PGTY_guard: 0xf3,
      PGTY_hugetlb: 0xf4,
      PGTY_slab: 0xf5,
      PGTY_zsmalloc: 0xf6,
      PGTY_unaccepted: 0xf7,
    },
  },
});
