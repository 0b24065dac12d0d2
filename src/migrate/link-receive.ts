/**
 * `vmprune receive`: the destination side of vmprune's link (link/protocol.ts). It accepts `vmprune send`'s
 * connections, authenticates each (pre-shared key) *before* it connects to the destination QEMU (an
 * unauthenticated peer never reaches QEMU), then turns the link back into QEMU's stream: DATA as it is, each REF
 * rebuilt from the shared disk and checked against its SHA-256 (on any doubt: NACK, and nothing past that point
 * reaches QEMU until send's PAGE_DATA arrives). QEMU's return path goes back as RETURN frames. A link that fails
 * (ERROR, a malformed frame, send gone) resets the destination QEMU's connection, so it never runs the guest on
 * partial memory. A peer that fails the handshake (garbage, plain QEMU bytes, a wrong key) is refused and receive
 * goes on waiting for the real send (relay rule 9): the first comer to the port cannot end the migration's wait.
 */
import type { Socket } from "node:net";
import { LinkDecoder } from "../link/decoder.ts";
import { LinkError } from "../link/errors.ts";
import { handshakeKey, type LinkSession, refuseLink, serverHandshake } from "../link/handshake.ts";
import {
  CAPABILITY,
  ERROR_CODE,
  encodeBytesFrames,
  encodeMessage,
  LOAD_REPORT_INTERVAL_MS,
  MSG,
} from "../link/protocol.ts";
import {
  emptyReassemblerStats,
  type ReassemblerOutput,
  type ReassemblerStats,
  type RefFsResolver,
  RefReassembler,
} from "../link/ref-reassembler.ts";
import type { BlockReader } from "../storage/block-reader.ts";
import type { FilesystemDirectory } from "../storage/filesystem-directory.ts";
import {
  type ChannelCodec,
  type ChannelSide,
  type CodecOutlet,
  type CodecOutput,
  Relay,
  type RelayReport,
  ToldPeerError,
} from "../stream/relay.ts";
import type { Endpoint, TcpEndpoint } from "../transport/endpoint.ts";
import type { UnixSocketOptions } from "../transport/socket.ts";
import {
  describeTls,
  type LinkSecurity,
  linkSecurity,
  plaintextNotice,
  tlsServer,
} from "../transport/tls.ts";
import { EventLoopBusy } from "./event-loop-busy.ts";

export interface ReceiveOptions {
  /** Where `vmprune send` connects: TCP or a unix socket (transport/endpoint.ts). */
  listen: Endpoint;
  /** The destination QEMU's -incoming address. */
  to: Endpoint;
  /** Mode and owner of a unix-socket `listen`. */
  unixSocket?: UnixSocketOptions;
  /** The link's pre-shared key; may be absent only with x509 `security` (link/handshake.ts handshakeKey). */
  psk?: Buffer;
  /**
   * TLS on the link (transport/tls.ts). Default: TLS-PSK from `psk`. Plaintext only when asked for by name,
   * since guest memory would then cross the network readable.
   */
  security?: LinkSecurity;
  /**
   * The shared disk, opened with 512-byte block units (REF blockNumber is in sectors): a raw image file
   * (BlockReader.open, read synchronously) or any BlockDevice such as an NBD export of QEMU's block layer
   * (BlockReader.fromDevice, read asynchronously with many reads in flight).
   */
  disk?: BlockReader;
  /** The filesystems on receive's disks, for REF_FS (receive-disks.ts opens both from `--disk`). */
  filesystems?: FilesystemDirectory;
  log?: (line: string) => void;
}

export interface ReceiveReport {
  relay: RelayReport;
  /** REFs rebuilt from the disk, NACKed, answered; bytes written to QEMU (all connections). */
  refs: ReassemblerStats;
}

/** What a link codec on receive's side needs: the key, the disk, the log. */
export type ReceiveCodecOptions = Pick<ReceiveOptions, "psk" | "disk" | "filesystems" | "log">;

/**
 * The capabilities receive offers: references only with a disk (REF) or its filesystems (REF_FS) to read; pages
 * of zeros (ZEROS) and load reports (LOAD, which only references make useful) always.
 */
