import assert from "node:assert/strict";
import { mkdir, mkdtemp, readdir, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { type TestContext, test } from "node:test";
import {
  backportsStanza,
  PrivateApt,
  parseDeb822Sources,
  parseDependsFields,
  parseOneLineSources,
  releaseStanzas,
} from "../../src/lab/apt.ts";

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

test("release stanzas: other releases on the system's mirror and keyring, -security on its security entry", () => {
  const text = releaseStanzas(parseDeb822Sources(DEB822), "bookworm", [
    "bullseye",
    "trixie-backports",
    "sid",
    "bullseye-security",
  ]);
  const stanzas = parseDeb822Sources(text);
  assert.deepEqual(stanzas, [
    {
      types: ["deb"],
      uris: ["http://mirror.example/debian"],
      suites: ["bullseye", "trixie-backports", "sid"],
      components: ["main"],
      signedBy: "/usr/share/keyrings/debian-archive-keyring.gpg",
    },
    {
      types: ["deb"],
      uris: ["http://mirror.example/debian-security"],
      suites: ["bullseye-security"],
      components: ["main"],
    },
  ]);
  assert.throws(
    () => releaseStanzas(parseDeb822Sources(DEB822), "trixie", ["sid"]),
    /no apt source for Debian 'trixie'/,
  );
});

test("Depends fields: every alternative, without versions or architectures", () => {
  const show = [
    "Package: linux-image-7.2.13+deb14-amd64",
    "Pre-Depends: linux-base (>= 4.17~)",
    "Depends: dracut | initramfs-tools (>= 0.120+deb8u2) | linux-initramfs-tool, linux-binary-7.2.13+deb14-amd64 (= 7.2.13-1), kmod:any",
    "Description: Linux",
    "",
    "Package: linux-image-7.2.13+deb14-amd64",
    "Depends: older-stanza",
  ].join("\n");
  assert.deepEqual(parseDependsFields(show), [
    "linux-base",
    "dracut",
    "initramfs-tools",
    "linux-initramfs-tool",
    "linux-binary-7.2.13+deb14-amd64",
    "kmod",
  ]);
});

/** A private apt root and a fake /etc/apt (deb822 and one-line sources), for preparing without apt-get update. */
async function fakeApt(t: TestContext): Promise<{ root: string; systemAptDir: string }> {
  const dir = await mkdtemp(join(tmpdir(), "vmprune-apt-"));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const systemAptDir = join(dir, "etc-apt");
  await mkdir(join(systemAptDir, "sources.list.d"), { recursive: true });
  await writeFile(join(systemAptDir, "sources.list.d", "debian.sources"), DEB822);
  await writeFile(join(systemAptDir, "sources.list.d", "extra.list"), "deb http://extra.example/ x main\n");
  await writeFile(join(systemAptDir, "sources.list"), "deb http://old.example/debian bookworm main\n");
  return { root: join(dir, "apt"), systemAptDir };
}

async function assertPrepared(root: string): Promise<void> {
  const parts = join(root, "sources.list.d");
  assert.deepEqual((await readdir(parts)).sort(), [
    "system-debian.sources",
    "system-extra.list",
    "system-sources.list",
    "vmprune-backports.sources",
  ]);
  assert.equal(await readFile(join(parts, "system-debian.sources"), "utf8"), DEB822);
  assert.match(
    await readFile(join(parts, "vmprune-backports.sources"), "utf8"),
    /Suites: bookworm-backports/,
  );
}

test("prepare: concurrent callers of one configuration share one preparation", async (t) => {
  const { root, systemAptDir } = await fakeApt(t);
  const apt = new PrivateApt(root, "bookworm", { systemAptDir, update: false });
  // ensureQemu asks for four candidate versions at once: four prepare() calls in flight together.
  await Promise.all([apt.prepare(), apt.prepare(), apt.prepare(), apt.prepare()]);
  await assertPrepared(root);
});

test("prepare: two configurations on one root at once (two processes) both succeed", async (t) => {
  const { root, systemAptDir } = await fakeApt(t);
  for (let round = 0; round < 5; round++) {
    await rm(root, { recursive: true, force: true });
    const a = new PrivateApt(root, "bookworm", { systemAptDir, update: false });
    const b = new PrivateApt(root, "bookworm", { systemAptDir, update: false });
    await Promise.all([a.prepare(), b.prepare(), a.prepare(true), b.prepare(true)]);
    await assertPrepared(root);
  }
});

test("prepare: a configuration of other releases holds their suites and none of the system's", async (t) => {
  const { root, systemAptDir } = await fakeApt(t);
  const apt = new PrivateApt(root, "bookworm", {
    systemAptDir,
    update: false,
    includeSystemSources: false,
    added: {
      file: "vmprune-releases.sources",
      stanzas: (entries, codename) => releaseStanzas(entries, codename, ["bullseye", "sid"]),
    },
  });
  await apt.prepare();
  assert.deepEqual(await readdir(join(root, "sources.list.d")), ["vmprune-releases.sources"]);
  assert.match(
    await readFile(join(root, "sources.list.d", "vmprune-releases.sources"), "utf8"),
    /URIs: http:\/\/mirror\.example\/debian\nSuites: bullseye sid\n/,
  );
});
