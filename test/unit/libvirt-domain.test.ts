/**
 * The libvirt entry point's pure parts against what libvirt 9.0 printed in the lab (test/fixtures/libvirt/,
 * captured from src/lab/libvirt-lab.ts's daemons): the domain XML (RAM backing, the second QMP monitor),
 * `virsh domjobinfo --completed --rawstats` on both sides, the PID file locations, the QEMU command line check,
 * and the refusals with their ways out.
 */
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { cmdlineNamesDomain, pidFileCandidates, SYSTEM_STATE_DIR } from "../../src/libvirt/domain-process.ts";
import { DomainXmlError, extraQmpSocket, parseDomainXml } from "../../src/libvirt/domain-xml.ts";
import {
  describeRefusals,
  refusalsForQemuState,
  refusalsForRam,
  refusalsForVirshOptions,
  unprunedNotes,
} from "../../src/libvirt/refusals.ts";
import { JOB_COMPLETED, JOB_OPERATION, migrationFigures, parseJobStats } from "../../src/libvirt/virsh.ts";
import { parseXml, XmlError } from "../../src/libvirt/xml.ts";

const FIXTURES = join(import.meta.dirname, "..", "fixtures", "libvirt");
const fixture = (name: string) => readFileSync(join(FIXTURES, name), "utf8");

test("live domain XML with shared file-backed RAM and a second -qmp in <qemu:commandline>", () => {
  const d = parseDomainXml(fixture("live-shared.xml"));
  assert.equal(d.name, "vmprune-lab");
  assert.equal(d.uuid, "44211ecc-1b25-406b-badd-3312a305937f");
  assert.equal(d.id, 2);
  assert.equal(d.type, "qemu");
  assert.equal(d.memoryKiB, 512 * 1024);
  assert.deepEqual(d.ram, { source: "file", access: "shared", hugepages: false, cells: [] });
  assert.equal(d.extraQmpSocket, "/tmp/vmprune-lv/manual/view/qmp.sock");
  assert.deepEqual(d.qemuCommandline, [
    "-qmp",
    "unix:/tmp/vmprune-lv/manual/view/qmp.sock,server=on,wait=off",
  ]);
});

test("inactive XML has no id; private access is read as the trap", () => {
  assert.equal(parseDomainXml(fixture("inactive-shared.xml")).id, undefined);
  const trap = parseDomainXml(fixture("live-private.xml"));
  assert.equal(trap.name, "priv");
  assert.deepEqual(trap.ram, { source: "file", access: "private", hugepages: false, cells: [] });
});

test("the second monitor: -qmp unix:, --qmp, or -chardev socket + -mon mode=control; none otherwise", () => {
  assert.equal(extraQmpSocket(["-qmp", "unix:/run/a.sock,server,nowait"]), "/run/a.sock");
  assert.equal(extraQmpSocket(["--qmp", "unix:/run/a,,b.sock,server=on"]), "/run/a,b.sock");
  assert.equal(
    extraQmpSocket([
      "-chardev",
      "socket,id=m2,path=/run/m2.sock,server=on,wait=off",
      "-mon",
      "chardev=m2,mode=control",
    ]),
    "/run/m2.sock",
  );
  assert.equal(
    extraQmpSocket(["-chardev", "socket,id=m2,path=/run/m2.sock,server=on", "-mon", "chardev=m2"]),
    undefined,
  );
  assert.equal(extraQmpSocket(["-qmp", "tcp:127.0.0.1:4444,server=on"]), undefined);
  assert.equal(extraQmpSocket([]), undefined);
});

