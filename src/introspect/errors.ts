/**
 * Typed failures of introspection. Guest memory is controlled by the guest, so every one of these is an
 * expected outcome (a forged structure, a guest past its kernel, a VM without RAM file), never a crash: callers
 * catch `IntrospectError`, report its message and migrate without pruning. Each error names what was being read
 * and, where there is one, the way out.
 */

export type IntrospectErrorCode =
  /** A guest-physical address that no RAM range covers. */
  | "unmapped-gpa"
  /** The host could not read a range it was told exists (RAM file too short, process gone). */
  | "read-failed"
  /** QEMU's memory map could not be parsed or is inconsistent. */
  | "bad-layout"
  /** A virtual address the page tables do not map. */
  | "not-mapped"
  /** A virtual address outside the canonical range of the paging mode. */
  | "non-canonical"
  /** A page-table entry that cannot be right (reserved bits, a table outside guest RAM). */
  | "bad-page-table"
  /** No VMCOREINFO candidate in guest RAM. */
  | "no-vmcoreinfo"
  /** VMCOREINFO text that does not parse, lacks a key, or holds an implausible value. */
  | "bad-vmcoreinfo"
  /** Candidates were found, but none was consistent with the memory it describes. */
  | "unvalidated-vmcoreinfo"
  /** More than one self-consistent kernel, and nothing tells which one is running. */
  | "ambiguous-vmcoreinfo"
  /** mem_section pointers or contents that cannot be right. */
  | "bad-mem-section"
  /** A PFN without a present section (no struct page). */
  | "no-struct-page"
  /** The kernel does not say a fact free pruning needs (kernel-layout.ts). */
  | "unsupported-kernel"
  /** BTF bytes that do not parse, or that disagree with VMCOREINFO. */
  | "bad-btf"
  /** kallsyms tables that do not decode, or whose addresses disagree with VMCOREINFO. */
  | "bad-kallsyms"
  /** A self-check of the classification against the kernel's own counters failed. */
  | "self-check-failed";

export class IntrospectError extends Error {
  override readonly name: string = "IntrospectError";
  constructor(
    readonly code: IntrospectErrorCode,
    message: string,
  ) {
    super(message);
  }
}

/** Reading guest-physical memory failed (unmapped address, short file, vanished process). */
export class GuestMemoryError extends IntrospectError {
  override readonly name = "GuestMemoryError";
  constructor(
    code: "unmapped-gpa" | "read-failed" | "bad-layout",
    message: string,
    /** The first guest-physical address that could not be read, when there is one. */
    readonly gpa?: number,
  ) {
    super(code, message);
  }
}

/** A virtual address could not be translated through the guest's page tables. */
export class TranslationError extends IntrospectError {
  override readonly name = "TranslationError";
  constructor(
    code: "not-mapped" | "non-canonical" | "bad-page-table",
    readonly va: bigint,
    /** Paging level where the walk stopped (5 = PML5 … 1 = PTE), 0 before the walk. */
    readonly level: number,
    detail: string,
  ) {
    super(code, `virtual address 0x${va.toString(16)}: ${detail}`);
  }
}

/** VMCOREINFO missing, malformed or inconsistent with guest memory. */
export class VmcoreinfoError extends IntrospectError {
  override readonly name = "VmcoreinfoError";
}

/** mem_section (the sparse memory model's section table) is unusable, or a PFN has no struct page. */
export class MemSectionError extends IntrospectError {
  override readonly name = "MemSectionError";
}

/** The kernel does not say what classification needs: pruning is off, the migration runs as a passthrough. */
export class UnsupportedKernelError extends IntrospectError {
  override readonly name = "UnsupportedKernelError";
  constructor(message: string) {
    super("unsupported-kernel", message);
  }
}

export function hex(value: number | bigint): string {
  return `0x${value.toString(16)}`;
}