export function receiveCapabilities(options: Pick<ReceiveOptions, "disk" | "filesystems">): string[] {
  return [
    ...(options.disk ? [CAPABILITY.REF_SHA256] : []),
    ...(options.filesystems ? [CAPABILITY.REF_FS_SHA256, CAPABILITY.REF_FS_BARE] : []),
    CAPABILITY.ZERO_FILL,
    CAPABILITY.LOAD_REPORT,
  ];
}

/** REF_FS → the page, from the filesystem the reference names, checked (null: NACK). */
function refFsResolver(filesystems: FilesystemDirectory): RefFsResolver {
  return (ref) => {
    // The reference's fields are views of the socket's chunk: readNow copies them when its read is asynchronous.
    const r = filesystems.readNow(ref.filesystem, ref.blockNumber, ref.hash);
    return r instanceof Promise ? r.then((done) => (done.ok ? done.page : null)) : r.ok ? r.page : null;
  };
}

/** The reassembler's output as the relay's codec output. */
function codecOutput(out: ReassemblerOutput): CodecOutput {
  return {
    toUpstream: out.toQemu,
    toSource: out.toSend.map((m) => encodeMessage(m)),
    endUpstream: out.end,
  };
}

export class LinkReceiveCodec implements ChannelCodec {
  // DATA bytes go on to the destination QEMU as they come, not assembled per frame (decoder.ts bytesInParts).
  private readonly decoder = new LinkDecoder({ bytesInParts: true });
  private reassembler: RefReassembler | undefined;
  private outlet: CodecOutlet | undefined;
  /** The destination QEMU's connection (for LOAD's queued bytes). */
  private destination: Socket | undefined;
  /** Whether send takes LOADs (capability LOAD_REPORT), and the timer that sends them while the stream flows. */
  private loadReports = false;
  private loadTimer: NodeJS.Timeout | undefined;

  /** `session`: the handshake already made by whoever accepted the connection (receive-service.ts). */
  constructor(
    private readonly index: number,
    private readonly options: ReceiveCodecOptions,
    private readonly session?: LinkSession,
  ) {}

  get stats(): ReassemblerStats | undefined {
    return this.reassembler?.stats;
  }

  async openSource(source: Socket): Promise<void> {
    const session =
      this.session ??
      (await serverHandshake(source, {
        psk: handshakeKey(this.options.psk, source),
        capabilities: receiveCapabilities(this.options),
      }));
    const wanted = session.peerClaim?.target;
    if (!this.session && wanted) {
      // This receive feeds its one --to: a send asking for a named destination expects a service.
      const reason = `this receive feeds one destination (--to); send asked for ${JSON.stringify(wanted)}: run receive with --allow-dir or --allow to serve named destinations`;
      refuseLink(source, ERROR_CODE.DESTINATION, reason);
      throw new ToldPeerError(reason);
    }
    this.loadReports = session.capabilities.includes(CAPABILITY.LOAD_REPORT);
    const disk = this.options.disk;
    this.reassembler = new RefReassembler({
      windowBytes: session.windowBytes,
      resolveRef: (block, hash) => {
        if (!disk) return null;
        if (disk.canReadSync) {
          const r = disk.readSync(block, hash);
          return r.ok ? r.page : null;
        }
        // The hash is a view of the socket's chunk: the read outlives this call.
        return disk.read(block, Buffer.from(hash)).then((r) => (r.ok ? r.page : null));
      },
      ...(this.options.filesystems ? { resolveRefFs: refFsResolver(this.options.filesystems) } : {}),
      emit: (out) => this.outlet?.emit(codecOutput(out)),
      fail: (error) => this.outlet?.fail(error),
    });
    const tls = describeTls(source);
    this.options.log?.(`link #${this.index}: send authenticated${tls ? ` over ${tls}` : " (plaintext)"}`);
  }

  fromSource(chunk: Buffer): CodecOutput {
    const reassembler = this.reassembler;
    if (!reassembler) throw new LinkError("unexpected-message", "link data before the handshake");
    const messages = this.decoder.push(chunk);
    if (this.loadTimer && messages.some((m) => m.type === MSG.EOF)) this.stopLoadReports();
    const error = messages.find((m) => m.type === MSG.ERROR);
    if (error && error.type === MSG.ERROR)
      throw new LinkError("peer-error", `send aborted the migration: ${error.message} (code ${error.code})`);
    return codecOutput(reassembler.push(messages));
  }