test("memory backing variants: anonymous by default, memfd, hugepages, NUMA cells with memAccess", () => {
  const xml = (backing: string, cpu = "") =>
    `<domain type='kvm'><name>d</name><memory unit='GiB'>2</memory>${backing}${cpu}</domain>`;
  assert.deepEqual(parseDomainXml(xml("")).ram, {
    source: "anonymous",
    access: undefined,
    hugepages: false,
    cells: [],
  });
  assert.equal(parseDomainXml(xml("")).memoryKiB, 2 * 1024 * 1024);
  assert.equal(
    parseDomainXml(xml("<memoryBacking><source type='memfd'/></memoryBacking>")).ram.source,
    "memfd",
  );
  assert.equal(parseDomainXml(xml("<memoryBacking><hugepages/></memoryBacking>")).ram.hugepages, true);
  const numa = parseDomainXml(
    xml(
      "<memoryBacking><source type='file'/></memoryBacking>",
      "<cpu><numa><cell id='0' cpus='0' memory='1' unit='GiB' memAccess='shared'/><cell id='1' cpus='1' memory='1' unit='GiB'/></numa></cpu>",
    ),
  );
  assert.deepEqual(numa.ram.cells, [
    { id: 0, access: "shared" },
    { id: 1, access: undefined },
  ]);
  assert.throws(
    () => parseDomainXml(xml("<memoryBacking><access mode='weird'/></memoryBacking>")),
    DomainXmlError,
  );
  assert.throws(() => parseDomainXml("<network><name>x</name></network>"), /expected a <domain> document/);
});

test("the XML reader: entities, CDATA, comments, prefixed names; malformed input names the offset", () => {
  const root = parseXml(
    "<?xml version='1.0'?><!-- c --><a x=\"1 &amp; 2\"><b>&lt;t&#62;&#x41;</b><![CDATA[<raw>]]><p:q v='&apos;'/></a>",
  );
  assert.equal(root.attributes.x, "1 & 2");
  assert.equal(root.children[0]?.text, "<t>A");
  assert.equal(root.text, "<raw>");
  assert.equal(root.children[1]?.name, "p:q");
  assert.equal(root.children[1]?.attributes.v, "'");
  assert.throws(() => parseXml("<a><b></a>"), XmlError);
  assert.throws(() => parseXml("<a>"), /never closed/);
  assert.throws(() => parseXml("<a/><b/>"), /second root/);
  assert.throws(() => parseXml("<a>&nbsp;</a>"), /unknown entity/);
});

test("domjobinfo --completed --rawstats from both daemons after one migration", () => {
  const out = parseJobStats(fixture("domjobinfo-completed-rawstats-out.txt"));
  assert.equal(out.jobType, JOB_COMPLETED);
  assert.equal(out.operation, JOB_OPERATION.migrationOut);
  const figures = migrationFigures(out, "source");
  assert.deepEqual(figures, {
    side: "source",
    timeElapsedMs: 2532,
    downtimeMs: 52,
    dataProcessedBytes: 103847720,
    memoryTotalBytes: 537403392,
    memoryNormalPages: 25071,
    memoryNormalBytes: 102690816,
    memoryConstantPages: 106221,
    iterations: 3,
  });
  const incoming = parseJobStats(fixture("domjobinfo-completed-rawstats-in.txt"));
  assert.equal(incoming.operation, JOB_OPERATION.migrationIn);
  assert.equal(
    incoming.fields.data_processed,
    out.fields.data_processed,
    "both sides report QEMU's counters",
  );
  assert.throws(
    () => parseJobStats(fixture("domjobinfo-completed-out.txt")),
    /no "Job type:" line|not the output/,
  );
});

test("PID file: session socket's runtime dir, $XDG_RUNTIME_DIR, or the system daemon's", () => {
  assert.deepEqual(pidFileCandidates("vm", "qemu:///session?socket=/r/x/libvirt/libvirt-sock", {}), [
    "/r/x/libvirt/qemu/run/vm.pid",
  ]);
  assert.deepEqual(pidFileCandidates("vm", "qemu:///session", { XDG_RUNTIME_DIR: "/run/user/1000" }), [
    "/run/user/1000/libvirt/qemu/run/vm.pid",
  ]);
  assert.deepEqual(pidFileCandidates("vm", undefined, {}), [join(SYSTEM_STATE_DIR, "vm.pid")]);
  assert.deepEqual(pidFileCandidates("vm", "qemu:///system", {}), ["/run/libvirt/qemu/vm.pid"]);
});

