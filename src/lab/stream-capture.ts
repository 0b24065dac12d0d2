/**
 * Captures a VM's migration stream into a file: `migrate` to `exec:cat > FILE` (no destination; the stream is
 * what a TCP destination would get, minus anything that needs a return path). The VM keeps running during
 * the migration, so a dirtying guest produces several passes; afterwards it is resumed, ready for the next
 * capture. Returns QEMU's own counters for the migration, which the stream's records must match.
 */
import { stat } from "node:fs/promises";
import { type MigrationOptions, type MigrationResult, runMigration } from "../qemu/migration.ts";
import type { Vm } from "./vm.ts";

export interface CaptureOptions {
  capabilities?: Record<string, boolean>;
  parameters?: Record<string, unknown>;
  /** At least this many pre-copy passes (see MigrationOptions.minPasses). */
  minPasses?: number;
  /** With minPasses: hold until this holds too (see MigrationOptions.holdUntil). */
  holdUntil?: MigrationOptions["holdUntil"];
  /** Called with every query-migrate answer while it runs (see MigrationOptions.onProgress). */
  onProgress?: MigrationOptions["onProgress"];
  /** Resume the VM after the capture (default true). */
  resume?: boolean;
}

export interface CapturedStream {
  path: string;
  bytes: number;
  migration: MigrationResult;
}

export async function captureStream(
  vm: Vm,
  path: string,
  options: CaptureOptions = {},
): Promise<CapturedStream> {
  if (!/^[\w./-]+$/.test(path))
    throw new Error(`capture path ${path} must be a plain path (it goes into a shell)`);
  const wasRunning = (await vm.monitor.execute("query-status")).running;
  const migration = await runMigration(vm.monitor, `exec:cat > ${path}`, {
    ...(options.capabilities ? { capabilities: options.capabilities } : {}),
    ...(options.parameters ? { parameters: options.parameters } : {}),
    ...(options.minPasses ? { minPasses: options.minPasses } : {}),
    ...(options.holdUntil ? { holdUntil: options.holdUntil } : {}),
    ...(options.onProgress ? { onProgress: options.onProgress } : {}),
  });
  // Undo the capabilities so the next capture starts from QEMU's defaults.
  if (options.capabilities) {
    const off = Object.keys(options.capabilities).map((capability) => ({ capability, state: false }));
    await vm.monitor.execute("migrate-set-capabilities", { capabilities: off });
  }
  if (wasRunning && options.resume !== false) await vm.monitor.execute("cont");
  return { path, bytes: (await stat(path)).size, migration };
}
