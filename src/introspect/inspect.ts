/**
 * Classifies every page frame of a guest: open the running kernel from guest memory (kernel.ts), pick the
 * page-layout profile its VMCOREINFO matches (kernel-profiles.ts), then read the memmap section by section and
 * classify (classifier.ts). What `vmprune inspect` prints, and what the pruning relay builds on.
 */
import {
  CATEGORY_NAMES,
  type Category,
  type ClassifyOptions,
  countCategories,
  PageClassifier,
} from "./classifier.ts";
import type { GuestMemory } from "./guest-memory.ts";
import { type GuestKernel, openGuestKernel } from "./kernel.ts";
import { type KernelProfile, selectProfile } from "./kernel-profiles.ts";

const PAGE_SIZE = 4096;
/** PFNs classified per read of the memmap (2 MiB of struct pages). */
const CHUNK_PFNS = 32768;

export interface InspectReport {
  kernel: { release: string; pagingLevels: number; profile: string };
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
  profile: KernelProfile;
}

/** Opens the guest kernel and its profile: the part that is done once per migration. */
export function openClassifier(
  memory: GuestMemory,
  options: ClassifyOptions = {},
): { kernel: GuestKernel; profile: KernelProfile; classifier: PageClassifier; openMs: number } {
  const started = performance.now();
  const kernel = openGuestKernel(memory);
  const profile = selectProfile(kernel.release, kernel.info.numbers());
  const classifier = new PageClassifier(profile, kernel.memmap, options);
  return { kernel, profile, classifier, openMs: performance.now() - started };
}

/** Classifies every PFN below the end of guest RAM. */
export function classifyGuest(memory: GuestMemory, options: ClassifyOptions = {}): GuestClassification {
  const { kernel, profile, classifier, openMs } = openClassifier(memory, options);
  const started = performance.now();
  const pfns = Math.ceil(memory.end / PAGE_SIZE);
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
  const classifyMs = performance.now() - started;
  return {
    report: {
      kernel: { release: kernel.release, pagingLevels: kernel.pagingLevels, profile: profile.name },
      pfns,
      pages: countCategories(categories),
      timings: { openMs, classifyMs },
    },
    categories,
    attributes,
    kernel,
    profile,
  };
}

export { CATEGORY_NAMES };
