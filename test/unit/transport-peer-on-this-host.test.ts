/**
 * peerOnThisHost / addressOnThisHost (src/transport/socket.ts), which tell send's link-busy policy that receive
 * shares its host (no network between them, so references would only add CPU): real sockets over a unix path
 * and over loopback TCP count as this host; this namespace's interface addresses do, in any spelling
 * (IPv4-mapped, with a zone); documentation addresses that no interface holds do not.
 */
import assert from "node:assert/strict";
import { once } from "node:events";
import { createServer, type Socket } from "node:net";
import { networkInterfaces } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { addressOnThisHost, connect, peerOnThisHost } from "../../src/transport/socket.ts";
import { localServer, tempDir } from "../support/fake-peers.ts";

test("a loopback TCP peer and a unix-socket peer are on this host", async (t) => {
  const { endpoint } = await localServer(t, () => {});
  const tcp = connect(endpoint);
  t.after(() => tcp.destroy());
  await once(tcp, "connect");
  assert.equal(peerOnThisHost(tcp), true);

  const path = join(tempDir(t), "peer.sock");
  const accepted: Socket[] = [];
  const server = createServer((s) => accepted.push(s));
  await new Promise<void>((resolve) => server.listen(path, resolve));
  t.after(() => {
    for (const s of accepted) s.destroy();
    server.close();
  });
  const unix = connect({ path });
  t.after(() => unix.destroy());
  await once(unix, "connect");
  assert.equal(peerOnThisHost(unix), true);
});

test("this namespace's addresses are this host's, other addresses are not", () => {
  const own = Object.values(networkInterfaces()).flatMap((list) => (list ?? []).map((i) => i.address));
  for (const address of own) assert.equal(addressOnThisHost(address), true, address);
  assert.equal(addressOnThisHost("127.0.0.53"), true, "all of 127/8 is loopback");
  assert.equal(addressOnThisHost("::ffff:127.0.0.1"), true, "IPv4-mapped loopback");
  const v6 = own.find((a) => a.startsWith("fe80:"));
  if (v6) assert.equal(addressOnThisHost(`${v6}%eth0`), true, "an address with its zone");

  // Documentation ranges (RFC 5737, RFC 3849), unless an interface here happens to hold one.
  for (const other of ["203.0.113.9", "::ffff:198.51.100.7", "2001:db8::9"])
    if (!own.includes(other.replace("::ffff:", ""))) assert.equal(addressOnThisHost(other), false, other);
  assert.equal(addressOnThisHost("203.0.113.9", "203.0.113.9"), true, "the connection's own local address");
  assert.equal(addressOnThisHost("127.example"), false, "not an address: not loopback by its prefix");
});
