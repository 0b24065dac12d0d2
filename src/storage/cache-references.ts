/**
 * send's answer to "where is this clean page-cache page on shared storage?" for the pruning processor: first the
 * locator (the guest kernel's own metadata: page → inode → extent → block, cost proportional to what is cached,
 * page-locator.ts), then, for what it cannot place, the content index if one was built (disk-index.ts: D3's
 * sampled fingerprints over a whole raw image; built only when asked, or when the locator cannot run, e.g. a guest
 * without BTF). A located page is hashed once here; receive reads the place and checks that hash, so a wrong
 * answer costs a NACK, never a wrong page.
 */
import type { CacheIndex, RefsAccepted, RefTarget } from "../prune/pruning-processor.ts";
import type { DiskIndex } from "./disk-index.ts";
import { strongHash } from "./fingerprint.ts";
import type { LocateMissReason, PageLocator } from "./page-locator.ts";

export interface CacheReferenceStats {
  /** Pages the locator placed (sent as REF_FS). */
  located: number;
  /** The same, by filesystem UUID (hex). */
  locatedByFilesystem: Record<string, number>;
  /** Pages the locator could not place, by reason. */
  notLocated: Partial<Record<LocateMissReason, number>>;
  /** Pages the locator could not place that the content index found (sent as REF). */
  indexHits: number;
  /** Pages neither found (sent in full). */
  notFound: number;
  /** Lookups answered "no reference" because the receiver takes none of the kinds available. */
  notAccepted: number;
}

export class CacheReferences implements CacheIndex {
  readonly #stats: CacheReferenceStats = {
    located: 0,
    locatedByFilesystem: {},
    notLocated: {},
    indexHits: 0,
    notFound: 0,
    notAccepted: 0,
  };

  /** With neither source (the disks unreachable, no BTF and no raw image), every page goes whole, counted. */
  /**
   * `singleDisk`: the locator reads one disk only, the one receive's first `--disk` is, so a located page can also
   * go as a REF at its disk offset to a receiver that takes no REF_FS (link 1.1).
   */
  constructor(private readonly sources: { locator?: PageLocator; index?: DiskIndex; singleDisk?: boolean }) {}

  /** Each filesystem's UUID as the link carries it, made once (references name a handful of filesystems). */
  readonly #uuids = new Map<string, Buffer>();

  #uuid(hex: string): Buffer {
    let uuid = this.#uuids.get(hex);
    if (!uuid) {
      uuid = Buffer.from(hex, "hex");
      this.#uuids.set(hex, uuid);
    }
    return uuid;
  }

  lookup(page: Buffer, pfn: number, accepted: RefsAccepted): { target: RefTarget; hash: Buffer } | null {
    const { locator, index } = this.sources;
    const asDiskRef = !accepted.filesystem && accepted.index && this.sources.singleDisk === true;
    const useLocator = locator !== undefined && (accepted.filesystem || asDiskRef);
    const useIndex = index !== undefined && accepted.index;
    if (!useLocator && !useIndex) {
      if (locator || index) this.#stats.notAccepted++;
      else this.#stats.notFound++;
      return null;
    }
    if (useLocator && pfn >= 0) {
      const where = locator.locate(pfn);
      if (where.ok) {
        this.#stats.located++;
        const byFs = this.#stats.locatedByFilesystem;
        byFs[where.filesystem] = (byFs[where.filesystem] ?? 0) + 1;
        return {
          target: asDiskRef
            ? { kind: "disk", offset: where.byteOffset }
            : {
                kind: "filesystem",
                uuid: this.#uuid(where.filesystem),
                offset: where.filesystemOffset,
              },
          hash: strongHash(page),
        };
      }
      this.#stats.notLocated[where.reason] = (this.#stats.notLocated[where.reason] ?? 0) + 1;
    }
    if (useIndex) {
      const found = index.lookup(page);
      if (found) {
        this.#stats.indexHits++;
        return { target: { kind: "index", block: found.block }, hash: found.hash };
      }
    }
    this.#stats.notFound++;
    return null;
  }

  stats(): CacheReferenceStats {
    return {
      ...this.#stats,
      locatedByFilesystem: { ...this.#stats.locatedByFilesystem },
      notLocated: { ...this.#stats.notLocated },
    };
  }
}
