/**
 * `vmprune receive` as a long-running service: one listener serves many migrations, several at once, each into
 * the destination QEMU its send names (link/protocol.ts "Channel claims"), and only into destinations the
 * operator allowed (allowed-destinations.ts).
 *
 * Each accepted connection is secured (TLS) and authenticated (the link handshake) on its own, with the
 * handshake's timeout; only then is its claim read: which migration, which channel, which destination. A
 * connection that fails any of this (garbage, plain QEMU bytes, another key, silence, a destination not allowed)
 * is refused alone: it never reaches a destination QEMU and costs the running migrations nothing. The
 * connections of one migration form one detached relay (stream/relay.ts), offered in the order of their claimed
 * channel numbers (QEMU 7.2 takes its first connection as the main channel), with the same per-channel bounds as
 * a single `receive`: at most `maxBufferedBytes` per direction, and the REF window.
 */
import type { Server, Socket } from "node:net";
import { handshakeKey, type LinkSession, refuseLink, serverHandshake } from "../link/handshake.ts";
import { ERROR_CODE } from "../link/protocol.ts";
import type { BlockReader } from "../storage/block-reader.ts";
import type { FilesystemDirectory } from "../storage/filesystem-directory.ts";
import { Relay } from "../stream/relay.ts";
import { type Endpoint, formatEndpoint } from "../transport/endpoint.ts";
import {
  describePeer,
  listen,
  listeningEndpoint,
  resetSocket,
  type UnixSocketOptions,
} from "../transport/socket.ts";
import { type LinkSecurity, linkSecurity, plaintextNotice, tlsServer } from "../transport/tls.ts";
import { type AllowedDestinations, describeAllowed, resolveDestination } from "./allowed-destinations.ts";
import { LinkReceiveCodec, type ReceiveReport, receiveCapabilities, receiveReport } from "./link-receive.ts";

/** Migrations served at once unless told otherwise. */
export const DEFAULT_MAX_MIGRATIONS = 8;
/** Connections in their TLS or link handshake at once: more are reset at once (a flood costs nothing). */
export const DEFAULT_MAX_HANDSHAKES = 64;
/** Channels of one migration: the main channel and up to 63 multifd channels (libvirt's default is 2). */
export const MAX_CHANNELS_PER_MIGRATION = 64;
/** Refusals kept for the final report (the log has them all). */
const MAX_REFUSALS_KEPT = 100;
/** Ended migrations kept for the final report (the most recent ones). */
const MAX_REPORTS_KEPT = 100;

export interface ReceiveServiceOptions {
  listen: Endpoint;
  unixSocket?: UnixSocketOptions;
  /** The link's pre-shared key; may be absent only with x509 `security`. */
  psk?: Buffer;
  /** TLS on the link (default TLS-PSK from `psk`); plaintext only by name. */
  security?: LinkSecurity;
  /** Where send may ask to go. */
  allowed: AllowedDestinations;
  /** The shared disk REFs are rebuilt from (absent: every REF is answered with a NACK). */
  disk?: BlockReader;
  /** The filesystems on the disks, for REF_FS (absent: receive does not offer it). */
  filesystems?: FilesystemDirectory;
  maxMigrations?: number;
  maxHandshakes?: number;
  /** TLS and link handshake, each (default 10 s); also how long a migration's missing channel is waited for. */
  handshakeTimeoutMs?: number;
  log?: (line: string) => void;
  /** Called as each migration ends (completed or not). */
  onMigration?: (report: ServedMigration) => void;
}

export interface ServedMigration extends ReceiveReport {
  /** send's migration id (hex). */
  migration: string;
  destination: string;
}

export interface Refusal {
  peer: string;
  reason: string;
}

export interface ServiceReport {
  /** The last migrations served (at most 100; each was also reported through onMigration as it ended). */
  migrations: ServedMigration[];
  refused: Refusal[];
  /** Refusals beyond those kept in `refused`. */
  refusedNotKept: number;
}

interface PendingChannel {
  socket: Socket;
  session: LinkSession;
}

/** One migration's connections, offered to its relay in channel order. */
class ServedMigrationRelay {
  readonly relay: Relay;
  readonly #sessions = new Map<number, LinkSession>();
  readonly #pending = new Map<number, PendingChannel>();
  readonly #codecs: LinkReceiveCodec[] = [];
  #next = 0;
  #gapTimer: NodeJS.Timeout | undefined;

