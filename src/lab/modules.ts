/**
 * Kernel module closure from modules.dep and modules.softdep: which .ko files, in which load order, a set of
 * drivers needs (what modprobe would load, without modprobe in the guest).
 */

/** Parses modules.dep (`path: dep-path dep-path ...`) into a map keyed by module name. */
export function parseModulesDep(text: string): Map<string, { path: string; deps: string[] }> {
  const modules = new Map<string, { path: string; deps: string[] }>();
  for (const line of text.split("\n")) {
    const at = line.indexOf(":");
    if (at < 0) continue;
    const path = line.slice(0, at).trim();
    const deps = line
      .slice(at + 1)
      .split(/\s+/)
      .filter(Boolean);
    modules.set(moduleName(path), { path, deps: deps.map(moduleName) });
  }
  return modules;
}

/** `kernel/drivers/block/virtio_blk.ko.xz` → `virtio_blk` (dashes and underscores are the same to the kernel). */
export function moduleName(path: string): string {
  const base = path.slice(path.lastIndexOf("/") + 1);
  return base.replace(/\.ko(\.(xz|zst|gz))?$/, "").replaceAll("-", "_");
}

/** Names listed in modules.builtin (drivers compiled into the kernel need no file). */
export function parseModulesBuiltin(text: string): Set<string> {
  return new Set(text.split("\n").filter(Boolean).map(moduleName));
}

/** Soft dependencies from modules.softdep (`softdep MOD pre: A B post: C`): loaded around MOD if present. */
export interface SoftDeps {
  pre: string[];
  post: string[];
}

/** Parses modules.softdep. Names before any `pre:`/`post:` (malformed MODULE_SOFTDEP strings) are ignored, as kmod does. */
export function parseModulesSoftdep(text: string): Map<string, SoftDeps> {
  const softdeps = new Map<string, SoftDeps>();
  for (const line of text.split("\n")) {
    const [keyword, module, ...words] = line.trim().split(/\s+/);
    if (keyword !== "softdep" || !module) continue;
    const entry = softdeps.get(moduleName(module)) ?? { pre: [], post: [] };
    let list: string[] | undefined;
    for (const word of words) {
      if (word === "pre:") list = entry.pre;
      else if (word === "post:") list = entry.post;
      else list?.push(word);
    }
    softdeps.set(moduleName(module), entry);
  }
  return softdeps;
}

/** Parses modules.alias (`alias NAME MODULE`) into the modules each exact alias names (wildcards kept as text). */
export function parseModulesAlias(text: string): Map<string, string[]> {
  const aliases = new Map<string, string[]>();
  for (const line of text.split("\n")) {
    const [keyword, alias, module] = line.trim().split(/\s+/);
    if (keyword !== "alias" || !alias || !module) continue;
    aliases.set(alias, [...(aliases.get(alias) ?? []), moduleName(module)]);
  }
  return aliases;
}

/** What the load order knows about a kernel's modules. */
export interface ModuleIndex {
  dep: Map<string, { path: string; deps: string[] }>;
  builtin: Set<string>;
  softdeps?: Map<string, SoftDeps>;
  aliases?: Map<string, string[]>;
}

/**
 * The modules a soft dependency `name` stands for: itself if it is a module, else the modules its alias names
 * (`crypto-crc32c` → crc32c_generic, crc32c_intel); none if one of them is built in. Of several providers only
 * the `_generic` one is taken when there is one: it runs on any CPU, while the accelerated ones need CPU features
 * (crc32c_intel: SSE4.2) that the lab's TCG CPU (qemu64) lacks, and fail to load there.
 */
function softdepProviders(name: string, index: ModuleIndex): string[] {
  const key = moduleName(name);
  if (index.builtin.has(key)) return [];
  if (index.dep.has(key)) return [key];
  const providers = index.aliases?.get(name) ?? [];
  if (providers.some((p) => index.builtin.has(p))) return [];
  const present = providers.filter((p) => index.dep.has(p));
  const generic = present.filter((p) => p.endsWith("_generic"));
  return generic.length > 0 ? generic : present;
}

/**
 * The module files to load for `wanted`, dependencies first, with soft dependencies before (pre) or after
 * (post) their module. Built-in modules are skipped; a wanted module or hard dependency that is neither built in
 * nor in modules.dep is an error; a soft dependency the kernel lacks is skipped (it is optional by definition).
 */
export function moduleLoadOrder(
  wanted: readonly string[],
  dep: Map<string, { path: string; deps: string[] }>,
  builtin: Set<string>,
  soft: Pick<ModuleIndex, "softdeps" | "aliases"> = {},
): string[] {
  const index: ModuleIndex = { dep, builtin, ...soft };
  const order: string[] = [];
  const state = new Map<string, "visiting" | "done">();
  const visit = (name: string, chain: string[], optional: boolean) => {
    const key = name.replaceAll("-", "_");
    if (builtin.has(key) || state.get(key) === "done") return;
    if (state.get(key) === "visiting") {
      // A soft dependency that leads back into the chain is already being loaded: nothing more to do.
      if (optional) return;
      throw new Error(`module dependency cycle: ${[...chain, key].join(" -> ")}`);
    }
    const entry = dep.get(key);
    if (!entry) throw new Error(`kernel module ${key} is neither built in nor in modules.dep`);
    state.set(key, "visiting");
    const softdeps = index.softdeps?.get(key);
    for (const pre of softdeps?.pre ?? [])
      for (const p of softdepProviders(pre, index)) visit(p, [...chain, key], true);
    for (const d of entry.deps) visit(d, [...chain, key], optional);
    state.set(key, "done");
    order.push(entry.path);
    for (const post of softdeps?.post ?? [])
      for (const p of softdepProviders(post, index)) visit(p, [...chain, key], true);
  };
  for (const name of wanted) visit(name, [], false);
  return order;
}
