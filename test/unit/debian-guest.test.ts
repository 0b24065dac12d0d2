/**
 * The Debian guest's pure parts: the bootstrap sources taken from the system's apt entries, the root initrd's
 * init, and pgbench's output as PostgreSQL 15 prints it (progress, summary, aborted clients) split into the
 * rate before / during / after a migration.
 */
import assert from "node:assert/strict";
import { mkdir, mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { parseDeb822Sources, systemSourceEntries } from "../../src/lab/apt.ts";
import { agentUnit, bootstrapSources, customizeScript, rootInitScript } from "../../src/lab/debian-system.ts";
import { DISK_SERIAL } from "../../src/lab/initramfs.ts";
import { parsePgbenchLog, startPgbenchCommand, tpsPhases } from "../../src/lab/pgbench.ts";

const SYSTEM_SOURCES = parseDeb822Sources(`Types: deb
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main contrib
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: https://elsewhere.example/apt
Suites: nodistro
Components: main
`);

test("bootstrap sources: the system's mirror for the release, -updates and -security, main only; nothing else", () => {
  const key = "[signed-by=/usr/share/keyrings/debian-archive-keyring.gpg]";
  assert.deepEqual(bootstrapSources(SYSTEM_SOURCES, "bookworm"), [
    `deb ${key} http://mirror.example/debian bookworm main`,
    `deb ${key} http://mirror.example/debian bookworm-updates main`,
    `deb ${key} http://mirror.example/debian-security bookworm-security main`,
  ]);
  assert.throws(() => bootstrapSources(SYSTEM_SOURCES, "trixie"), /no apt source for Debian 'trixie'/);
});

test("system sources: deb822 and one-line files of sources.list.d, then sources.list", async (t) => {
  const dir = await mkdtemp(join(tmpdir(), "vmprune-apt-"));
  t.after(() => rm(dir, { recursive: true, force: true }));
  await mkdir(join(dir, "sources.list.d"));
  await writeFile(
    join(dir, "sources.list.d", "debian.sources"),
    "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm\nComponents: main\n",
  );
  await writeFile(
    join(dir, "sources.list.d", "extra.list"),
    "deb http://extra.example/debian bookworm-updates main\n",
  );
  await writeFile(
    join(dir, "sources.list"),
    "deb http://mirror.example/debian-security bookworm-security main\n",
  );
  const entries = await systemSourceEntries(dir);
  assert.deepEqual(
    entries.map((e) => `${e.uris[0]} ${e.suites.join(",")}`),
    [
      "http://mirror.example/debian bookworm",
      "http://extra.example/debian bookworm-updates",
      "http://mirror.example/debian-security bookworm-security",
    ],
  );
});

test("root initrd: mounts the disk with the data disk's serial read-write and hands over to systemd", () => {
  const init = rootInitScript();
  assert.match(init, new RegExp(`= "${DISK_SERIAL.data}" \\]`));
  assert.match(init, /mount -t ext4 -o rw "\$root" \/newroot/);
  assert.match(init, /exec switch_root \/newroot \/sbin\/init\n$/);
});

test("agent unit and build hook: the agent on ttyS1 after PostgreSQL; the build's server stopped again", () => {
  assert.match(agentUnit(), /ExecStart=\/usr\/local\/sbin\/vmprune-agent \/dev\/ttyS1/);
  assert.match(agentUnit(), /After=postgresql@15-main.service/);
  const hook = customizeScript({
    agent: "/a",
    vmwork: "/w",
    agentUnit: "/u",
    modulesDir: "/m",
    kernelRelease: "6.1.0-1-cloud-amd64",
  });
  const start = hook.indexOf("pg_ctl -D /var/lib/postgresql/15/main -w -l");
  const init = hook.indexOf("pgbench -i -q -s 20 bench");
  const stop = hook.indexOf("-m fast stop");
  assert.ok(start > 0 && init > start && stop > init, "start, initialise, stop, in that order");
  assert.match(hook, /listen_addresses=''/, "the build's server listens on no TCP port of the host");
});

// pgbench 15.20 in the guest, -P 1 --progress-timestamp --max-tries=10 (shortened).
const PGBENCH_OUTPUT = `pgbench (15.20 (Debian 15.20-0+deb12u1))
starting vacuum...end.
progress: 1796460347.464 s, 10.0 tps, lat 176.850 ms stddev 111.548, 0 failed, 0 retried, 0 retries
progress: 1796460348.468 s, 37.9 tps, lat 102.906 ms stddev 40.103, 0 failed, 0 retried, 0 retries
progress: 1796460349.465 s, 47.2 tps, lat 87.523 ms stddev 34.930, 0 failed, 0 retried, 0 retries
progress: 1796460350.466 s, 25.0 tps, lat 156.294 ms stddev 53.601, 0 failed, 0 retried, 0 retries
progress: 1796460351.463 s, 3.0 tps, lat 129.366 ms stddev 45.018, 0 failed, 0 retried, 0 retries
progress: 1796460352.463 s, 23.0 tps, lat 152.313 ms stddev 44.653, 0 failed, 0 retried, 0 retries
progress: 1796460353.465 s, 26.0 tps, lat 186.410 ms stddev 81.830, 0 failed, 0 retried, 0 retries
transaction type: <builtin: TPC-B (sort of)>
scaling factor: 20
query mode: simple
number of clients: 4
number of threads: 2
maximum number of tries: 10
duration: 20 s
number of transactions actually processed: 497
number of failed transactions: 0 (0.000%)
number of transactions retried: 0 (0.000%)
total number of retries: 0
latency average = 156.897 ms
latency stddev = 76.403 ms
initial connection time = 489.135 ms
tps = 25.287752 (without initial connection time)
PGBENCH-EXIT 0
`;

test("pgbench log: progress lines, the summary and the exit status", () => {
  const log = parsePgbenchLog(PGBENCH_OUTPUT);
  assert.equal(log.progress.length, 7);
  assert.deepEqual(log.progress[0], { atS: 1796460347.464, tps: 10, latencyMs: 176.85, failed: 0 });
  assert.deepEqual(log.summary, { transactions: 497, failed: 0, tps: 25.287752 });
  assert.equal(log.exitStatus, 0);
  assert.deepEqual(log.errors, []);
});

test("pgbench log: an unfinished run has no summary; an aborted client is an error; failures are counted", () => {
  const running = parsePgbenchLog(PGBENCH_OUTPUT.split("transaction type")[0] ?? "");
  assert.equal(running.summary, undefined);
  assert.equal(running.exitStatus, undefined);
  const aborted = parsePgbenchLog(
    `${PGBENCH_OUTPUT.replace(
      "number of failed transactions: 0 (0.000%)",
      "number of failed transactions: 3 (0.600%)",
    ).replace(
      "PGBENCH-EXIT 0",
      "pgbench: error: client 2 aborted in command 5 (SQL) of script 0; FATAL\nRun was aborted; the above results are incomplete.\nPGBENCH-EXIT 2",
    )}`,
  );
  assert.equal(aborted.summary?.failed, 3);
  assert.equal(aborted.exitStatus, 2);
  assert.equal(aborted.errors.length, 2);
});

test("tps phases: a progress line belongs to the phase its second ends in", () => {
  const { progress } = parsePgbenchLog(PGBENCH_OUTPUT);
  const phases = tpsPhases(progress, 1796460349.5, 1796460350.0);
  assert.equal(phases.before.seconds, 3);
  assert.equal(phases.during.seconds, 1, "the line ending 0.47 s after the resume is the migration's");
  assert.equal(phases.after.seconds, 3);
  assert.equal(phases.during.meanTps, 25);
  assert.equal(phases.after.minTps, 3);
  assert.ok(Math.abs(phases.before.meanTps - (10 + 37.9 + 47.2) / 3) < 1e-9);
});

test("pgbench start: detached in its own session as postgres, its exit status appended to its log", () => {
  const command = startPgbenchCommand({ clients: 4, threads: 2, durationS: 30, maxTries: 10 });
  assert.match(command, /setsid -f sh -c/);
  assert.match(
    command,
    /runuser -u postgres -- \/usr\/lib\/postgresql\/15\/bin\/pgbench -c 4 -j 2 -T 30 -P 1/,
  );
  assert.match(command, /--max-tries=10 bench/);
  assert.match(command, /echo "PGBENCH-EXIT \$\?" >> \/run\/pgbench.log/);
});
