/**
 * Parse a stream and write it back record by record (optionally transformed): `vmprune stream rewrite`, and
 * the round-trip check that parse → write reproduces every byte.
 */
import { once } from "node:events";
import type { Writable } from "node:stream";
import { StreamParser } from "./parser.ts";
import type { StreamRecord } from "./records.ts";
import { encodeRecord } from "./writer.ts";

export type RecordTransform = (record: StreamRecord) => StreamRecord;

/** Re-encodes every record of `source` into `sink`; returns the bytes written. Throws StreamError on malformed input. */
export async function rewriteStream(
  source: AsyncIterable<Buffer>,
  sink: Writable,
  transform: RecordTransform = (r) => r,
): Promise<number> {
  const parser = new StreamParser();
  let written = 0;
  const emit = async (records: StreamRecord[]) => {
    let ok = true;
    for (const r of records) {
      for (const b of encodeRecord(transform(r))) {
        written += b.length;
        ok = sink.write(b) && ok;
      }
    }
    if (!ok) await once(sink, "drain");
  };
  for await (const chunk of source) await emit(parser.push(chunk));
  await emit(parser.end());
  sink.end();
  await once(sink, "finish");
  return written;
}
