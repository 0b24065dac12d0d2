/**
 * Endpoint parsing (src/transport/endpoint.ts) and the socket owner/mode an operator writes
 * (src/transport/owner.ts): every accepted form, and an error that says what was wrong for every refused one.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import {
  EndpointError,
  formatEndpoint,
  MAX_UNIX_PATH_BYTES,
  parseEndpoint,
  qemuMigrationUri,
} from "../../src/transport/endpoint.ts";
import { parseSocketMode, parseSocketOwner } from "../../src/transport/owner.ts";

test("HOST:PORT, [IPV6]:PORT, tcp:HOST:PORT, unix:/PATH and unix:///PATH parse; format reads back", () => {
  const cases: [string, object, string][] = [
    ["127.0.0.1:4444", { host: "127.0.0.1", port: 4444 }, "127.0.0.1:4444"],
    ["localhost:0", { host: "localhost", port: 0 }, "localhost:0"],
    ["[::1]:65535", { host: "::1", port: 65535 }, "[::1]:65535"],
    ["tcp:10.0.0.2:49152", { host: "10.0.0.2", port: 49152 }, "10.0.0.2:49152"],
    ["unix:/run/vmprune/a.sock", { path: "/run/vmprune/a.sock" }, "unix:/run/vmprune/a.sock"],
    [
      "unix:///var/lib/libvirt/qemu/x.sock",
      { path: "/var/lib/libvirt/qemu/x.sock" },
      "unix:/var/lib/libvirt/qemu/x.sock",
    ],
  ];
  for (const [text, endpoint, formatted] of cases) {
    const parsed = parseEndpoint(text);
    assert.deepEqual(parsed, endpoint, text);
    assert.equal(formatEndpoint(parsed), formatted, text);
    assert.deepEqual(parseEndpoint(formatEndpoint(parsed)), parsed, `${text} round-trips`);
  }
  assert.equal(qemuMigrationUri(parseEndpoint("127.0.0.1:4444")), "tcp:127.0.0.1:4444");
  assert.equal(qemuMigrationUri(parseEndpoint("[::1]:4444")), "tcp:[::1]:4444");
  assert.equal(qemuMigrationUri(parseEndpoint("unix:/run/x.sock")), "unix:/run/x.sock");
});

test("refused endpoints say what was wrong and what is expected", () => {
  const cases: [string, RegExp][] = [
    ["4444", /is not an address: expected HOST:PORT, \[IPV6\]:PORT or unix:\/PATH/],
    ["host:", /is not an address/],
    [":4444", /is not an address/],
    ["host:70000", /port 70000 is out of range \(0-65535\)/],
    ["::1:4444", /put an IPv6 address in brackets, e\.g\. \[::1\]:4444/],
    ["/run/x.sock", /needs the unix: prefix, e\.g\. unix:\/run\/x\.sock/],
    ["unix:", /the unix socket path is missing/],
    ["unix:x.sock", /is not absolute: give the full path/],
    ["unix://host/x.sock", /unix:\/PATH or unix:\/\/\/PATH, with no host/],
    [
      `unix:/${"a".repeat(MAX_UNIX_PATH_BYTES)}`,
      /is 108 bytes, more than the kernel's 107: use a shorter path/,
    ],
  ];
  for (const [text, message] of cases)
    assert.throws(
      () => parseEndpoint(text),
      (error: unknown) => {
        assert.ok(error instanceof EndpointError, text);
        assert.match(error.message, message, text);
        assert.doesNotMatch(error.message, /--/, `${text}: a library error names no command-line option`);
        return true;
      },
    );
  // The kernel's limit, exactly: accepted.
  const longest = `/${"a".repeat(MAX_UNIX_PATH_BYTES - 1)}`;
  assert.deepEqual(parseEndpoint(`unix:${longest}`), { path: longest });
});

test("socket mode: octal permission bits; owner: USER, USER:GROUP, :GROUP by name or id", () => {
  assert.equal(parseSocketMode("0660"), 0o660);
  assert.equal(parseSocketMode("600"), 0o600);
  for (const bad of ["660x", "0999", "4755", "66", "rw-rw----", ""])
    assert.throws(
      () => parseSocketMode(bad),
      /is not a socket mode: expected octal permission bits such as 0660/,
      bad,
    );

  assert.deepEqual(parseSocketOwner("0"), { uid: 0 });
  assert.deepEqual(parseSocketOwner("root:root"), { uid: 0, gid: 0 });
  assert.deepEqual(parseSocketOwner("1234:5678"), { uid: 1234, gid: 5678 });
  assert.deepEqual(parseSocketOwner(":0"), { gid: 0 });
  assert.throws(
    () => parseSocketOwner("no-such-user-vmprune"),
    /unknown user "no-such-user-vmprune": give an existing user name or a numeric uid/,
  );
  assert.throws(
    () => parseSocketOwner("root:no-such-group-vmprune"),
    /unknown group "no-such-group-vmprune": give an existing group name or a numeric gid/,
  );
  for (const bad of ["", ":", "a:b:c"])
    assert.throws(() => parseSocketOwner(bad), /is not an owner: expected USER, USER:GROUP or :GROUP/, bad);
});
