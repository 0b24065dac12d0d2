/**
 * The rate the way to the destination really drains at, as the relay sees it: the fastest its upstream sockets
 * took bytes over any `windowMs` during which the relay had bytes queued for them at every sample (so the link,
 * not the source QEMU, set the pace). Stretches where the relay forwards little (pruned free pages) leave the
 * queue empty and never count, so the estimate is the link's capacity, not the average of a pruned stream.
 */
import type { UpstreamDrain } from "../stream/relay.ts";

/** Long enough that filling the kernel's send buffer (a few MiB at the start) does not pass for link speed. */
export const DEFAULT_RATE_WINDOW_MS = 500;

export class LinkRateMeter {
  private run: { atMs: number; sentBytes: number }[] = [];
  private best: number | undefined;
  private lastReceived: { atMs: number; bytes: number } | undefined;
  private bestInflow: number | undefined;

  constructor(private readonly windowMs = DEFAULT_RATE_WINDOW_MS) {}

  /** One observation of the relay's upstream (`atMs` from a monotonic clock, e.g. performance.now()). */
  sample(atMs: number, drain: UpstreamDrain): void {
    this.sampleInflow(atMs, drain.receivedBytes);
    if (drain.queuedBytes === 0) {
      this.run = [];
      return;
    }
    this.run.push({ atMs, sentBytes: drain.sentBytes });
    // Keep the newest samples that still span at least windowMs.
    while (this.run.length > 2 && atMs - (this.run[1] as { atMs: number }).atMs >= this.windowMs)
      this.run.shift();
    const first = this.run[0];
    if (!first || atMs - first.atMs < this.windowMs) return;
    const rate = ((drain.sentBytes - first.sentBytes) * 1000) / (atMs - first.atMs);
    if (rate > 0 && (this.best === undefined || rate > this.best)) this.best = rate;
  }

  /** Bytes per second, or undefined until one whole window was link-bound. */
  get bytesPerSecond(): number | undefined {
    return this.best;
  }

  /** The fastest the source sent the relay bytes between two samples (bytes/s), undefined before two samples. */
  get inflowPeakBytesPerSecond(): number | undefined {
    return this.bestInflow;
  }

  private sampleInflow(atMs: number, bytes: number): void {
    const last = this.lastReceived;
    this.lastReceived = { atMs, bytes };
    if (!last || atMs <= last.atMs) return;
    const rate = ((bytes - last.bytes) * 1000) / (atMs - last.atMs);
    if (this.bestInflow === undefined || rate > this.bestInflow) this.bestInflow = rate;
  }
}
