/**
 * Keeps the source QEMU's switchover decision true to the link when a relay prunes.
 *
 * QEMU stops the guest once the dirty bytes it still has to send fit into `downtime-limit` at the bandwidth it
 * measures: threshold = bandwidth × downtime-limit, re-estimated every 100 ms from what the migration wrote
 * (QEMU 7.2: migration/migration.c migration_update_counters; 10.0: migration/migration.c the same, with
 * migration_iteration_run comparing the pending estimate against it). Behind `vmprune send` that is the rate the
 * source writes *into the relay*, and through pruned stretches the relay takes bytes far faster than the link
 * carries them (QEMU measured 150-380 MB/s here against a 1 Gbit/s link). So QEMU stops the guest with far more
 * left than the link can carry within the limit, and the guest's pause grows by the difference.
 *
 * The guard gives QEMU the link's real rate r, measured by the relay (link-rate.ts), less the bytes the relay may
 * hold for the link when the guest stops: they are downtime too, and QEMU does not know of them. Until the relay
 * has seen a window in which bytes waited for the link throughout, r is the most the link carried in a window:
 * less than the link's capacity when send, not the link, is the slower side, and then the truer figure for what
 * the pipeline delivers during the pause. The relay's backlog changes far faster than QEMU re-reads its
 * parameters (every 100 ms) and the guard samples (every 100 ms): a QEMU emitting 380 MB/s fills tens of MB
 * between two updates. So the guard does not chase the backlog; it bounds it, in two phases, by what QEMU still
 * has to send (query-migrate `ram.remaining`, R), with the operator's downtime-limit L:
 * - far from the end (R > r·L + v × 0.3 s, v below, so QEMU cannot reach its switchover point before the guard's
 *   next word takes effect): the relay may read up to `readAhead.maxBytes` ahead, and QEMU is told not to switch
 *   yet (it would not anyway: R is far above any threshold; the hold keeps a threshold of a few bytes, never 0,
 *   see HOLD_AVAIL_BYTES_PER_SECOND);
 * - near the end: the relay may hold C = min(max, r·L·READ_AHEAD_SHARE) (a reader paused over its bound resumes only once the
 *   socket holds less than half of it, stream/relay.ts RESUME_BELOW_SHARE, so the backlog falls below C before
 *   QEMU moves on), plus what the link can carry before QEMU can possibly reach the end of its pass: QEMU needs at
 *   least R/v for what it has left, v being the fastest it ever fed the relay or saw R fall between two ticks
 *   of a pass (through zero pages R falls far faster than QEMU writes), so the relay may hold
 *   B = min(max, C + r·(R/v − h)), h ({@link GLIDE_HORIZON_SECONDS}) covering the time until the guard's next
 *   tick. B glides down to C as R shrinks, and whenever QEMU ends its pass (and may stop the guest) the relay
 *   holds no more than C. With C alone from here on, the link idled through every pruned stretch near the end of
 *   the first pass, about 0.2 s each on the mixed guest (bench:link trace, issue 12): QEMU walks those at
 *   300-400 MB/s and sends the relay almost nothing to forward. QEMU may count on r − B/L:
 * - QEMU ≥ 8.2: migration parameter `avail-switchover-bandwidth` = min(r − B/L, q) (bytes/s; qapi/migration.json,
 *   "Since 8.2": used only for the switchover decision, not a limit), q being QEMU's own rate in its last window,
 *   the hold while that is not positive. QEMU's test `remaining ≤ avail × L` then reads `remaining + B ≤ r × L`
 *   and `remaining ≤ q × L`: the pause stays within L however full the relay is, and however slowly the source
 *   itself writes.
 * - Older QEMU (7.2): the threshold can only be moved through `downtime-limit`, so while the migration is active
 *   the guard sets it to L × (r − B/L) / QEMU's rate, never above the operator's limit, at least 1 ms. QEMU's rate
 *   is the fastest it has been (query-migrate `ram.mbps` of its last window, or the peak the relay was fed): it
 *   jumps between dense and free stretches faster than the guard can follow, and a limit computed from a slow
 *   window would let a fast one overshoot. A `downtime-limit` someone else sets meanwhile becomes the new
 *   operator's limit.
 * Both are put back as they were when the guard stops (the source keeps running if the migration fails).
 */
import type { QmpClient } from "../qemu/qmp.ts";
import { PassWalkMeter } from "./pass-walk.ts";

