import { type ExecFileOptions, execFile } from "node:child_process";

/** A host command that exited non-zero or could not start; carries what it printed. */
export class CommandError extends Error {
  constructor(
    readonly command: string,
    readonly exitCode: number | null,
    readonly stderr: string,
  ) {
    super(
      `${command} failed (exit ${exitCode ?? "signal"}): ${stderr.trim().split("\n").slice(-5).join(" | ")}`,
    );
    this.name = "CommandError";
  }
}

export interface RunOptions {
  cwd?: string;
  env?: NodeJS.ProcessEnv;
  timeoutMs?: number;
  /** Text passed on standard input. */
  input?: string | Buffer;
}

/** Runs a host program to completion and returns its standard output; throws CommandError on failure. */
export function run(file: string, args: readonly string[], options: RunOptions = {}): Promise<string> {
  const execOptions: ExecFileOptions = {
    cwd: options.cwd,
    env: options.env ?? process.env,
    timeout: options.timeoutMs ?? 600_000,
    maxBuffer: 256 * 1024 * 1024,
    encoding: "utf8",
  };
  return new Promise((resolve, reject) => {
    const child = execFile(file, [...args], execOptions, (error, stdout, stderr) => {
      if (error) {
        const code = typeof error.code === "number" ? error.code : null;
        // Programs that report failures on stdout (vmwork verify) still get their words into the error.
        const detail = String(stderr) || String(stdout).slice(-2000) || error.message;
        reject(new CommandError(`${file} ${args.join(" ")}`.slice(0, 300), code, detail));
        return;
      }
      resolve(String(stdout));
    });
    if (options.input !== undefined) child.stdin?.end(options.input);
  });
}

/** Runs a host program and returns its raw standard output (for binary output such as decompressed files). */
export function runBuffer(file: string, args: readonly string[], timeoutMs = 600_000): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    execFile(
      file,
      [...args],
      { encoding: "buffer", maxBuffer: 1024 * 1024 * 1024, timeout: timeoutMs },
      (error, stdout, stderr) => {
        if (error) {
          const code = typeof error.code === "number" ? error.code : null;
          reject(
            new CommandError(
              `${file} ${args.join(" ")}`.slice(0, 300),
              code,
              stderr.toString("utf8") || error.message,
            ),
          );
          return;
        }
        resolve(stdout);
      },
    );
  });
}
