/**
 * send's side of REFs (protocol.ts, stream rules 2-4), pure: hands out refIds, remembers where each REF'd page
 * lives until receive ACKs it (so a NACK can be answered from current guest memory), and keeps the window count
 * that tells send when to stop reading QEMU's stream.
 */
import { LinkError } from "./errors.ts";
import { PAGE_BYTES } from "./protocol.ts";

export class RefLedger<Location> {
  readonly #windowBytes: number;
  /** Output bytes sent so far (DATA lengths, pageHeader + 4096 per REF). */
  #outputBytes = 0;
  /** Outstanding (unACKed) REFs in refId order: refId = #firstRefId + index - #head. */
  #refs: Array<{ location: Location; startBytes: number } | undefined> = [];
  #head = 0;
  /** refId of #refs[#head]. */
  #firstRefId = 1;
  #nextRefId = 1;

  /** `windowBytes`: the window receive announced (LinkSession.windowBytes). */
  constructor(windowBytes: number) {
    this.#windowBytes = windowBytes;
  }

  /** Count a DATA frame's payload. */
  data(bytes: number): void {
    this.#outputBytes += bytes;
  }

  /** Allocates the refId for a REF whose page is at `location` (remembered until ACKed) and counts its output. */
  ref(location: Location, pageHeaderBytes: number): number {
    this.#refs.push({ location, startBytes: this.#outputBytes });
    this.#outputBytes += pageHeaderBytes + PAGE_BYTES;
    return this.#nextRefId++;
  }

  /** ACK(refId): every REF up to refId is settled; forget them. */
  ack(refId: number): void {
    if (refId >= this.#nextRefId)
      throw new LinkError(
        "unknown-ref",
        `ACK of ref ${refId}, but only refs up to ${this.#nextRefId - 1} were sent`,
      );
    while (this.#firstRefId <= refId) {
      this.#refs[this.#head++] = undefined;
      this.#firstRefId++;
    }
    if (this.#head === this.#refs.length) {
      this.#refs = [];
      this.#head = 0;
    } else if (this.#head > 1024 && this.#head * 2 > this.#refs.length) {
      this.#refs = this.#refs.slice(this.#head);
      this.#head = 0;
    }
  }

  /** NACK(refId): where that page lives, to send PAGE_DATA from. The REF stays outstanding until ACKed. */
  nacked(refId: number): Location {
    const entry = refId >= this.#firstRefId ? this.#refs[this.#head + refId - this.#firstRefId] : undefined;
    if (!entry)
      throw new LinkError(
        "unknown-ref",
        `NACK of ref ${refId}, which is not outstanding (never sent, or ACKed)`,
      );
    return entry.location;
  }

  /** Output bytes sent from the oldest unACKed REF on (0 when none is outstanding). */
  get usedBytes(): number {
    const oldest = this.#refs[this.#head];
    return oldest ? this.#outputBytes - oldest.startBytes : 0;
  }

  /** Stop reading QEMU's stream until an ACK (rule 3). */
  get full(): boolean {
    return this.usedBytes >= this.#windowBytes;
  }

  /** REFs sent and not yet ACKed. */
  get outstanding(): number {
    return this.#nextRefId - this.#firstRefId;
  }
}