/** VMPRUNE_GUARD_TRACE=1: every tick is logged (what QEMU said, what the guard decided), for finding stalls. */
const TRACE = process.env.VMPRUNE_GUARD_TRACE === "1";

/** How often the guard samples the link and, when needed, corrects QEMU (QEMU re-estimates every 100 ms). */
export const GUARD_INTERVAL_MS = 100;
/** A higher rate is passed on only if it is this much above the one QEMU has (fewer QMP calls). */
const RATE_CHANGE = 0.1;
/** downtime-limit mode: a limit within this share of the one QEMU has (or 1 ms) is left as it is. */
const LIMIT_JITTER = 0.02;
/**
 * The share of the downtime budget (r·L) the relay may hold as read-ahead near the end; the rest is QEMU's. The
 * guest's pause is what QEMU still has to send when it stops (at most its share) plus what the relay holds then
 * (at most this share), over the link. A guest quiet at the end leaves QEMU little, but the relay is full by then
 * (QEMU writes the last pass faster than the link drains it), so its share is most of that pause: a small one
 * keeps the pause near plain QEMU's. A tenth still holds what keeps the link busy (30 ms of it at the default
 * 300 ms limit, over ten round trips of a LAN), and only near the end; far from it the relay reads up to its cap.
 */
export const READ_AHEAD_SHARE = 0.1;
/**
 * How far ahead of QEMU the guard must decide: QEMU re-reads avail-switchover-bandwidth every 100 ms
 * (migration_update_counters, BUFFER_DELAY), the guard ticks every 100 ms, plus QMP round trips.
 */
const FAR_HORIZON_SECONDS = 0.3;
/**
 * Near the end, the read-ahead B set at one tick must still hold when QEMU could have reached its pass end: the
 * guard's next tick comes after GUARD_INTERVAL_MS (100 ms), later on a busy event loop (20-30 ms late seen in
 * bench:link's guard traces), so B counts only what the link carries from h after this tick on.
 */
export const GLIDE_HORIZON_SECONDS = 0.15;
/**
 * The "hold on" rate: the least avail-switchover-bandwidth that still leaves QEMU a non-zero switchover threshold.
 * 0 means "estimate it yourself" (qapi/migration.json). QEMU 10.0 computes threshold = avail / 1000 (integer
 * division, bytes per ms) × downtime-limit (migration/migration.c migration_update_counters), so anything below
 * 1000 B/s gives a threshold of 0, and migration_iteration_run then completes on `!pending_size` alone: at the end
 * of every pass the estimate (the dirty bitmap, not yet re-synced) is 0, so QEMU would stop the guest with all
 * that was dirtied during the pass still unsent. At 1000 B/s the threshold is downtime-limit bytes (at least 1),
 * below one page: QEMU re-syncs the bitmap at each pass end and goes on unless nothing at all is dirty.
 */
export const HOLD_AVAIL_BYTES_PER_SECOND = 1000;

export type GuardMode = "avail-switchover-bandwidth" | "downtime-limit";

export interface SwitchoverGuardReport {
  mode: GuardMode;
  /** The link rate the guard counted on last (bytes/s), or null if the relay never carried a whole window. */
  linkBytesPerSecond: number | null;
  /**
   * Where that rate came from: "link-bound", a window in which bytes waited for the link throughout; "carried",
   * the most the link carried in a window, while no window was link-bound (send, not the link, was the slower
   * side: see link-rate.ts). Null with no rate.
   */
  linkRateSource: LinkRateSource | null;
  /** The lowest rate given to QEMU (read-ahead deducted), bytes/s; null if none was given. */
  lowestGivenBytesPerSecond: number | null;
  /** How many times QEMU's parameters were set. */
  updates: number;
  /** The relay's last read-ahead bound (bytes): the one near the end. */
  readAheadBytes: number;
  /** The largest read-ahead bound set (far from the end). */
  peakReadAheadBytes: number;
  /** Ticks near the end whose read-ahead was above C: the link carried ahead of QEMU's pass end (see the top). */
  glidingTicks: number;
  /** The fastest QEMU's remaining fell within a pass (bytes/s, pass-walk.ts), null if never seen. */
  walkPeakBytesPerSecond: number | null;
  /** downtime-limit mode: the lowest limit set (ms), null if never lowered. */
  lowestDowntimeLimitMs: number | null;
  /** QMP calls that failed (the guard keeps going; the source QEMU decides as it would without it). */
  errors: number;
}

export type LinkRateSource = "link-bound" | "carried";

