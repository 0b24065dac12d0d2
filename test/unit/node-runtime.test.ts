import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { missingRelayFlags, RELAY_NODE_FLAGS, relayFlagsNotice } from "../../src/cli/node-runtime.ts";
import { REPO_ROOT } from "../../src/lab/paths.ts";

test("the CLI's shebang and the demo script start Node with the relay's flags", () => {
  const shebang = readFileSync(join(REPO_ROOT, "src/cli/main.ts"), "utf8").split("\n")[0] ?? "";
  // `env -S` splits the rest into arguments (a plain shebang would pass "node --flag" as one program name).
  assert.match(shebang, /^#!\/usr\/bin\/env -S node /);
  const demo = readFileSync(join(REPO_ROOT, "scripts/demo.sh"), "utf8");
  for (const flag of RELAY_NODE_FLAGS) {
    assert.ok(shebang.split(" ").includes(flag), `shebang has ${flag}`);
    assert.match(demo, new RegExp(`^node .*${flag}.* dist/cli/main\\.js demo`, "m"), `demo.sh has ${flag}`);
  }
});

test("the benchmarks run vmprune (send in their own process) with the relay's flags", () => {
  const scripts = (
    JSON.parse(readFileSync(join(REPO_ROOT, "package.json"), "utf8")) as { scripts: Record<string, string> }
  ).scripts;
  const benches = Object.entries(scripts).filter(([name]) => name.startsWith("bench:"));
  assert.ok(benches.length > 0);
  for (const [name, command] of benches)
    for (const flag of RELAY_NODE_FLAGS) assert.ok(command.split(" ").includes(flag), `${name} has ${flag}`);
});

test("a process started without the relay's flags gets a notice naming them; with them, or another value, none", () => {
  assert.deepEqual(missingRelayFlags([]), [...RELAY_NODE_FLAGS]);
  const notice = relayFlagsNotice(["--import", "tsx"]);
  assert.ok(notice);
  for (const flag of RELAY_NODE_FLAGS) assert.ok(notice.includes(flag));
  assert.equal(relayFlagsNotice([...RELAY_NODE_FLAGS]), null);
  const name = RELAY_NODE_FLAGS[0]?.split("=")[0] ?? "";
  assert.equal(relayFlagsNotice([`${name}=512`]), null, "an operator's own value is theirs to choose");
  assert.deepEqual(
    missingRelayFlags([`${name}x=1`]),
    [...RELAY_NODE_FLAGS],
    "a flag that only starts alike is not it",
  );
});
