/**
 * libvirt through `virsh` (libvirt-clients): the domain's XML, its completed job's statistics, and the migration
 * itself. virsh rather than a binding: it is what an operator has on a libvirt host, and it reaches any
 * connection URI the operator can (qemu:///system, qemu:///session, qemu+ssh://...).
 */
import { execFile } from "node:child_process";

export class VirshError extends Error {
  override name = "VirshError";
  constructor(
    readonly args: readonly string[],
    readonly exitCode: number | null,
    readonly stderr: string,
  ) {
    super(
      `virsh ${args.join(" ")} failed (exit ${exitCode ?? "signal"}): ${stderr.trim() || "(no message)"}`,
    );
  }
}

export interface Virsh {
  /** The connection URI (`virsh -c`), or undefined for virsh's default (LIBVIRT_DEFAULT_URI, qemu:///system). */
  readonly uri: string | undefined;
  run(args: readonly string[], timeoutMs?: number): Promise<string>;
}

export function virsh(uri: string | undefined, binary = "virsh"): Virsh {
  return {
    uri,
    run(args, timeoutMs = 60_000) {
      const full = [...(uri ? ["-c", uri] : []), ...args];
      return new Promise((resolve, reject) => {
        execFile(
          binary,
          full,
          { timeout: timeoutMs, maxBuffer: 16 * 1024 * 1024 },
          (error, stdout, stderr) => {
            if (error) {
              const code = typeof error.code === "number" ? error.code : null;
              if ((error as NodeJS.ErrnoException).code === "ENOENT")
                reject(new Error(`${binary} not found: install libvirt-clients`));
              else reject(new VirshError(full, code, String(stderr) || error.message));
              return;
            }
            resolve(String(stdout));
          },
        );
      });
    },
  };
}

/**
 * A completed job's statistics as `virsh domjobinfo --completed --rawstats` prints them: "Job type: N", then
 * "field: value" lines named by the VIR_DOMAIN_JOB_* typed parameters (include/libvirt/libvirt-domain.h).
 */
export interface JobStats {
  /** virDomainJobType: 3 = VIR_DOMAIN_JOB_COMPLETED. */
  jobType: number;
  /** virDomainJobOperation: 4 = MIGRATION_IN, 5 = MIGRATION_OUT. */
  operation: number | undefined;
  /** Every numeric field, by its libvirt name (time_elapsed, data_processed, memory_normal_bytes, ...). */
  fields: Record<string, number>;
}

/** virDomainJobType VIR_DOMAIN_JOB_COMPLETED (libvirt-domain.h). */
export const JOB_COMPLETED = 3;
/** virDomainJobOperation values (libvirt-domain.h). */
export const JOB_OPERATION = { migrationIn: 4, migrationOut: 5 } as const;

export function parseJobStats(text: string): JobStats {
  const fields: Record<string, number> = {};
  let jobType: number | undefined;
  for (const line of text.split("\n")) {
    const m = /^\s*([^:]+?):\s*(\S+)\s*$/.exec(line);
    if (!m?.[1] || m[2] === undefined) continue;
    const value = Number(m[2]);
    if (m[1] === "Job type") jobType = value;
    else if (Number.isFinite(value)) fields[m[1]] = value;
  }
  // Without --rawstats virsh prints "Job type: Completed" and figures with units: not what this reads.
  if (jobType === undefined || !Number.isInteger(jobType))
    throw new Error(
      `not the output of virsh domjobinfo --rawstats (no numeric "Job type:" line): ${text.slice(0, 200)}`,
    );
  return { jobType, operation: fields.operation, fields };
}

/** The figures a migration report puts beside vmprune's link bytes. */
export interface MigrationJobFigures {
  /** Which side's daemon answered: the source (outgoing job) or the destination (incoming). */
  side: "source" | "destination";
  timeElapsedMs: number | undefined;
  downtimeMs: number | undefined;
  /** Bytes QEMU sent (libvirt's data_processed: QEMU's "transferred"), before any pruning. */
  dataProcessedBytes: number | undefined;
  memoryTotalBytes: number | undefined;
  memoryNormalPages: number | undefined;
  memoryNormalBytes: number | undefined;
  memoryConstantPages: number | undefined;
  iterations: number | undefined;
}

export function migrationFigures(stats: JobStats, side: MigrationJobFigures["side"]): MigrationJobFigures {
  const f = stats.fields;
  return {
    side,
    timeElapsedMs: f.time_elapsed,
    downtimeMs: f.downtime,
    dataProcessedBytes: f.data_processed,
    memoryTotalBytes: f.memory_total,
    memoryNormalPages: f.memory_normal,
    memoryNormalBytes: f.memory_normal_bytes,
    memoryConstantPages: f.memory_constant,
    iterations: f.memory_iteration,
  };
}
