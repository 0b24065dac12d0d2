/**
 * Bounds-checked big-endian reads over one buffer. Running past the end throws `NeedMore` with the number of
 * bytes the current record needs from its start, so the incremental parser can wait for exactly that much.
 */

export class NeedMore {
  constructor(readonly bytesFromStart: number) {}
}

export class Cursor {
  pos: number;
  constructor(
    readonly buf: Buffer,
    readonly start: number,
  ) {
    this.pos = start;
  }

  get remaining(): number {
    return this.buf.length - this.pos;
  }

  private need(n: number): void {
    if (this.pos + n > this.buf.length) throw new NeedMore(this.pos + n - this.start);
  }

  u8(): number {
    this.need(1);
    return this.buf[this.pos++] as number;
  }
  peekU8(): number {
    this.need(1);
    return this.buf[this.pos] as number;
  }
  be16(): number {
    this.need(2);
    const v = this.buf.readUInt16BE(this.pos);
    this.pos += 2;
    return v;
  }
  be32(): number {
    this.need(4);
    const v = this.buf.readUInt32BE(this.pos);
    this.pos += 4;
    return v;
  }
  /** A be64 as hi/lo halves (exact for every value, unlike a float). */
  be64Parts(): { hi: number; lo: number } {
    this.need(8);
    const hi = this.buf.readUInt32BE(this.pos);
    const lo = this.buf.readUInt32BE(this.pos + 4);
    this.pos += 8;
    return { hi, lo };
  }
  peekBe64Parts(): { hi: number; lo: number } {
    this.need(8);
    return { hi: this.buf.readUInt32BE(this.pos), lo: this.buf.readUInt32BE(this.pos + 4) };
  }
  /** A view of the next n bytes (no copy). */
  bytes(n: number): Buffer {
    this.need(n);
    const view = this.buf.subarray(this.pos, this.pos + n);
    this.pos += n;
    return view;
  }
  /** QEMU's counted string: u8 length, then that many bytes (qemu-file.c@v7.2.0:897-919), as Latin-1. */
  countedString(): string {
    const len = this.u8();
    return this.bytes(len).toString("latin1");
  }
}
