/**
 * A link's throughput over time, from a byte counter something already keeps (the relay's upstream bytes, a
 * network interface's tx_bytes): read every `intervalMs` on a timer, never on the data path, so sampling costs
 * the migration nothing but one counter read per interval.
 */
import type { ThroughputSample } from "./report-model.ts";

/** Often enough to show the shape of a 1 s loopback migration, seldom enough that a 10-minute one keeps 6000. */
export const DEFAULT_SAMPLE_INTERVAL_MS = 100;

/** A counter reading: monotonic time (performance.now()) and the counter's value then. */
export interface CounterReading {
  atMs: number;
  bytes: number;
}

/**
 * The rate between each two consecutive readings, stamped at the later one, in ms from `startMs`. A counter that
 * went backwards (an interface recreated) gives no sample for that interval rather than a negative rate.
 */
export function throughputOf(readings: readonly CounterReading[], startMs: number): ThroughputSample[] {
  const samples: ThroughputSample[] = [];
  for (let i = 1; i < readings.length; i++) {
    const before = readings[i - 1] as CounterReading;
    const after = readings[i] as CounterReading;
    const elapsedMs = after.atMs - before.atMs;
    if (elapsedMs <= 0 || after.bytes < before.bytes) continue;
    samples.push({
      tMs: after.atMs - startMs,
      bytesPerSec: ((after.bytes - before.bytes) * 1000) / elapsedMs,
    });
  }
  return samples;
}

export class ThroughputSampler {
  private readonly readings: CounterReading[] = [];
  private timer: NodeJS.Timeout | undefined;
  private startMs = 0;
  /** Why sampling stopped early (the counter failed), or null. */
  failure: string | null = null;

  /** `readBytes`: the counter, bytes so far; it may throw (then sampling stops and `failure` says why). */
  constructor(
    private readonly readBytes: () => number,
    private readonly intervalMs = DEFAULT_SAMPLE_INTERVAL_MS,
    private readonly now: () => number = () => performance.now(),
  ) {}

  /** Starts sampling; `tMs` of the samples counts from now (call it right before `migrate`). */
  start(): void {
    if (this.timer) throw new Error("the throughput sampler is already running");
    this.startMs = this.now();
    this.read();
    this.timer = setInterval(() => this.read(), this.intervalMs);
    // A forgotten sampler must not keep the process alive.
    this.timer.unref();
  }

  /** Takes a last reading, stops, and returns the samples (rates between consecutive readings). */
  stop(): ThroughputSample[] {
    if (this.timer) {
      clearInterval(this.timer);
      this.timer = undefined;
      this.read();
    }
    return throughputOf(this.readings, this.startMs);
  }

  private read(): void {
    if (this.failure !== null) return;
    try {
      this.readings.push({ atMs: this.now(), bytes: this.readBytes() });
    } catch (error) {
      this.failure = `the byte counter could not be read: ${error instanceof Error ? error.message : String(error)}`;
      if (this.timer) clearInterval(this.timer);
    }
  }
}
