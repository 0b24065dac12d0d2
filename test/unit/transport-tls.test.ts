/**
 * The link's TLS (src/transport/tls.ts) with real sockets and real certificates made by the `openssl` command:
 * TLS-PSK and mutual x509 carry a migration intact both ways over TLS 1.3; another key, another CA, an expired
 * certificate, a client without a certificate, a wrong server name and a plaintext peer are each refused before
 * receive connects to the destination, with a reason on both sides, and receive goes on serving; plaintext only
 * when both sides ask for it.
 */
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { once } from "node:events";
import { connect, createServer, type Socket } from "node:net";
import { type TestContext, test } from "node:test";
import { connect as tlsConnect } from "node:tls";
import { type ReceiveOptions, type RunningReceive, startReceive } from "../../src/migrate/link-receive.ts";
import { type SendOptions, startSend } from "../../src/migrate/send.ts";
import type { TcpEndpoint } from "../../src/transport/endpoint.ts";
import { connect as transportConnect } from "../../src/transport/socket.ts";
import {
  type LinkSecurity,
  PLAINTEXT_WARNING,
  plaintextNotice,
  tlsClientOptions,
  tlsServer,
} from "../../src/transport/tls.ts";
import { type FakeDestination, fakeDestination, MiB, sourceSends, tempDir } from "../support/fake-peers.ts";
import { makePki } from "../support/pki.ts";

const timeout = 60_000;
const LOCAL: TcpEndpoint = { host: "127.0.0.1", port: 0 };

function fakeStream(bytes: number): Buffer {
  const head = Buffer.from([0x51, 0x45, 0x56, 0x4d, 0, 0, 0, 3]);
  return Buffer.concat([head, randomBytes(bytes - head.length)]);
}

async function receiveOn(
  t: TestContext,
  destination: FakeDestination,
  options: Pick<ReceiveOptions, "psk" | "security">,
  lines: string[],
): Promise<RunningReceive> {
  const receive = await startReceive({
    listen: LOCAL,
    to: destination.endpoint,
    ...options,
    log: (line) => lines.push(line),
  });
  t.after(() => receive.relay.close());
  return receive;
}

/** One send run against `to`: a 4 MiB stream; resolves with what the source got back and send's report. */
async function sendOnce(
  t: TestContext,
  to: TcpEndpoint,
  link: NonNullable<SendOptions["link"]>,
  lines: string[] = [],
) {
  const send = await startSend({ listen: LOCAL, to, link, log: (line) => lines.push(line) });
  t.after(() => send.relay.close());
  const stream = fakeStream(4 * MiB);
  const sent = await sourceSends(send.relay.address, stream);
  const report = await send.done;
  return { stream, sent, report };
}

/** The happy path: the stream intact at the destination, PONG back at the source, TLS 1.3 in both logs. */
async function assertMigrates(
  t: TestContext,
  destination: FakeDestination,
  receive: RunningReceive,
  link: NonNullable<SendOptions["link"]>,
  receiveLog: string[],
  expectLog: RegExp,
): Promise<void> {
  const sendLog: string[] = [];
  const before = destination.received.length;
  const { stream, sent, report } = await sendOnce(t, receive.relay.address, link, sendLog);
  assert.equal(report.relay.error, undefined, report.relay.error);
  assert.deepEqual(sent, { replies: Buffer.from("PONG") }, "the return path crossed the link");
  const toQemu = destination.received[before];
  assert.ok(toQemu, "the destination got a connection");
  assert.ok((await toQemu).equals(stream), "the stream arrived intact");
  assert.ok(
    sendLog.some((l) => expectLog.test(l)),
    `send's log names the link's protection: ${sendLog.join(" | ")}`,
  );
  assert.ok(
    receiveLog.some((l) => expectLog.test(l)),
    `receive's log names the link's protection: ${receiveLog.join(" | ")}`,
  );
  for (const line of sendLog.filter((l) => /authenticated/.test(l))) t.diagnostic(`send: ${line}`);
}

