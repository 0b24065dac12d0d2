// Loaded before tsx by package.json's bench:* scripts (`node --import ./bench/preflight.mjs --import tsx ...`):
// without the npm packages, tsx itself is missing and node's error would not say what to do. Plain JavaScript,
// because nothing can compile TypeScript yet at this point.
try {
  import.meta.resolve("tsx");
} catch {
  process.stderr.write(
    "the npm packages are not installed: run `bash scripts/setup.sh` first (or `npm ci`)\n",
  );
  process.exit(1);
}
