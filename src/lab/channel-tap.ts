/**
 * A migration sink for captures: it accepts every connection a source QEMU opens (the main channel, then its
 * multifd channels) and writes each one's bytes to its own file, `connection-<index>.bin` in accept order. It
 * answers nothing, so the source must run without a return path; QEMU then completes the migration once it has
 * written everything. Used to capture real multifd channels for the unit tests' fixtures.
 */
import { createWriteStream, type WriteStream } from "node:fs";
import { createServer, type Server, type Socket } from "node:net";
import { join } from "node:path";

export class ChannelTap {
  private readonly files: Promise<void>[] = [];

  private constructor(
    private readonly server: Server,
    readonly port: number,
  ) {}

  /** Listens on 127.0.0.1 (any free port) and writes connection k to `dir`/connection-k.bin. */
  static async start(dir: string): Promise<ChannelTap> {
    let tap: ChannelTap | undefined;
    let accepted = 0;
    const server = createServer((socket: Socket) => {
      const file: WriteStream = createWriteStream(join(dir, `connection-${accepted++}.bin`));
      tap?.files.push(
        new Promise((resolve, reject) => {
          file.on("close", () => resolve());
          file.on("error", reject);
        }),
      );
      socket.on("error", () => file.end());
      socket.pipe(file);
    });
    await new Promise<void>((resolve, reject) => {
      server.once("error", reject);
      server.listen(0, "127.0.0.1", () => resolve());
    });
    const address = server.address();
    if (address === null || typeof address === "string") throw new Error("channel tap: no TCP address");
    tap = new ChannelTap(server, address.port);
    return tap;
  }

  get uri(): string {
    return `tcp:127.0.0.1:${this.port}`;
  }

  /** Stops listening and waits until every connection's file is written; returns how many there were. */
  async close(): Promise<number> {
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
    await Promise.all(this.files);
    return this.files.length;
  }
}