/** What the relay measured (link-rate.ts). */
export interface LinkMeasure {
  /** The link's rate (bytes/s), undefined until a whole window was link-bound. */
  bytesPerSecond: number | undefined;
  /**
   * The most the link carried in a window, backlog or not (bytes/s): what the guard counts on until a window is
   * link-bound. Absent or undefined: none yet.
   */
  carriedBytesPerSecond?: number | undefined;
  /** The fastest the source fed the relay (bytes/s), undefined before two samples. */
  inflowPeakBytesPerSecond: number | undefined;
}

interface MigrationParameters {
  "avail-switchover-bandwidth"?: number;
  "downtime-limit"?: number;
}

/** The link-bound rate once there is one, else what the link carried; undefined while neither is known. */
function rateToCountOn(measure: LinkMeasure): { source: LinkRateSource; bytesPerSecond: number } | undefined {
  if (measure.bytesPerSecond !== undefined)
    return { source: "link-bound", bytesPerSecond: measure.bytesPerSecond };
  if (measure.carriedBytesPerSecond !== undefined)
    return { source: "carried", bytesPerSecond: measure.carriedBytesPerSecond };
  return undefined;
}

export class SwitchoverGuard {
  private timer: NodeJS.Timeout | undefined;
  private ticking: Promise<void> = Promise.resolve();
  private busy = false;
  private givenRate: number | undefined;
  private lowestGiven: number | undefined;
  private lastLinkRate: number | undefined;
  private lastRateSource: LinkRateSource | undefined;
  private readAheadBytes = 0;
  private peakReadAheadBytes = 0;
  private glidingTicks = 0;
  private readonly walk = new PassWalkMeter();
  private updates = 0;
  private operatorLimit: number;
  private setLimit: number | undefined;
  private lowestLimit: number | undefined;
  private errors = 0;

  private constructor(
    private readonly qmp: QmpClient,
    readonly mode: GuardMode,
    private readonly original: MigrationParameters,
    private readonly link: () => LinkMeasure,
    private readonly log: (line: string) => void,
    private readonly readAhead: { maxBytes: number; set: (bytes: number) => void } | undefined,
  ) {
    this.operatorLimit = original["downtime-limit"] ?? 300;
  }

  /**
   * Starts guarding the QEMU behind `qmp` (the source). `link` is called every {@link GUARD_INTERVAL_MS}; while
   * the link's rate is unknown QEMU decides on its own.
   */
  static async start(options: {
    qmp: QmpClient;
    link: () => LinkMeasure;
    /** The relay's read-ahead: what it may hold for the link (bytes), at most `maxBytes`. Without it, none. */
    readAhead?: { maxBytes: number; set: (bytes: number) => void };
    log?: (line: string) => void;
  }): Promise<SwitchoverGuard> {
    const parameters = (await options.qmp.executeUntyped("query-migrate-parameters")) as MigrationParameters;
    const mode: GuardMode =
      parameters["avail-switchover-bandwidth"] !== undefined
        ? "avail-switchover-bandwidth"
        : "downtime-limit";
    const guard = new SwitchoverGuard(
      options.qmp,
      mode,
      parameters,
      options.link,
      options.log ?? (() => undefined),
      options.readAhead,
    );
    guard.timer = setInterval(() => {
      if (guard.busy) return; // a slow QMP answer: skip this round rather than queue behind it
      guard.busy = true;
      guard.ticking = guard.tick().finally(() => {
        guard.busy = false;
      });
    }, GUARD_INTERVAL_MS);
    guard.timer.unref();
    return guard;
  }