test("TLS-PSK socket pair: TLS 1.3 with a SHA-256 suite, bytes intact both ways, half-close", {
  timeout,
}, async (t) => {
  const key = randomBytes(32);
  const security: LinkSecurity = { mode: "psk", key };
  const secure = tlsServer(security);
  assert.ok(secure);
  const accepted: Promise<Socket>[] = [];
  const server = createServer({ allowHalfOpen: true, pauseOnConnect: true }, (raw) => {
    accepted.push(secure(raw));
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  t.after(() => server.close());
  const address = server.address();
  assert.ok(address && typeof address !== "string");
  const endpoint = { host: "127.0.0.1", port: address.port };
  const tlsOptions = tlsClientOptions(security, endpoint);
  assert.ok(tlsOptions);
  const client = transportConnect(endpoint, { allowHalfOpen: true, tls: tlsOptions });
  t.after(() => client.destroy());
  await once(client, "secureConnect");
  const serverSide = await accepted[0];
  assert.ok(serverSide && "getProtocol" in serverSide);
  assert.ok("getProtocol" in client);
  const clientTls = client as import("node:tls").TLSSocket;
  const serverTls = serverSide as import("node:tls").TLSSocket;
  assert.equal(clientTls.getProtocol(), "TLSv1.3");
  assert.equal(serverTls.getProtocol(), "TLSv1.3");
  assert.equal(clientTls.getCipher().standardName, "TLS_AES_128_GCM_SHA256");
  // Both ways, and the server still writes after the client's half-close (the link's EOF rule 6 needs it).
  const payload = randomBytes(3 * MiB);
  const atServer: Buffer[] = [];
  serverTls.on("data", (c: Buffer) => atServer.push(c));
  serverTls.on("end", () => serverTls.end(Buffer.from("after-eof")));
  serverTls.resume();
  const atClient: Buffer[] = [];
  client.on("data", (c: Buffer) => atClient.push(c));
  client.end(payload);
  await once(client, "end");
  assert.ok(Buffer.concat(atServer).equals(payload));
  assert.equal(Buffer.concat(atClient).toString(), "after-eof");
});

test("TLS-PSK (the default with a key): migrates; another key, a plaintext send and plain QEMU bytes are refused before the destination; receive keeps serving", {
  timeout,
}, async (t) => {
  const psk = randomBytes(32);
  const destination = await fakeDestination(t);
  const receiveLog: string[] = [];
  const receive = await receiveOn(t, destination, { psk }, receiveLog);

  // Another key: refused by TLS itself.
  const wrong = await sendOnce(t, receive.relay.address, { psk: randomBytes(32) });
  assert.equal(wrong.sent.replies.length, 0);
  assert.match(wrong.report.relay.error ?? "", /TLS handshake failed.*different link keys/);
  // A plaintext send (the right key, no TLS): its HELLO is no TLS ClientHello.
  const plainSendLog: string[] = [];
  const plain = await sendOnce(
    t,
    receive.relay.address,
    { psk, security: { mode: "plaintext" } },
    plainSendLog,
  );
  assert.match(plain.report.relay.error ?? "", /could not be opened.*receive (closed|reset) the connection/);
  assert.ok(plainSendLog.some((l) => /WARNING: the link is NOT encrypted/.test(l)));
  // A source QEMU pointed at receive by mistake.
  const qemu = connect({ host: "127.0.0.1", port: receive.relay.address.port });
  qemu.on("error", () => {});
  await once(qemu, "connect");
  qemu.write(fakeStream(64 * 1024));
  await once(qemu, "close");
  // A client that connects and says nothing is cut by the TLS handshake timeout (10 s): not waited for here.

  assert.equal(destination.sockets.length, 0, "no refused peer reached the destination");
  await assertMigrates(t, destination, receive, { psk }, receiveLog, /over TLSv1\.3 TLS_AES_128_GCM_SHA256/);
  const report = await receive.done;
  assert.equal(report.relay.error, undefined, report.relay.error);
  const refused = report.relay.refused ?? [];
  for (const r of refused) t.diagnostic(`receive refused: ${r.reason}`);
  for (const r of [wrong, plain]) t.diagnostic(`send failed: ${r.report.relay.error}`);
  assert.equal(refused.length, 3, JSON.stringify(refused));
  assert.match(refused[0]?.reason ?? "", /TLS handshake failed.*different link keys/);
  for (const r of refused.slice(1)) assert.match(r.reason, /TLS handshake failed.*does not speak TLS/);
});

test("x509: mutual certificates migrate over TLS 1.3; other CA, expired, no client certificate, wrong server name and other-CA server are refused before the destination", {
  timeout,
}, async (t) => {
  const pki = makePki(tempDir(t));
  const destination = await fakeDestination(t);
  const receiveLog: string[] = [];
  const receive = await receiveOn(
    t,
    destination,
    { security: { mode: "x509", dir: pki.server } },
    receiveLog,
  );
  const to = receive.relay.address;
  const x509 = (dir: string, hostname?: string): NonNullable<SendOptions["link"]> => ({
    security: { mode: "x509", dir, ...(hostname ? { hostname } : {}) },
  });

  const otherCa = await sendOnce(t, to, x509(pki.otherCaClient));
  assert.notEqual(otherCa.report.relay.error, undefined, "a client of another CA fails");
  const expired = await sendOnce(t, to, x509(pki.expiredClient));
  assert.notEqual(
    expired.report.relay.error,
    undefined,
    `an expired client certificate fails: ${JSON.stringify(expired.report)} ${receiveLog.join("\n")}`,
  );
  // A client presenting no certificate (tls.connect with the CA only).
  const bare = tlsConnect({ host: "127.0.0.1", port: to.port, ca: undefined, rejectUnauthorized: false });
  bare.on("error", () => {});
  // Not events.once: it would reject on the 'error' (the server's "certificate required" alert) this expects.
  await new Promise((resolve) => bare.once("close", resolve));

  // The server side of the check: the client refuses before sending a link byte.
  const rogueLog: string[] = [];
  const rogue = await receiveOn(
    t,
    destination,
    { security: { mode: "x509", dir: pki.otherCaServer } },
    rogueLog,
  );
  const rogueRun = await sendOnce(t, rogue.relay.address, x509(pki.client));
  assert.match(rogueRun.report.relay.error ?? "", /TLS handshake failed.*not signed by this side's CA/);
  const misnamed = await receiveOn(
    t,
    destination,
    { security: { mode: "x509", dir: pki.wrongNameServer } },
    [],
  );
  const misnamedRun = await sendOnce(t, misnamed.relay.address, x509(pki.client));
  assert.match(
    misnamedRun.report.relay.error ?? "",
    /TLS handshake failed.*(does not name the host|altnames)/i,
  );
  assert.equal(destination.sockets.length, 0, "no refused peer reached the destination");

  // By IP (the certificate carries IP:127.0.0.1), and by name through the hostname option.
  await assertMigrates(t, destination, receive, x509(pki.client), receiveLog, /over TLSv1\.3 TLS_/);
  const report = await receive.done;
  assert.equal(report.relay.error, undefined, report.relay.error);
  const reasons = (report.relay.refused ?? []).map((r) => r.reason);
  for (const r of reasons) t.diagnostic(`receive refused: ${r}`);
  for (const r of [otherCa, expired, rogueRun, misnamedRun])
    t.diagnostic(`send failed: ${r.report.relay.error}`);
  for (const r of [otherCa, expired])
    assert.match(r.report.relay.error ?? "", /receive refused this side's client certificate/);
  assert.equal(reasons.length, 3, JSON.stringify(reasons));
  assert.match(reasons[0] ?? "", /TLS handshake failed.*(not signed by this side's CA|unknown ca)/i);
  assert.match(reasons[1] ?? "", /TLS handshake failed.*expired/);
  assert.match(reasons[2] ?? "", /TLS handshake failed.*(no certificate|certificate)/);

  const second = await receiveOn(t, destination, { security: { mode: "x509", dir: pki.server } }, receiveLog);
  await assertMigrates(
    t,
    destination,
    second,
    x509(pki.client, "localhost"),
    receiveLog,
    /over TLSv1\.3 TLS_/,
  );
});

test("plaintext only when both sides ask for it: it still migrates, and both warn", {
  timeout,
}, async (t) => {
  const psk = randomBytes(32);
  const destination = await fakeDestination(t);
  const receiveLog: string[] = [];
  const receive = await receiveOn(t, destination, { psk, security: { mode: "plaintext" } }, receiveLog);
  assert.ok(receiveLog.some((l) => /WARNING: the link is NOT encrypted/.test(l)));
  // A TLS send against a plaintext receive: its ClientHello is no link HELLO.
  const tls = await sendOnce(t, receive.relay.address, { psk });
  assert.match(tls.report.relay.error ?? "", /TLS handshake failed/);
  assert.equal(destination.sockets.length, 0);
  await assertMigrates(
    t,
    destination,
    receive,
    { psk, security: { mode: "plaintext" } },
    receiveLog,
    /authenticated \(plaintext\)/,
  );
  const report = await receive.done;
  t.diagnostic(`receive refused: ${report.relay.refused?.[0]?.reason}`);
  t.diagnostic(`send failed: ${tls.report.relay.error}`);
  assert.equal(report.relay.refused?.length, 1);
});

test("a client that never starts its TLS handshake is cut after the handshake timeout, with the reason", {
  timeout,
}, async (t) => {
  const secure = tlsServer({ mode: "psk", key: randomBytes(32) }, 300);
  assert.ok(secure);
  const outcome: Promise<string>[] = [];
  const server = createServer({ pauseOnConnect: true }, (raw) => {
    outcome.push(
      secure(raw).then(
        () => "secured",
        (error: unknown) => (error instanceof Error ? error.message : String(error)),
      ),
    );
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  t.after(() => server.close());
  const address = server.address();
  assert.ok(address && typeof address !== "string");
  const silent = connect({ host: "127.0.0.1", port: address.port });
  silent.on("error", () => {});
  t.after(() => silent.destroy());
  await new Promise((resolve) => silent.once("close", resolve));
  assert.match((await outcome[0]) ?? "", /TLS handshake failed.*did not complete a TLS handshake in time/);
});

test("a plaintext link that vmprune chose says why instead of warning; one the operator asked for warns", () => {
  assert.equal(plaintextNotice({ mode: "plaintext" }), PLAINTEXT_WARNING);
  assert.equal(
    plaintextNotice({ mode: "plaintext", why: "one process" }),
    "the link is not encrypted: one process",
  );
  assert.equal(plaintextNotice({ mode: "psk", key: randomBytes(32) }), undefined);
});