  constructor(
    readonly id: string,
    readonly target: string,
    readonly destination: Endpoint,
    private readonly options: ReceiveServiceOptions,
    private readonly refuse: (socket: Socket, reason: string) => void,
  ) {
    this.relay = Relay.detached({
      to: destination,
      createChannelCodec: (index) => {
        const codec = new LinkReceiveCodec(index, options, this.#sessions.get(index));
        this.#codecs.push(codec);
        return codec;
      },
      log: (line) => options.log?.(`migration ${id.slice(0, 8)}: ${line}`),
    });
  }

  get codecs(): readonly LinkReceiveCodec[] {
    return this.#codecs;
  }

  add(channel: number, socket: Socket, session: LinkSession): void {
    if (channel < this.#next || this.#pending.has(channel)) {
      this.refuse(socket, `channel ${channel} of migration ${this.id.slice(0, 8)} arrived twice`);
      return;
    }
    if (channel >= MAX_CHANNELS_PER_MIGRATION) {
      this.refuse(socket, `channel ${channel}: at most ${MAX_CHANNELS_PER_MIGRATION} channels per migration`);
      return;
    }
    this.#pending.set(channel, { socket, session });
    for (let p = this.#pending.get(this.#next); p; p = this.#pending.get(this.#next)) {
      this.#pending.delete(this.#next);
      this.#sessions.set(this.#next, p.session);
      this.relay.offer(p.socket);
      this.#next++;
    }
    clearTimeout(this.#gapTimer);
    if (this.#pending.size > 0) {
      // A later channel waits for an earlier one; if it never comes, QEMU's migration cannot work: refuse them.
      const missing = this.#next;
      this.#gapTimer = setTimeout(() => {
        for (const [, p] of this.#pending) this.refuse(p.socket, `channel ${missing} never arrived`);
        this.#pending.clear();
        if (missing === 0) void this.relay.close();
      }, this.options.handshakeTimeoutMs ?? 10_000);
      this.#gapTimer.unref();
    }
  }

  abort(): void {
    clearTimeout(this.#gapTimer);
    for (const [, p] of this.#pending) resetSocket(p.socket);
    this.#pending.clear();
    void this.relay.close();
  }
}

export class ReceiveService {
  readonly #server: Server;
  readonly #options: ReceiveServiceOptions;
  readonly #secure: ((raw: Socket) => Promise<Socket>) | undefined;
  readonly #migrations = new Map<string, ServedMigrationRelay>();
  /** Connections in their handshakes: the accepted socket → the one to reset on close (TLS once secured). */
  readonly #handshaking = new Map<Socket, Socket>();
  readonly #done: ServedMigration[] = [];
  readonly #refused: Refusal[] = [];
  #refusedNotKept = 0;
  #endpoint: Endpoint;
  #closing = false;

  private constructor(server: Server, options: ReceiveServiceOptions, endpoint: Endpoint) {
    this.#server = server;
    this.#options = options;
    this.#endpoint = endpoint;
    const security = linkSecurity(options.security, options.psk);
    const notice = plaintextNotice(security);
    if (notice) this.#log(notice);
    this.#secure = tlsServer(security, options.handshakeTimeoutMs);
    server.on("connection", (socket: Socket) => void this.#accept(socket));
    server.on("error", (error) => this.#log(`receive service: listener error: ${error.message}`));
  }

  static async start(options: ReceiveServiceOptions): Promise<ReceiveService> {
    if (!options.allowed.dir && !options.allowed.addresses?.length)
      throw new Error(
        "a receive service needs allowed destinations: --allow-dir DIR and/or --allow ADDRESSES",
      );
    const server = await listen(options.listen, {
      allowHalfOpen: true,
      pauseOnConnect: true,
      noDelay: true,
      ...options.unixSocket,
    });
    const service = new ReceiveService(server, options, listeningEndpoint(server, options.listen));
    service.#log(
      `receive service: listening on ${formatEndpoint(service.endpoint)}; destinations allowed: ${describeAllowed(options.allowed)}`,
    );
    return service;
  }

  get endpoint(): Endpoint {
    return this.#endpoint;
  }

  /** What runs now: connections still in their handshakes, and migrations with their destinations. */
  status(): { handshaking: number; migrations: { id: string; destination: string; channels: number }[] } {
    return {
      handshaking: this.#handshaking.size,
      migrations: [...this.#migrations.values()].map((m) => ({
        id: m.id,
        destination: formatEndpoint(m.destination),
        channels: m.codecs.length,
      })),
    };
  }

  /**
   * Stops accepting. `abort`: running migrations are cut (their sources keep running); otherwise they finish
   * first. Resolves with everything served.
   */
  async close(options: { abort?: boolean } = {}): Promise<ServiceReport> {
    if (!this.#closing) {
      this.#closing = true;
      if (this.#server.listening) this.#server.close();
      for (const [raw, socket] of this.#handshaking) {
        resetSocket(socket);
        resetSocket(raw);
      }
    }
    const running = [...this.#migrations.values()];
    if (options.abort) for (const m of running) m.abort();
    await Promise.all(running.map((m) => m.relay.done));
    // Let each migration's done handler record its report.
    await new Promise((resolve) => setImmediate(resolve));
    return { migrations: [...this.#done], refused: [...this.#refused], refusedNotKept: this.#refusedNotKept };
  }

  #log(line: string): void {
    this.#options.log?.(line);
  }

  #noteRefusal(peer: string, reason: string): void {
    this.#log(`receive service: refused ${peer}: ${reason}`);
    if (this.#refused.length < MAX_REFUSALS_KEPT) this.#refused.push({ peer, reason });
    else this.#refusedNotKept++;
  }

  async #accept(raw: Socket): Promise<void> {
    const peer = describePeer(raw);
    raw.on("error", () => {});
    if (this.#closing) {
      resetSocket(raw);
      return;
    }
    if (this.#handshaking.size >= (this.#options.maxHandshakes ?? DEFAULT_MAX_HANDSHAKES)) {
      this.#noteRefusal(peer, `${this.#handshaking.size} connections already in their handshakes`);
      resetSocket(raw);
      return;
    }
    this.#handshaking.set(raw, raw);
    let socket = raw;
    let session: LinkSession;
    try {
      if (this.#secure) {
        socket = await this.#secure(raw);
        socket.on("error", () => {});
        this.#handshaking.set(raw, socket);
      }
      session = await serverHandshake(socket, {
        psk: handshakeKey(this.#options.psk, socket),
        capabilities: receiveCapabilities(this.#options),
        ...(this.#options.handshakeTimeoutMs ? { timeoutMs: this.#options.handshakeTimeoutMs } : {}),
      });
    } catch (error) {
      this.#noteRefusal(peer, error instanceof Error ? error.message : String(error));
      resetSocket(socket);
      resetSocket(raw);
      return;
    } finally {
      this.#handshaking.delete(raw);
    }
    try {
      await this.#route(socket, session, peer);
    } catch (error) {
      this.#refuse(socket, peer, `internal error: ${error instanceof Error ? error.message : String(error)}`);
    }
  }

  #refuse(socket: Socket, peer: string, reason: string, code: number = ERROR_CODE.DESTINATION): void {
    this.#noteRefusal(peer, reason);
    refuseLink(socket, code, reason);
  }

  async #route(socket: Socket, session: LinkSession, peer: string): Promise<void> {
    const claim = session.peerClaim;
    if (!claim) {
      this.#refuse(
        socket,
        peer,
        `send speaks link protocol ${session.peerVersion.major}.${session.peerVersion.minor}, which names no destination: upgrade vmprune on the source host`,
        ERROR_CODE.PROTOCOL,
      );
      return;
    }
    if (this.#closing) {
      this.#refuse(socket, peer, "the receive service is shutting down", ERROR_CODE.ABORTED);
      return;
    }
    const id = claim.migration.toString("hex");
    const who = `${peer} (migration ${id.slice(0, 8)}, channel ${claim.channel})`;
    let migration = this.#migrations.get(id);
    if (migration) {
      if (migration.target !== claim.target) {
        this.#refuse(
          socket,
          who,
          `the migration's other channels go to ${migration.target}, this one to ${claim.target}`,
        );
        return;
      }
      migration.add(claim.channel, socket, session);
      return;
    }
    const max = this.#options.maxMigrations ?? DEFAULT_MAX_MIGRATIONS;
    if (this.#migrations.size >= max) {
      this.#refuse(socket, who, `busy: ${this.#migrations.size} migrations running (at most ${max})`);
      return;
    }
    const resolved = await resolveDestination(this.#options.allowed, claim.target);
    if ("refused" in resolved) {
      this.#refuse(socket, who, resolved.refused);
      return;
    }
    const destination = formatEndpoint(resolved.endpoint);
    // A migration that arrived while the destination was being looked up.
    migration = this.#migrations.get(id);
    if (!migration) {
      const busy = [...this.#migrations.values()].find((m) => formatEndpoint(m.destination) === destination);
      if (busy) {
        this.#refuse(socket, who, `destination ${destination} is taken by migration ${busy.id.slice(0, 8)}`);
        return;
      }
      if (this.#closing) {
        this.#refuse(socket, who, "the receive service is shutting down", ERROR_CODE.ABORTED);
        return;
      }
      const created = new ServedMigrationRelay(
        id,
        claim.target,
        resolved.endpoint,
        this.#options,
        (s, reason) => this.#refuse(s, describePeer(s), reason),
      );
      migration = created;
      this.#migrations.set(id, created);
      this.#log(`receive service: migration ${id.slice(0, 8)} from ${peer} into ${destination}`);
      void created.relay.done.then((relayReport) => {
        this.#migrations.delete(id);
        const report: ServedMigration = {
          migration: id,
          destination,
          ...receiveReport(relayReport, created.codecs),
        };
        // A service runs for months: keep the last ones for the report at close (each was logged as it ended).
        if (this.#done.length >= MAX_REPORTS_KEPT) this.#done.shift();
        this.#done.push(report);
        this.#log(
          `receive service: migration ${id.slice(0, 8)} into ${destination} ended${relayReport.error ? `: ${relayReport.error}` : ""}`,
        );
        this.#options.onMigration?.(report);
      });
    }
    migration.add(claim.channel, socket, session);
  }
}
