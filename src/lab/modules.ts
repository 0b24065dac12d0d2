/** Kernel module closure from modules.dep: which .ko files, in which load order, a set of drivers needs. */

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

/**
 * The module files to load for `wanted`, dependencies first. Built-in modules are skipped; a module that is
 * neither built in nor in modules.dep is an error.
 */
export function moduleLoadOrder(
  wanted: readonly string[],
  dep: Map<string, { path: string; deps: string[] }>,
  builtin: Set<string>,
): string[] {
  const order: string[] = [];
  const state = new Map<string, "visiting" | "done">();
  const visit = (name: string, chain: string[]) => {
    const key = name.replaceAll("-", "_");
    if (builtin.has(key) || state.get(key) === "done") return;
    if (state.get(key) === "visiting")
      throw new Error(`module dependency cycle: ${[...chain, key].join(" -> ")}`);
    const entry = dep.get(key);
    if (!entry) throw new Error(`kernel module ${key} is neither built in nor in modules.dep`);
    state.set(key, "visiting");
    for (const d of entry.deps) visit(d, [...chain, key]);
    state.set(key, "done");
    order.push(entry.path);
  };
  for (const name of wanted) visit(name, []);
  return order;
}