  private async tick(): Promise<void> {
    const measure = this.link();
    const { inflowPeakBytesPerSecond } = measure;
    // Until a window is link-bound, what the link carried: when send is the slow side (its CPU), a link-bound
    // window may never come, and QEMU's own rate (into send, through cheaply pruned stretches) would let it stop
    // the guest with far more left than the pipeline delivers within the limit (bench:link idle-after-work, refs
    // always: 0.7-1.2 s pauses with a 300 ms limit, no link-bound window in those runs).
    const counted = rateToCountOn(measure);
    if (!counted) return;
    const { source, bytesPerSecond } = counted;
    if (source !== this.lastRateSource)
      this.log(
        source === "link-bound"
          ? `switchover guard: the link drains ${(bytesPerSecond / 1e6).toFixed(1)} MB/s`
          : `switchover guard: no link-bound window yet; counting on what the link carried, ${(bytesPerSecond / 1e6).toFixed(1)} MB/s`,
      );
    this.lastRateSource = source;
    this.lastLinkRate = bytesPerSecond;
    try {
      const current = ((await this.qmp.executeUntyped("query-migrate-parameters")) as MigrationParameters)[
        "downtime-limit"
      ];
      if (current !== undefined && current !== this.setLimit) this.operatorLimit = current;
      const info = await this.qmp.execute("query-migrate");
      if (info.status !== "active") return;
      this.walk.sample(performance.now(), info.ram?.remaining, info.ram?.["dirty-sync-count"]);
      const walkPeak = this.walk.peakBytesPerSecond;
      // How fast QEMU can get through what it has left: the faster of what it fed the relay and how fast its
      // remaining fell. Through zero pages QEMU writes almost nothing and its remaining falls far faster than it
      // feeds the relay (730 MB/s against a 369 MB/s peak feed seen in bench:link anon): counted by the feed
      // alone, the glide below kept 16.6 MB of read-ahead when QEMU was 0.13 s from its pass end, and QEMU
      // stopped the guest with ~10 MB in the relay.
      const fastestBytesPerSecond =
        inflowPeakBytesPerSecond === undefined && walkPeak === undefined
          ? undefined
          : Math.max(inflowPeakBytesPerSecond ?? 0, walkPeak ?? 0);
      const limitSeconds = this.operatorLimit / 1000;
      const budgetBytes = bytesPerSecond * limitSeconds;
      const far =
        this.readAhead !== undefined &&
        fastestBytesPerSecond !== undefined &&
        (info.ram?.remaining ?? 0) > budgetBytes + fastestBytesPerSecond * FAR_HORIZON_SECONDS;
      const nearBytes = this.readAhead
        ? Math.floor(Math.min(this.readAhead.maxBytes, budgetBytes * READ_AHEAD_SHARE))
        : 0;
      const readAheadBytes = !this.readAhead
        ? 0
        : far
          ? this.readAhead.maxBytes
          : this.glide(
              this.readAhead.maxBytes,
              nearBytes,
              bytesPerSecond,
              info.ram?.remaining,
              fastestBytesPerSecond,
            );
      if (!far && readAheadBytes > nearBytes) this.glidingTicks++;
      this.readAhead?.set(readAheadBytes);
      this.readAheadBytes = readAheadBytes;
      if (readAheadBytes > this.peakReadAheadBytes) this.peakReadAheadBytes = readAheadBytes;
      // Not positive while the read-ahead holds more than the link carries within the limit: the hold, then.
      const rate = far ? HOLD_AVAIL_BYTES_PER_SECOND : bytesPerSecond - readAheadBytes / limitSeconds;
      if (TRACE)
        this.log(
          `switchover guard tick: remaining ${info.ram?.remaining ?? "?"} B, pass ${info.ram?.["dirty-sync-count"] ?? "?"}, ` +
            `QEMU ${info.ram?.mbps?.toFixed(1) ?? "?"} Mbit/s, link ${(bytesPerSecond / 1e6).toFixed(1)} MB/s (${source}), ` +
            `inflow peak ${((inflowPeakBytesPerSecond ?? 0) / 1e6).toFixed(1)} MB/s, ` +
            `walk peak ${((walkPeak ?? 0) / 1e6).toFixed(1)} MB/s, ${far ? "far" : "near"}, ` +
            `read-ahead ${readAheadBytes} B`,
        );
      if (this.mode === "avail-switchover-bandwidth") {
        // The source may also be slower than the link (a busy host, a loopback "link"): then QEMU's own rate
        // (its last window) is the true one, and a higher avail would let it stop the guest with more left than
        // it can write within the limit.
        const qemuRate = ((info.ram?.mbps ?? 0) * 1e6) / 8;
        await this.tickAvail(qemuRate > 0 ? Math.min(rate, qemuRate) : rate);
      } else {
        // QEMU re-estimates its rate every 100 ms, and through free stretches it jumps: scale by the fastest it
        // has been (its last window's mbps, or the fastest the relay was fed), so a jump cannot outgrow the limit.
        const qemuRate = Math.max(((info.ram?.mbps ?? 0) * 1e6) / 8, inflowPeakBytesPerSecond ?? 0);
        await this.tickDowntime(rate, current, qemuRate);
      }
    } catch (error) {
      this.errors++;
      if (this.errors === 1)
        this.log(`switchover guard: ${error instanceof Error ? error.message : String(error)}`);
    }
  }

