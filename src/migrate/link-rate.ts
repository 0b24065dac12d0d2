/**
 * The rate the way to the destination really drains at, as the relay sees it, in two figures:
 * - link-bound: the fastest its upstream sockets took bytes over any `windowMs` during which the relay had bytes
 *   queued for them at every sample (so the link, not the source QEMU, set the pace). Stretches where the relay
 *   forwards little (pruned free pages) leave the queue empty and never count, so the estimate is the link's
 *   capacity, not the average of a pruned stream.
 * - carried: the fastest they took bytes over any `windowMs`, queue or not. No more than the link can carry (but
 *   for a send buffer filling at the start of a burst: at most its size per window, ~4 MiB per 0.5 s, 7% of
 *   1 Gbit/s), and often less: it is what the pipeline delivered, and when send itself is the slow side (its CPU
 *   making references, say), bytes never wait for the link for a whole window and the link-bound figure never
 *   comes. The switchover guard then counts on the carried one (switchover-guard.ts), which is what the pipeline
 *   has shown it can do.
 */
import type { UpstreamDrain } from "../stream/relay.ts";

/** Long enough that filling the kernel's send buffer (a few MiB at the start) does not pass for link speed. */
export const DEFAULT_RATE_WINDOW_MS = 500;

interface SentSample {
  atMs: number;
  sentBytes: number;
}

/** The newest samples that still span at least one window, and the fastest whole window seen. */
class BestWindow {
  private run: SentSample[] = [];
  best: number | undefined;

  constructor(private readonly windowMs: number) {}

  add(sample: SentSample): void {
    this.run.push(sample);
    while (this.run.length > 2 && sample.atMs - (this.run[1] as SentSample).atMs >= this.windowMs)
      this.run.shift();
    const first = this.run[0];
    if (!first || sample.atMs - first.atMs < this.windowMs) return;
    const rate = ((sample.sentBytes - first.sentBytes) * 1000) / (sample.atMs - first.atMs);
    if (rate > 0 && (this.best === undefined || rate > this.best)) this.best = rate;
  }

  reset(): void {
    this.run = [];
  }
}

export class LinkRateMeter {
  private readonly linkBound: BestWindow;
  private readonly carried: BestWindow;
  private lastReceived: { atMs: number; bytes: number } | undefined;
  private bestInflow: number | undefined;

  constructor(windowMs = DEFAULT_RATE_WINDOW_MS) {
    this.linkBound = new BestWindow(windowMs);
    this.carried = new BestWindow(windowMs);
  }

  /** One observation of the relay's upstream (`atMs` from a monotonic clock, e.g. performance.now()). */
  sample(atMs: number, drain: UpstreamDrain): void {
    this.sampleInflow(atMs, drain.receivedBytes);
    const sample = { atMs, sentBytes: drain.sentBytes };
    this.carried.add(sample);
    if (drain.queuedBytes === 0) this.linkBound.reset();
    else this.linkBound.add(sample);
  }

  /** Bytes per second, or undefined until one whole window was link-bound. */
  get bytesPerSecond(): number | undefined {
    return this.linkBound.best;
  }

  /** The most the upstream took over one window, backlog or not (bytes/s); undefined before a whole window. */
  get carriedBytesPerSecond(): number | undefined {
    return this.carried.best;
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
