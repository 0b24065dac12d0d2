/**
 * Classifies every page frame of a guest: open the running kernel from guest memory (kernel.ts), read its BTF
 * (kernel-types.ts), resolve its struct page layout from VMCOREINFO and BTF (kernel-layout.ts), then read the
 * memmap section by section and classify (classifier.ts). What `vmprune inspect` prints, and what the pruning
 * relay builds on.
 */
import {
  CATEGORY_NAMES,
  type Category,
  type ClassifyOptions,
  countCategories,
  PageClassifier,
} from "./classifier.ts";
import { UnsupportedKernelError } from "./errors.ts";
import type { GuestMemory } from "./guest-memory.ts";
import type { Kallsyms } from "./kallsyms.ts";
import { type GuestKernel, openGuestKernel } from "./kernel.ts";
import {
  type Capability,
  type Fact,
  type KernelLayout,
  type KernelTypes,
  resolveKernelLayout,
} from "./kernel-layout.ts";
import { openKernelTypes } from "./kernel-types.ts";

const PAGE_SIZE = 4096;
/** PFNs classified per read of the memmap (2 MiB of struct pages). */
const CHUNK_PFNS = 32768;

export interface LayoutReport {
  /** Where the kernel's types came from ("BTF at ... (kallsyms)"), or why there are none. */
  btf: string;
  free: Capability;
  cache: Capability;
  facts: Fact[];
}

export interface InspectReport {
  kernel: { release: string; pagingLevels: number };
  layout: LayoutReport;
  pfns: number;
  pages: Record<Category, number>;
  timings: { openMs: number; classifyMs: number };
}

export interface GuestClassification {
  report: InspectReport;
  /** One category code per PFN (CATEGORY), 0 where there is no struct page. */
  categories: Uint8Array;
  attributes: Uint8Array;
  kernel: GuestKernel;
  layout: KernelLayout;
}

export interface OpenedClassifier {
  kernel: GuestKernel;
  layout: KernelLayout;
  /** The kernel's accepted BTF, or null. */
  types: KernelTypes | null;
  /** Its decoded symbol table, when VMCOREINFO exports one (6.0+). */
  kallsyms: Kallsyms | null;
  /** Where the types came from, or why there are none. */
  btf: string;
  classifier: PageClassifier;
  openMs: number;
}

/**
 * Opens the guest kernel, its BTF and its layout: the part that is done once per migration. Throws an
 * IntrospectError (UnsupportedKernelError when the kernel does not say what free pruning needs).
 */
export function openClassifier(memory: GuestMemory, options: ClassifyOptions = {}): OpenedClassifier {
  const started = performance.now();
  const kernel = openGuestKernel(memory);
  const types = openKernelTypes(kernel);
  const layout = resolveKernelLayout(kernel.info, types.types, types.reason);
  if (!layout.capabilities.free.on)
    throw new UnsupportedKernelError(
      `Linux ${kernel.release}: ${layout.capabilities.free.reason}, so its pages cannot be classified`,
    );
  const classifier = new PageClassifier(layout, kernel.memmap, options);
  const btf = types.types ? types.types.origin : types.reason;
  return {
    kernel,
    layout,
    types: types.types,
    kallsyms: types.kallsyms,
    btf,
    classifier,
    openMs: performance.now() - started,
  };
}

export function layoutReport(opened: Pick<OpenedClassifier, "layout" | "btf">): LayoutReport {
  const { layout } = opened;
  return { btf: opened.btf, ...layout.capabilities, facts: layout.facts };
}

/** Classifies every present PFN below `pfns` (PFNs without a readable struct page stay unknown). */
export function classifyPresent(opened: Pick<OpenedClassifier, "kernel" | "classifier">, pfns: number) {
  const { kernel, classifier } = opened;
  const categories = new Uint8Array(pfns);
  const attributes = new Uint8Array(pfns);
  const buffer = Buffer.alloc(CHUNK_PFNS * kernel.memmap.structPageSize);
  for (const range of kernel.memmap.presentPfnRanges()) {
    const end = Math.min(pfns, range.startPfn + range.count);
    for (let pfn = range.startPfn; pfn < end; pfn += CHUNK_PFNS) {
      const count = Math.min(CHUNK_PFNS, end - pfn);
      const pages = buffer.subarray(0, count * kernel.memmap.structPageSize);
      if (!kernel.memmap.read(pfn, count, pages)) continue; // unreadable memmap: those PFNs stay unknown
      const result = classifier.classifyRange(pfn, count, pages);
      categories.set(result.categories, pfn);
      attributes.set(result.attributes, pfn);
    }
  }
  return { firstPfn: 0, categories, attributes };
}

/** Classifies every PFN below the end of guest RAM. */
export function classifyGuest(memory: GuestMemory, options: ClassifyOptions = {}): GuestClassification {
  const opened = openClassifier(memory, options);
  const { kernel, layout, openMs } = opened;
  const started = performance.now();
  const pfns = Math.ceil(memory.end / PAGE_SIZE);
  const { categories, attributes } = classifyPresent(opened, pfns);
  const classifyMs = performance.now() - started;
  return {
    report: {
      kernel: { release: kernel.release, pagingLevels: kernel.pagingLevels },
      layout: layoutReport(opened),
      pfns,
      pages: countCategories(categories),
      timings: { openMs, classifyMs },
    },
    categories,
    attributes,
    kernel,
    layout,
  };
}

export { CATEGORY_NAMES };
