/**
 * How busy this process's event loop has been: the one thread where send and receive do their per-page work
 * (parsing, judging, hashing, TLS, writing), so a loop busy nearly all the time is an end that cannot take more.
 */
import { type EventLoopUtilization, performance } from "node:perf_hooks";
import { MAX_BUSY_PERMILLE } from "../link/protocol.ts";

/**
 * The share of the time since the last call this process's event loop was busy, in 1/1000: where receive spends
 * its CPU (decrypting, rebuilding references, hashing, writing to QEMU) and, with send in the same process
 * (`vmprune migrate`), send's too. receive's load reports (LOAD) carry it.
 */
export class EventLoopBusy {
  private last: EventLoopUtilization = performance.eventLoopUtilization();

  sample(): number {
    const now = performance.eventLoopUtilization();
    const since = performance.eventLoopUtilization(now, this.last);
    this.last = now;
    return Math.max(0, Math.min(MAX_BUSY_PERMILLE, Math.round(since.utilization * MAX_BUSY_PERMILLE)));
  }
}