  /** Near the end: C, plus what the link carries before QEMU can reach its pass end (B at the top). */
  private glide(
    maxBytes: number,
    nearBytes: number,
    linkBytesPerSecond: number,
    remainingBytes: number | undefined,
    fastestBytesPerSecond: number | undefined,
  ): number {
    const secondsToPassEnd =
      remainingBytes !== undefined && fastestBytesPerSecond !== undefined && fastestBytesPerSecond > 0
        ? remainingBytes / fastestBytesPerSecond
        : 0;
    const ahead = Math.max(0, linkBytesPerSecond * (secondsToPassEnd - GLIDE_HORIZON_SECONDS));
    return Math.floor(Math.min(maxBytes, nearBytes + ahead));
  }

  private async tickAvail(rate: number): Promise<void> {
    // A lower rate is passed on at once (QEMU must not count on more than is true); a higher one past RATE_CHANGE.
    const given = this.givenRate;
    if (given !== undefined && rate >= given && rate <= given * (1 + RATE_CHANGE)) return;
    const bytesPerSecond = Math.max(HOLD_AVAIL_BYTES_PER_SECOND, Math.round(rate));
    await this.qmp.execute("migrate-set-parameters", { "avail-switchover-bandwidth": bytesPerSecond });
    if (TRACE) this.log(`switchover guard: avail-switchover-bandwidth ${bytesPerSecond} B/s`);
    this.given(bytesPerSecond);
  }

  private given(rate: number): void {
    this.givenRate = rate;
    this.updates++;
    if (rate < (this.lowestGiven ?? Number.POSITIVE_INFINITY)) this.lowestGiven = rate;
  }

  private async tickDowntime(rate: number, current: number | undefined, qemuRate: number): Promise<void> {
    if (!(qemuRate > 0)) return;
    const want = Math.min(
      this.operatorLimit,
      Math.max(1, Math.floor((this.operatorLimit * rate) / qemuRate)),
    );
    // A want that only jitters with QEMU's rate (a ms or two) is not written: every write is a read-modify-write
    // an operator's own change on another monitor can fall into (two suites saw their new limit lost that way).
    if (current !== undefined && Math.abs(want - current) <= Math.max(1, current * LIMIT_JITTER)) return;
    // Read-modify-write against an operator on another monitor: the limit read at the start of the tick may have
    // been changed since (two QMP round trips ago, longer on a busy host). Check again right before writing, so
    // that a limit the operator just set is adopted, not overwritten with one scaled from the old limit.
    const now = ((await this.qmp.executeUntyped("query-migrate-parameters")) as MigrationParameters)[
      "downtime-limit"
    ];
    if (now !== current) {
      if (now !== undefined && now !== this.setLimit) this.operatorLimit = now;
      return;
    }
    await this.qmp.execute("migrate-set-parameters", { "downtime-limit": want });
    this.setLimit = want;
    this.given(rate);
    if (want < (this.lowestLimit ?? Number.POSITIVE_INFINITY)) this.lowestLimit = want;
  }

  /** Stops, and puts QEMU's parameters back as they were (errors only logged: the source may be gone). */
  async stop(): Promise<SwitchoverGuardReport> {
    if (this.timer) clearInterval(this.timer);
    this.timer = undefined;
    await this.ticking;
    try {
      if (this.mode === "avail-switchover-bandwidth" && this.givenRate !== undefined)
        await this.qmp.execute("migrate-set-parameters", {
          "avail-switchover-bandwidth": this.original["avail-switchover-bandwidth"] ?? 0,
        });
      if (this.mode === "downtime-limit" && this.setLimit !== undefined)
        await this.qmp.execute("migrate-set-parameters", { "downtime-limit": this.operatorLimit });
    } catch (error) {
      this.log(
        `switchover guard: could not restore the source's parameters: ${error instanceof Error ? error.message : String(error)}`,
      );
    }
    return {
      mode: this.mode,
      linkBytesPerSecond: this.lastLinkRate ?? null,
      linkRateSource: this.lastRateSource ?? null,
      lowestGivenBytesPerSecond: this.lowestGiven ?? null,
      updates: this.updates,
      readAheadBytes: this.readAheadBytes,
      peakReadAheadBytes: this.peakReadAheadBytes,
      glidingTicks: this.glidingTicks,
      walkPeakBytesPerSecond: this.walk.peakBytesPerSecond ?? null,
      lowestDowntimeLimitMs: this.lowestLimit ?? null,
      errors: this.errors,
    };
  }
}
