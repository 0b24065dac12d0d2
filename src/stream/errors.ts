/** Typed failures of the migration-stream parser: what was wrong and at which byte of the stream. */

export type StreamErrorCode =
  | "bad-magic"
  | "bad-version"
  | "truncated"
  | "unknown-section-type"
  | "unknown-command"
  | "bad-command-length"
  | "unknown-ram-flags"
  | "unknown-block"
  | "no-current-block"
  | "impossible-length"
  | "impossible-offset"
  | "footer-mismatch"
  | "trailing-bytes";

export class StreamError extends Error {
  override readonly name = "StreamError";
  constructor(
    readonly code: StreamErrorCode,
    /** Offset in the stream of the record (or field) that could not be parsed. */
    readonly offset: number,
    readonly detail: string,
  ) {
    super(`migration stream, byte ${offset}: ${detail} (${code})`);
  }
}

export type MultifdErrorCode =
  | "bad-magic"
  | "bad-version"
  | "bad-flags"
  | "impossible-count"
  | "impossible-offset"
  | "bad-ram-block"
  | "truncated";

/** A multifd channel that cannot be parsed: what was wrong and at which byte of the channel. */
export class MultifdError extends Error {
  override readonly name = "MultifdError";
  constructor(
    readonly code: MultifdErrorCode,
    /** Offset in the channel of the packet (or field) that could not be parsed. */
    readonly offset: number,
    readonly detail: string,
  ) {
    super(`multifd channel, byte ${offset}: ${detail} (${code})`);
  }
}
