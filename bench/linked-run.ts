/**
 * How a benchmark runs behind the lab's shaped link (src/lab/shaped-link.ts): the outer process prepares what
 * needs the network, creates the link and re-runs the benchmark's own file inside the link's src namespace with
 * the link described in LINK_ENV; the inner process finds that description and checks it really is in that
 * namespace. Shared by bench:link and bench:postgres.
 */
import { stat } from "node:fs/promises";
import { sweepStaleNamespaces } from "../src/lab/netns.ts";
import { type LinkDescription, runInNamespace, ShapedLink } from "../src/lab/shaped-link.ts";

/** Set in the environment of the inner process: the link it runs in (LinkDescription as JSON). */
export const LINK_ENV = "VMPRUNE_BENCH_LINK";

/** Whether this process runs in the named namespace (its /proc/self/ns/net is the bind-mounted one). */
async function inNamespace(name: string): Promise<boolean> {
  const [self, named] = await Promise.all([stat("/proc/self/ns/net"), stat(`/run/netns/${name}`)]);
  return self.ino === named.ino && self.dev === named.dev;
}

/**
 * Outer process: `prepare` (anything that may need the network: the inner process has no route but the link),
 * then a link of `rateMbit`, and `file` (the benchmark's own path) re-run inside its src side with `argv`.
 * Returns the inner process's exit code; the link is deleted however it ended.
 */
export async function runBehindLink(options: {
  file: string;
  argv: string[];
  rateMbit: number;
  prepare: () => Promise<unknown>;
  log: (line: string) => void;
}): Promise<number> {
  const { log } = options;
  await options.prepare();
  const removed = await sweepStaleNamespaces();
  if (removed.length > 0) log(`removed namespaces of earlier runs: ${removed.join(", ")}`);
  const link = await ShapedLink.create({ rateMbit: options.rateMbit });
  try {
    log(`created ${link.src.name} and ${link.dst.name}: ${await link.qdiscs()}`);
    const { code, signal } = await runInNamespace(
      link.src.name,
      process.execPath,
      [...process.execArgv, options.file, ...options.argv],
      { ...process.env, [LINK_ENV]: JSON.stringify(link.describe()) },
    );
    if (signal) log(`the benchmark in ${link.src.name} ended by ${signal}`);
    return code ?? 1;
  } finally {
    await link.destroy();
    log(`deleted ${link.src.name} and ${link.dst.name}`);
  }
}

/** Inner process: the link this process runs behind, or undefined outside one (LINK_ENV unset). */
export async function linkOfThisProcess(): Promise<LinkDescription | undefined> {
  const described = process.env[LINK_ENV];
  if (!described) return undefined;
  const link = JSON.parse(described) as LinkDescription;
  if (!(await inNamespace(link.srcNetns)))
    throw new Error(`${LINK_ENV} is set but this process is not in ${link.srcNetns}: do not set it by hand`);
  return link;
}
