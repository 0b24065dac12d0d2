/**
 * A guest disk read through an NBD export of QEMU's block layer (nbd-client.ts): the bytes the guest sees,
 * whatever format or storage holds them. Reads are bounds-checked against the export's size before anything is
 * sent, aligned to the server's minimum block size (a read that is not is widened and cut back), and split at its
 * maximum payload; any number may be in flight (pipelined on one connection).
 */
import { type BlockDevice, checkRange } from "./block-device.ts";
import {
  formatNbdUri,
  type NbdAddress,
  NbdClient,
  type NbdClientOptions,
  type NbdExportInfo,
} from "./nbd-client.ts";

export class NbdDevice implements BlockDevice {
  private constructor(
    readonly name: string,
    readonly client: NbdClient,
  ) {}

  /** Connects to the export (nbd-client.ts says what each failure means). */
  static async open(address: NbdAddress, options: NbdClientOptions = {}): Promise<NbdDevice> {
    const client = await NbdClient.connect(address, options);
    return new NbdDevice(formatNbdUri(address), client);
  }

  get sizeBytes(): number {
    return this.client.info.sizeBytes;
  }

  get info(): NbdExportInfo {
    return this.client.info;
  }

  async read(offset: number, length: number): Promise<Buffer> {
    checkRange(this, offset, length);
    const { minBlockBytes, maxPayloadBytes } = this.client.info;
    const start = offset - (offset % minBlockBytes);
    const end = Math.min(Math.ceil((offset + length) / minBlockBytes) * minBlockBytes, this.sizeBytes);
    const parts: Promise<Buffer>[] = [];
    for (let at = start; at < end; at += maxPayloadBytes)
      parts.push(this.client.read(at, Math.min(maxPayloadBytes, end - at)));
    const whole =
      parts.length === 1 ? await (parts[0] as Promise<Buffer>) : Buffer.concat(await Promise.all(parts));
    return start === offset && whole.length === length
      ? whole
      : whole.subarray(offset - start, offset - start + length);
  }

  close(): Promise<void> {
    return this.client.close();
  }
}
