import assert from "node:assert/strict";
import { rm } from "node:fs/promises";
import { createServer, type Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { formatRequest, GuestAgent, GuestCommandError, parseReply } from "../../src/lab/guest-agent.ts";

const b64 = (s: string) => Buffer.from(s).toString("base64");

test("request line encodes the command in base64", () => {
  assert.equal(formatRequest(7, 1500, "echo hi"), `VMPRUNE-REQ 7 1500 ${b64("echo hi")}\n`);
});

test("reply parsing: fields, empty fields, and non-replies", () => {
  assert.deepEqual(parseReply(`VMPRUNE-RES 7 3 ${b64("out")} -`), {
    id: 7,
    result: { status: 3, stdout: "out", stderr: "" },
  });
  assert.equal(parseReply("[   1.0] boot noise"), undefined);
  assert.equal(parseReply("VMPRUNE-RES x 0 - -"), undefined);
  assert.equal(parseReply("VMPRUNE-RES 1 0 -"), undefined);
});

test("client skips noise and stale replies, matches its own id, maps status", async (t) => {
  const path = join(tmpdir(), `agent-${process.pid}.sock`);
  await rm(path, { force: true });
  const server = createServer((socket: Socket) => {
    let buffer = "";
    socket.on("data", (chunk) => {
      buffer += chunk.toString();
      for (let at = buffer.indexOf("\n"); at >= 0; at = buffer.indexOf("\n")) {
        const [, id, , cmd64] = buffer.slice(0, at).split(" ");
        buffer = buffer.slice(at + 1);
        const command = Buffer.from(cmd64 ?? "", "base64").toString();
        // Noise and a reply to some other request come first, as after a reconnect.
        socket.write(`garbage line\nVMPRUNE-RES 999999999 0 ${b64("stale")} -\n`);
        const status = command === "false" ? 1 : 0;
        socket.write(
          `VMPRUNE-RES ${id} ${status} ${b64(`ran ${command}`)} ${status ? b64("failed") : "-"}\n`,
        );
      }
    });
  });
  await new Promise<void>((resolve) => server.listen(path, resolve));
  const agent = new GuestAgent(path);
  t.after(async () => {
    agent.disconnect();
    server.close();
    await rm(path, { force: true });
  });
  assert.equal(await agent.run("echo a"), "ran echo a");
  const [a, b] = await Promise.all([agent.run("one"), agent.run("two")]);
  assert.equal(a, "ran one");
  assert.equal(b, "ran two");
  const failed = await agent.exec("false");
  assert.equal(failed.status, 1);
  await assert.rejects(
    agent.run("false"),
    (error: unknown) => error instanceof GuestCommandError && /exited 1: failed/.test(error.message),
  );
});
