/**
 * Half-closing a TLS socket from its own 'data' handler, on real TLS 1.3 sockets: Node's end() there shuts the TLS
 * session down while records of the same read are still undecrypted, and OpenSSL discards them. halfClose
 * (src/transport/socket.ts) waits for the read callback to return, and the relay half-closes through it: a codec
 * that ends the link while it handles a message (send after receive's last ACK) still gets every byte the peer
 * sent after it, its EOF included.
 */
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { once } from "node:events";
import type { Socket } from "node:net";
import { type TestContext, test } from "node:test";
import { type ChannelCodec, Relay } from "../../src/stream/relay.ts";
import type { TcpEndpoint } from "../../src/transport/endpoint.ts";
import { halfClose, connect as transportConnect } from "../../src/transport/socket.ts";
import { type LinkSecurity, tlsClientOptions, tlsServer } from "../../src/transport/tls.ts";
import { localServer } from "../support/fake-peers.ts";

const HOST = "127.0.0.1";
/** Many small writes back to back: each is a TLS record of its own, and several arrive in one read. */
const RECORDS = 2000;
const RECORD_BYTES = 100;

/** A TLS-PSK server that, once secured, writes RECORDS records back to back, then ends. */
async function burstingTlsServer(t: TestContext, security: LinkSecurity): Promise<TcpEndpoint> {
  const secure = tlsServer(security);
  assert.ok(secure);
  const secured: Socket[] = [];
  const server = await localServer(
    t,
    (raw) => {
      void secure(raw).then((socket) => {
        secured.push(socket);
        socket.on("error", () => {});
        socket.resume(); // reads the client's end
        const record = Buffer.alloc(RECORD_BYTES, 0x5a);
        for (let i = 0; i < RECORDS; i++) socket.write(record);
        socket.end();
      });
    },
    { pauseOnConnect: true },
  );
  t.after(() => {
    for (const s of secured) s.destroy();
  });
  return server.endpoint;
}

test("halfClose from a TLS socket's own 'data' handler loses none of that read; a plain socket ends at once", async (t) => {
  const security: LinkSecurity = { mode: "psk", key: randomBytes(32) };
  const endpoint = await burstingTlsServer(t, security);
  const tls = tlsClientOptions(security, endpoint);
  assert.ok(tls);
  const client = transportConnect(endpoint, { allowHalfOpen: true, tls });
  t.after(() => client.destroy());
  let bytes = 0;
  client.on("data", (chunk: Buffer) => {
    if (bytes === 0) halfClose(client);
    bytes += chunk.length;
  });
  await once(client, "end");
  assert.equal(
    bytes,
    RECORDS * RECORD_BYTES,
    "every record the server sent, not just the first read's first",
  );
  assert.ok(client.writableEnded, "and the client did half-close");

  const plain = await localServer(t, (s) => s.resume());
  const socket = transportConnect(plain.endpoint);
  t.after(() => socket.destroy());
  await once(socket, "connect");
  halfClose(socket);
  assert.ok(socket.writableEnded, "a plain socket is half-closed at once");
});

test("a relay codec that ends its TLS upstream while handling a message still gets the rest and the end", async (t) => {
  const security: LinkSecurity = { mode: "psk", key: randomBytes(32) };
  const to = await burstingTlsServer(t, security);
  const tls = tlsClientOptions(security, to);
  assert.ok(tls);
  let fromUpstream = 0;
  let sawEnd = false;
  // Like send: the source has ended, and the first message back (the last ACK) lets it half-close the link.
  const codec: ChannelCodec = {
    fromSource: () => ({}),
    sourceEnded: () => ({}),
    fromUpstream: (chunk) => {
      const first = fromUpstream === 0;
      fromUpstream += chunk.length;
      return first ? { endUpstream: true } : {};
    },
    upstreamEnded: () => {
      sawEnd = true;
      return { endSource: true };
    },
  };
  const relay = await Relay.start({
    listen: { host: HOST, port: 0 },
    to,
    upstreamTls: { options: tls, describeFailure: (error) => error.message },
    createChannelCodec: () => codec,
  });
  t.after(() => relay.close());
  const source = transportConnect(relay.address, { allowHalfOpen: true });
  t.after(() => source.destroy());
  source.resume();
  source.end(Buffer.from("QEVM"));
  await once(source, "end");
  assert.equal(fromUpstream, RECORDS * RECORD_BYTES, "every byte the destination sent after the half-close");
  assert.ok(sawEnd, "and its end");
  const report = await relay.done;
  assert.equal(report.error, undefined);
});
