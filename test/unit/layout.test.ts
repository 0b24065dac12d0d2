/**
 * The product never imports the lab: an operator's deployment runs src/qemu/, src/migrate/, ... and never boots a
 * lab guest, downloads QEMU .debs or builds an initramfs. Only src/cli/ (the `lab` and `demo` commands) and the
 * lab itself may import src/lab/.
 */
import assert from "node:assert/strict";
import { readdirSync, readFileSync } from "node:fs";
import { dirname, join, relative, resolve, sep } from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";

const SRC = fileURLToPath(new URL("../../src/", import.meta.url));
const LAB = join(SRC, "lab");
/** Folders under src/ allowed to import the lab; every other folder is product. */
const MAY_IMPORT_LAB = new Set(["lab", "cli"]);

/** Specifiers of static imports and re-exports (`from "x"`), side-effect imports and dynamic `import("x")`. */
function importSpecifiers(source: string): string[] {
  return [...source.matchAll(/(?:\bfrom|\bimport)\s*\(?\s*["']([^"']+)["']/g)].map((m) => m[1] as string);
}

/** The relative imports of `file` (absolute path) that resolve into src/lab/. */
function labImports(file: string, source: string): string[] {
  return importSpecifiers(source).filter((spec) => {
    if (!spec.startsWith(".")) return false;
    const target = resolve(dirname(file), spec);
    return target === LAB || target.startsWith(LAB + sep);
  });
}

function productFolders(): string[] {
  return readdirSync(SRC, { withFileTypes: true })
    .filter((entry) => entry.isDirectory() && !MAY_IMPORT_LAB.has(entry.name))
    .map((entry) => entry.name);
}

test("the import scan sees every form of import into src/lab/", () => {
  const file = join(SRC, "qemu", "x.ts");
  const source = [
    'import { a } from "../lab/vm.ts";',
    'import type { B } from "../lab/guest-image.ts";',
    'export { c } from "./../lab/apt.ts";',
    'import "../lab/cleanup.ts";',
    'const d = await import("../lab/accel.ts");',
    'import { e } from "./qmp.ts";',
    'import { f } from "../labyrinth/x.ts";',
    'import { g } from "node:fs";',
  ].join("\n");
  assert.deepEqual(labImports(file, source), [
    "../lab/vm.ts",
    "../lab/guest-image.ts",
    "./../lab/apt.ts",
    "../lab/cleanup.ts",
    "../lab/accel.ts",
  ]);
});

test("no product folder under src/ imports src/lab/", () => {
  const folders = productFolders();
  for (const expected of ["qemu", "migrate", "prune", "stream", "link", "introspect", "storage"]) {
    assert.ok(
      folders.includes(expected),
      `src/${expected}/ is missing from the scan (${folders.join(", ")})`,
    );
  }
  const offences: string[] = [];
  for (const folder of folders) {
    const files = readdirSync(join(SRC, folder), { recursive: true, encoding: "utf8" }).filter((name) =>
      name.endsWith(".ts"),
    );
    for (const name of files) {
      const file = join(SRC, folder, name);
      for (const spec of labImports(file, readFileSync(file, "utf8"))) {
        offences.push(`${relative(join(SRC, ".."), file)} imports "${spec}"`);
      }
    }
  }
  assert.deepEqual(offences, [], `product code imports the lab:\n${offences.join("\n")}`);
});
