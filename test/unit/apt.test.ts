import assert from "node:assert/strict";
import { test } from "node:test";
import { backportsStanza, parseDeb822Sources, parseOneLineSources } from "../../src/lab/apt.ts";

const DEB822 = `Types: deb
# a comment
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main

Types: deb
Enabled: no
URIs: http://disabled.example/debian
Suites: bookworm
Components: main
`;

test("deb822 sources: entries parsed, disabled ones skipped", () => {
  const entries = parseDeb822Sources(DEB822);
  assert.equal(entries.length, 2);
  assert.deepEqual(entries[0]?.suites, ["bookworm", "bookworm-updates"]);
  assert.equal(entries[0]?.signedBy, "/usr/share/keyrings/debian-archive-keyring.gpg");
  assert.equal(entries[1]?.signedBy, undefined);
});

test("one-line sources: options and comments", () => {
  const entries = parseOneLineSources(
    "# comment\ndeb [arch=amd64 signed-by=/k.gpg] http://m.example/debian bookworm main contrib\ndeb-src http://m.example/debian bookworm main\n",
  );
  assert.equal(entries.length, 2);
  assert.deepEqual(entries[0], {
    types: ["deb"],
    uris: ["http://m.example/debian"],
    suites: ["bookworm"],
    components: ["main", "contrib"],
    signedBy: "/k.gpg",
  });
  assert.deepEqual(entries[1]?.types, ["deb-src"]);
});

test("backports stanza reuses the release's mirror and keyring, adds deb-src", () => {
  const stanza = backportsStanza(parseDeb822Sources(DEB822), "bookworm");
  assert.match(
    stanza,
    /Types: deb deb-src\nURIs: http:\/\/mirror\.example\/debian\nSuites: bookworm-backports\n/,
  );
  assert.match(stanza, /Types: deb-src\nURIs: http:\/\/mirror\.example\/debian\nSuites: bookworm\n/);
  assert.match(stanza, /Signed-By: \/usr\/share\/keyrings\/debian-archive-keyring\.gpg/);
  assert.doesNotMatch(stanza, /security/);
});

test("backports stanza: a clear error when the release has no source", () => {
  assert.throws(
    () => backportsStanza(parseDeb822Sources(DEB822), "trixie"),
    /no apt source for Debian 'trixie'/,
  );
});