test("a PID is the domain's QEMU only if its -name says guest=NAME", () => {
  const cmdline = ["/usr/bin/qemu-system-x86_64", "-name", "guest=vmprune-lab,debug-threads=on", "-S"];
  assert.equal(cmdlineNamesDomain(cmdline, "vmprune-lab"), true);
  assert.equal(cmdlineNamesDomain(cmdline, "vmprune"), false);
  assert.equal(cmdlineNamesDomain(["qemu", "-name", "guest=a,,b,debug-threads=on"], "a,b"), true);
  assert.equal(cmdlineNamesDomain(["qemu", "-name", "plain"], "plain"), true);
  assert.equal(cmdlineNamesDomain(["sleep", "100"], "plain"), false);
});

test("refusals: QEMU TLS, tunnelled, xbzrle, multithread compression, postcopy: each with its way out; multifd: when it is pruned and when not, said", () => {
  assert.deepEqual(refusalsForVirshOptions(["--unsafe", "--persistent", "--bandwidth", "100"]), []);
  const causes = (args: string[]) => refusalsForVirshOptions(args).map((r) => r.cause);
  assert.deepEqual(causes(["--tls"]), ["--tls"]);
  assert.deepEqual(causes(["--tunnelled"]), ["--tunnelled"]);
  assert.deepEqual(causes(["--compressed"]), ["--compressed"]);
  assert.deepEqual(causes(["--comp-methods", "mt,xbzrle"]), ["--comp-methods xbzrle", "--comp-methods mt"]);
  assert.deepEqual(causes(["--postcopy-after-precopy"]), ["--postcopy"]);
  // multifd runs; the operator is told when its channels are pruned and when they are relayed as they are.
  assert.deepEqual(causes(["--parallel", "--parallel-connections", "4"]), []);
  assert.match(
    unprunedNotes(["--parallel"], [])[0] ?? "",
    /writes zeros in their place.*relays them unpruned/,
  );
  assert.match(unprunedNotes([], [{ capability: "multifd", state: true }])[0] ?? "", /relays them unpruned/);
  assert.deepEqual(unprunedNotes(["--unsafe"], [{ capability: "multifd", state: false }]), []);
  const tls = describeRefusals(refusalsForVirshOptions(["--tls"]));
  assert.match(tls, /ciphertext/);
  assert.match(tls, /Way out: leave out --tls/);
  const state = refusalsForQemuState(
    [
      { capability: "xbzrle", state: true },
      { capability: "postcopy-ram", state: true },
      { capability: "multifd", state: false },
    ],
    { "tls-creds": "" },
  );
  assert.deepEqual(
    state.map((r) => r.cause),
    ["xbzrle capability on", "postcopy-ram capability on"],
  );
  assert.deepEqual(
    refusalsForQemuState([], { "tls-creds": "objlibvirt_migrate_tls0" })[0]?.cause,
    "tls-creds objlibvirt_migrate_tls0",
  );
});

test("the share=off trap: a private RAM file is refused with the domain XML fix, unless process memory is asked for", () => {
  const domain = parseDomainXml(fixture("live-private.xml"));
  const sources = [
    {
      block: "pc.ram",
      sizeBytes: 512 << 20,
      kind: "private-file" as const,
      memPath: "/var/lib/libvirt/qemu/ram/3-priv/pc.ram",
    },
  ];
  const [refusal, ...more] = refusalsForRam(sources, domain, false);
  assert.equal(more.length, 0);
  assert.ok(refusal);
  assert.equal(refusal.cause, "pc.ram in /var/lib/libvirt/qemu/ram/3-priv/pc.ram without share=on");
  assert.match(refusal.reason, /stale bytes/);
  assert.match(
    refusal.wayOut,
    /<memoryBacking><source type='file'\/><access mode='shared'\/><\/memoryBacking>/,
  );
  assert.match(refusal.wayOut, /--ram-from-process/);
  assert.deepEqual(refusalsForRam(sources, domain, true), []);
  const shared = [{ block: "pc.ram", sizeBytes: 512 << 20, kind: "shared-file" as const, memPath: "/x" }];
  assert.deepEqual(refusalsForRam(shared, domain, false), []);
  const numa = { ...domain, ram: { ...domain.ram, cells: [{ id: 0, access: undefined }] } };
  assert.match(refusalsForRam(sources, numa, false)[0]?.wayOut ?? "", /memAccess='shared'/);
});
