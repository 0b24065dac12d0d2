/**
 * The Node flags vmprune's relaying commands run with, and the notice when a process was started without them.
 *
 * `--initial-old-space-size=128`: every socket read gives the relay a new Buffer, and the read-ahead keeps them
 * long enough to be promoted to V8's old generation, where they count toward its allocation limit. Node 20's V8
 * sizes that limit from the live heap, about 10 MB here, so it ran a full mark-compact every 16-20 MB of stream:
 * 21-33 per migration of the demo's 512 MiB guest, with the collector's helper threads busy as well. A larger
 * initial old space keeps the limit above what the relay has in flight, and young collections free the buffers.
 * Measured:
 * - the demo (loopback, QEMU 7.2, TCG, 2 cores), its three migrations: mark-compacts 83-93 → 3-5; vmprune's own CPU
 *   per migration 0.66-0.77 → 0.40-0.43 s (passthrough), 0.94-1.09 → 0.59-0.71 s (free), 1.25-1.42 → 0.64-0.81 s
 *   (free+cache); the process's largest ArrayBuffer total 95 → 57-59 MiB and RSS 204 → 161-163 MiB (sampled).
 *   128, 256 and 512 behaved alike, and 64 nearly (5 mark-compacts); 32 did not (83).
 * - bench:scale, 4 GiB guest, send and receive as processes (loopback, QEMU 10.0): vmprune free loaded in 4.8-5.6 s
 *   against 5.8-6.0 s without, free+cache in 7.5-8.4 s against 9.3-9.4 s. send's peak RSS moved within its
 *   run-to-run spread (free+cache 172-306 MB without the flag, 277-318 MB with it): not the collector's doing. At
 *   the RSS peak send's ArrayBuffers held 34-54 MB and its heap 43 MB committed; the rest was anonymous memory
 *   malloc kept of the freed socket buffers (RssShmem 0: no guest RAM), whose peak, 88-108 MB, comes during the
 *   migration from the relay's guarded read-ahead.
 * V8 reads the flag only at start-up (v8.setFlagsFromString later has no effect, and NODE_OPTIONS refuses it), so it
 * is on the command line: the CLI's shebang (the installed `vmprune`), scripts/demo.sh, and the lab's send and
 * receive processes (lab/send-process.ts).
 */
export const RELAY_NODE_FLAGS: readonly string[] = ["--initial-old-space-size=128"];

/** The commands that relay a migration stream in this process, for which the flags matter. */
export const RELAYING_COMMANDS: ReadonlySet<string> = new Set([
  "send",
  "receive",
  "migrate",
  "demo",
  "libvirt migrate",
]);

/** The flags of RELAY_NODE_FLAGS that `execArgv` lacks (a flag given with another value counts as given). */
export function missingRelayFlags(execArgv: readonly string[]): string[] {
  return RELAY_NODE_FLAGS.filter((flag) => {
    const name = flag.split("=")[0] ?? flag;
    return !execArgv.some((arg) => arg === name || arg.startsWith(`${name}=`));
  });
}

/** What to log when a relaying command runs without the flags, or null. */
export function relayFlagsNotice(execArgv: readonly string[]): string | null {
  const missing = missingRelayFlags(execArgv);
  if (missing.length === 0) return null;
  return (
    `Node was started without ${missing.join(" ")}: the relay may spend up to half its CPU in the garbage ` +
    `collector. The installed \`vmprune\` command has it; when starting the script with node yourself, pass it: ` +
    `node ${missing.join(" ")} .../dist/cli/main.js`
  );
}
