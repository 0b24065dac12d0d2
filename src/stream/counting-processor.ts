/**
 * The relay's passthrough mode: every chunk of the main channel is forwarded exactly as it came, and parsed on
 * the side to count what QEMU sends (records by type, sections, where parsing stopped and why). A malformed
 * stream never stops the relay: the parser records the error and passes the rest through; QEMU, not vmprune,
 * decides whether those bytes are acceptable.
 */
import { StreamParser } from "./parser.ts";
import type { MainChannelProcessor } from "./relay.ts";
import { StreamSummary, type StreamSummaryJson } from "./summary.ts";

export class CountingProcessor implements MainChannelProcessor {
  private readonly parser = new StreamParser({ onError: "passthrough" });
  private readonly summary = new StreamSummary({ sha256: false });

  push(chunk: Buffer): Buffer[] {
    this.summary.chunk(chunk);
    if (!this.parser.passingThrough) for (const r of this.parser.push(chunk)) this.summary.record(r);
    return [chunk];
  }

  end(): Buffer[] {
    for (const r of this.parser.end()) this.summary.record(r);
    return [];
  }

  report(): StreamSummaryJson {
    return this.summary.toJSON(this.parser);
  }
}
