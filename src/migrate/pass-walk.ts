/**
 * How fast the source QEMU gets through what it has left of a pass: the fastest its `ram.remaining`
 * (query-migrate; dirty pages not yet sent, × page size) fell between two samples of the same pass (same
 * `dirty-sync-count`). Not the rate it writes: QEMU sends a zero page as a header of a few bytes, so through zero
 * pages its remaining falls far faster than it feeds the relay (bench:link anon: 730-870 MB/s against a peak feed
 * of 370-400 MB/s). A pass end re-syncs the dirty bitmap and the remaining jumps: those pairs never count.
 */
export class PassWalkMeter {
  private last: { atMs: number; remainingBytes: number; pass: number } | undefined;
  private peak: number | undefined;

  /** One query-migrate answer (`atMs` from a monotonic clock); undefined fields end the run of samples. */
  sample(atMs: number, remainingBytes: number | undefined, pass: number | undefined): void {
    const last = this.last;
    if (remainingBytes === undefined || pass === undefined) {
      this.last = undefined;
      return;
    }
    this.last = { atMs, remainingBytes, pass };
    if (!last || last.pass !== pass || remainingBytes >= last.remainingBytes || atMs <= last.atMs) return;
    const rate = ((last.remainingBytes - remainingBytes) * 1000) / (atMs - last.atMs);
    if (this.peak === undefined || rate > this.peak) this.peak = rate;
  }

  /** The fastest fall seen (bytes/s), undefined before two samples of one pass with a fall between them. */
  get peakBytesPerSecond(): number | undefined {
    return this.peak;
  }
}