  async open({ upstream }: { source: Socket; upstream: Socket }): Promise<void> {
    this.destination = upstream;
  }

  attach(outlet: CodecOutlet): void {
    this.outlet = outlet;
    if (!this.loadReports) return;
    // link/protocol.ts "Load reports": until send's EOF (no more stream to weigh) or the channel's close.
    const busy = new EventLoopBusy();
    this.loadTimer = setInterval(() => {
      const load = {
        type: MSG.LOAD,
        busyPermille: busy.sample(),
        destinationQueuedBytes: this.destination?.writableLength ?? 0,
      } as const;
      outlet.emit({ toSource: [encodeMessage(load)] });
    }, LOAD_REPORT_INTERVAL_MS);
    this.loadTimer.unref();
  }

  private stopLoadReports(): void {
    clearInterval(this.loadTimer);
    this.loadTimer = undefined;
  }

  sourceEnded(): CodecOutput {
    this.stopLoadReports();
    this.decoder.end();
    // send half-closes only after its EOF and the last ACK: by then everything reached QEMU, or (a send that
    // did not wait for the ACK) waits only for reads in flight, which end the stream through the outlet.
    if (!this.reassembler) throw new LinkError("closed", "send closed the link before its EOF");
    this.reassembler.inputEnded();
    return {};
  }

  closed(): void {
    this.stopLoadReports();
    this.reassembler?.close();
  }

  fromUpstream(chunk: Buffer): CodecOutput {
    return { toSource: encodeBytesFrames(MSG.RETURN, chunk) };
  }

  upstreamEnded(): CodecOutput {
    // The destination is done: nothing more to weigh, and the link's write side ends with this EOF.
    this.stopLoadReports();
    return { toSource: [encodeMessage({ type: MSG.EOF })], endSource: true };
  }

  /** The destination QEMU's connection failed: send hears why (ERROR) instead of a bare close. */
  sideFailed(side: ChannelSide, error: Error): Buffer[] | undefined {
    if (side !== "destination") return undefined;
    const message = `the destination QEMU's connection #${this.index} failed: ${error.message}`;
    return [encodeMessage({ type: MSG.ERROR, code: ERROR_CODE.DESTINATION, message })];
  }
}

export interface RunningReceive {
  relay: Relay;
  /** Where it listens (TCP port 0 resolved). */
  endpoint: Endpoint;
  /** The TCP listening address; throws when listening on a unix socket (see `endpoint`). */
  readonly address: TcpEndpoint;
  done: Promise<ReceiveReport>;
}

export async function startReceive(options: ReceiveOptions): Promise<RunningReceive> {
  const codecs: LinkReceiveCodec[] = [];
  const security = linkSecurity(options.security, options.psk);
  const notice = plaintextNotice(security);
  if (notice) options.log?.(notice);
  const secureSource = tlsServer(security);
  const relay = await Relay.start({
    ...(secureSource ? { secureSource } : {}),
    listen: options.listen,
    to: options.to,
    ...(options.unixSocket ? { unixSocket: options.unixSocket } : {}),
    createChannelCodec: (index) => {
      const codec = new LinkReceiveCodec(index, options);
      codecs.push(codec);
      return codec;
    },
    ...(options.log ? { log: options.log } : {}),
  });
  const done = relay.done.then((report) => receiveReport(report, codecs));
  return {
    relay,
    endpoint: relay.endpoint,
    get address() {
      return relay.address;
    },
    done,
  };
}

/** The relay's report with the REF statistics of all its channels summed (the peaks: the largest). */
export function receiveReport(relay: RelayReport, codecs: readonly LinkReceiveCodec[]): ReceiveReport {
  const refs = emptyReassemblerStats();
  for (const c of codecs) {
    const s = c.stats;
    if (!s) continue;
    for (const key of Object.keys(refs) as (keyof ReassemblerStats)[])
      refs[key] = key.startsWith("peak") ? Math.max(refs[key], s[key]) : refs[key] + s[key];
  }
  return { relay, refs };
}
