/**
 * The systemd unit shipped in deploy/systemd: `systemd-analyze verify` passes on it (in a root of its own, with
 * the system's units and an executable `vmprune` on systemd's search path, as the README installs it), and its
 * ExecStart, with the example environment file's settings (pointed at a temporary directory), starts a real
 * receive service that a SIGTERM stops cleanly, as `systemctl stop` would.
 */
import assert from "node:assert/strict";
import { spawn, spawnSync } from "node:child_process";
import { once } from "node:events";
import { chmodSync, cpSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { join, resolve } from "node:path";
import { test } from "node:test";
import { tempDir } from "../support/fake-peers.ts";

const REPO = resolve(import.meta.dirname, "../..");
const UNIT = join(REPO, "deploy/systemd/vmprune-receive.service");
const ENV_EXAMPLE = join(REPO, "deploy/systemd/receive.env");

/** KEY=VALUE lines of an EnvironmentFile (comments and blank lines skipped). */
function environmentFile(text: string): Record<string, string> {
  const env: Record<string, string> = {};
  for (const line of text.split("\n")) {
    const m = /^([A-Z_][A-Z0-9_]*)=(.*)$/.exec(line.trim());
    if (m?.[1] !== undefined && m[2] !== undefined) env[m[1]] = m[2];
  }
  return env;
}

/** ExecStart's words with ${VAR} (one word) and $VAR (split on spaces) substituted, as systemd does. */
function execStart(unit: string, env: Record<string, string>): string[] {
  const line = /^ExecStart=(.*)$/m.exec(unit)?.[1];
  assert.ok(line, "the unit has an ExecStart");
  return line.split(/\s+/).flatMap((word) => {
    const braced = /^\$\{(\w+)\}$/.exec(word);
    if (braced?.[1]) return [env[braced[1]] ?? ""];
    const bare = /^\$(\w+)$/.exec(word);
    if (bare?.[1]) return (env[bare[1]] ?? "").split(/\s+/).filter(Boolean);
    return [word];
  });
}

test("systemd-analyze verify accepts vmprune-receive.service", (t) => {
  const root = tempDir(t);
  mkdirSync(join(root, "usr/lib/systemd"), { recursive: true });
  cpSync("/usr/lib/systemd/system", join(root, "usr/lib/systemd/system"), { recursive: true });
  mkdirSync(join(root, "etc/systemd/system"), { recursive: true });
  cpSync(UNIT, join(root, "etc/systemd/system/vmprune-receive.service"));
  mkdirSync(join(root, "usr/local/bin"), { recursive: true });
  const bin = join(root, "usr/local/bin/vmprune");
  writeFileSync(bin, `#!/bin/sh\nexec node --import tsx ${join(REPO, "src/cli/main.ts")} "$@"\n`);
  chmodSync(bin, 0o755);
  const verify = spawnSync("systemd-analyze", ["verify", `--root=${root}`, "vmprune-receive.service"], {
    encoding: "utf8",
  });
  assert.equal(verify.status, 0, `systemd-analyze verify: ${verify.stderr}${verify.stdout}`);
  assert.equal(verify.stderr.trim(), "", "no warnings either");
});

test("the unit's ExecStart with the example settings starts a receive service; SIGTERM stops it cleanly", {
  timeout: 60_000,
}, async (t) => {
  const dir = tempDir(t);
  const env = environmentFile(readFileSync(ENV_EXAMPLE, "utf8"));
  assert.ok(env.VMPRUNE_LISTEN && env.VMPRUNE_ALLOW_DIR && env.VMPRUNE_OPTIONS, JSON.stringify(env));
  // The example's settings, with paths moved into the temporary directory (and no port opened on the network).
  const key = join(dir, "link.key");
  writeFileSync(key, "0123456789abcdef0123456789abcdef");
  mkdirSync(join(dir, "incoming"));
  const local = {
    VMPRUNE_LISTEN: `unix:${join(dir, "svc.sock")}`,
    VMPRUNE_ALLOW_DIR: join(dir, "incoming"),
    VMPRUNE_OPTIONS: env.VMPRUNE_OPTIONS.replace("/etc/vmprune/link.key", key),
  };
  assert.notEqual(local.VMPRUNE_OPTIONS, env.VMPRUNE_OPTIONS, "the example names its key file");
  const [command, ...args] = execStart(readFileSync(UNIT, "utf8"), local);
  assert.equal(command, "vmprune");
  const child = spawn(process.execPath, ["--import", "tsx", join(REPO, "src/cli/main.ts"), ...args], {
    cwd: REPO,
    stdio: ["ignore", "pipe", "pipe"],
  });
  t.after(() => child.kill("SIGKILL"));
  let stderr = "";
  child.stderr.setEncoding("utf8");
  await new Promise<void>((resolveListening, reject) => {
    child.stderr.on("data", (d: string) => {
      stderr += d;
      if (/receive service: listening on unix:/.test(stderr)) resolveListening();
    });
    child.once("exit", () => reject(new Error(`receive exited: ${stderr}`)));
  });
  child.kill("SIGTERM");
  const [code] = await once(child, "exit");
  assert.equal(code, 0, stderr);
  assert.match(stderr, /vmprune receive: stopping; 0 migrations still running/);
  assert.match(stderr, /served 0 migration\(s\), refused 0 connection\(s\)/);
});
