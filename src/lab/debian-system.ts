/**
 * What the Debian guest's system disk holds, as text and command lines (no I/O here, so each piece can be checked
 * alone): the apt sources mmdebstrap bootstraps from (the system's own mirror), the packages, the systemd unit of
 * the lab's agent, the hook that installs the agent and initialises the PostgreSQL database inside the new
 * system, and the init of the small initrd that mounts that disk as root.
 */
import type { SourceEntry } from "./apt.ts";
import { BOOT_MARKER, DISK_SERIAL, INIT_PRELUDE } from "./initramfs.ts";

/**
 * Packages on top of mmdebstrap's `apt` variant (Essential: yes + apt): systemd as init, udev (device units, module
 * loading), kmod, procps (free, ps for diagnostics) and PostgreSQL 15, whose server package ships pgbench
 * (/usr/lib/postgresql/15/bin/pgbench) and pulls postgresql-client-15, which ships pg_amcheck.
 */
export const DEBIAN_GUEST_PACKAGES = ["systemd-sysv", "udev", "kmod", "procps", "postgresql-15"] as const;

/** PostgreSQL as Debian 12 packages it: major version, cluster name, binaries. */
export const POSTGRES = {
  version: "15",
  cluster: "main",
  bin: "/usr/lib/postgresql/15/bin",
  dataDir: "/var/lib/postgresql/15/main",
  config: "/etc/postgresql/15/main/postgresql.conf",
  /** postgresql@.service instance of the cluster (postgresql-common's unit). */
  unit: "postgresql@15-main.service",
} as const;

/**
 * The pgbench database made at build time. Scale 20 is 2,000,000 rows of pgbench_accounts: its table and primary
 * key come to ~300 MiB on disk (pgbench's documentation: ~15 MiB per scale unit), some hundreds of MiB of page
 * cache once read, in a 2 GiB guest.
 */
export const PGBENCH_DATABASE = { name: "bench", scale: 20 } as const;

/** Where the agent and vmwork sit in the system, and the agent's unit. */
export const AGENT_PATH = "/usr/local/sbin/vmprune-agent";
export const VMWORK_PATH = "/usr/local/bin/vmwork";
export const AGENT_UNIT = "vmprune-agent.service";

/** Raw image size: the system (~0.5 GiB) and the database (~0.3 GiB) leave room for pgbench's growth. */
export const ROOT_DISK_SIZE_MIB = 4096;

/** Debian's 6.1 cloud kernel with this initrd; the console on ttyS0 as the lab guest's. */
export const DEBIAN_GUEST_CMDLINE = "console=ttyS0 panic=-1 loglevel=4";

/**
 * One-line apt sources for mmdebstrap: the system's entries for `codename`, its -updates and -security suites
 * (same URIs, same keyring), main only. Nothing else: the guest is built from the registry this machine uses.
 */
export function bootstrapSources(entries: readonly SourceEntry[], codename: string): string[] {
  const wanted = [codename, `${codename}-updates`, `${codename}-security`];
  const lines: string[] = [];
  for (const suite of wanted) {
    const entry = entries.find((e) => e.types.includes("deb") && e.suites.includes(suite));
    if (!entry) continue;
    const options = entry.signedBy ? ` [signed-by=${entry.signedBy}]` : "";
    for (const uri of entry.uris) lines.push(`deb${options} ${uri} ${suite} main`);
  }
  if (!lines.some((line) => line.includes(` ${codename} main`)))
    throw new Error(
      `no apt source for Debian '${codename}' in /etc/apt: the Debian guest is bootstrapped from the system's mirror`,
    );
  return lines;
}

/** The agent as a service on the second serial port, started once PostgreSQL is up (so "booted" means ready). */
export function agentUnit(): string {
  return `[Unit]
Description=vmprune lab agent (host commands on the second serial port)
After=${POSTGRES.unit}

[Service]
ExecStartPre=/bin/sh -c 'echo "${BOOT_MARKER} $(uname -r) mem=$(grep MemTotal /proc/meminfo)" > /dev/ttyS0'
ExecStart=${AGENT_PATH} /dev/ttyS1
Restart=always
RestartSec=1

[Install]
WantedBy=multi-user.target
`;
}

/**
 * Units the guest does not need, masked so that they neither slow a TCG boot nor write in the middle of a
 * measurement: apt's daily timers, e2scrub and fstrim timers, the gettys (the console is a file on the host;
 * getty-static took 12 s of a TCG boot).
 */
export const MASKED_UNITS = [
  "apt-daily.timer",
  "apt-daily-upgrade.timer",
  "e2scrub_all.timer",
  "e2scrub_reap.service",
  "fstrim.timer",
  "serial-getty@ttyS0.service",
  "getty@tty1.service",
  "getty-static.service",
] as const;

/**
 * mmdebstrap's customize hook (run as `sh HOOK "$1"`, $1 the new system, with /proc, /sys and /dev mounted in it):
 * installs the agent and its unit, masks what is not needed, copies the kernel's modules, and initialises the
 * database with pgbench while a server runs in the chroot with no TCP listener.
 */
export function customizeScript(files: {
  agent: string;
  vmwork: string;
  agentUnit: string;
  modulesDir: string;
  kernelRelease: string;
}): string {
  const { bin, dataDir, config } = POSTGRES;
  const db = PGBENCH_DATABASE;
  const asPostgres = (command: string) => `chroot "$root" runuser -u postgres -- ${command}`;
  return `#!/bin/sh
set -eu
root="$1"
install -m 0755 '${files.agent}' "$root${AGENT_PATH}"
install -m 0755 '${files.vmwork}' "$root${VMWORK_PATH}"
install -m 0644 '${files.agentUnit}' "$root/etc/systemd/system/${AGENT_UNIT}"
chroot "$root" systemctl enable ${AGENT_UNIT}
chroot "$root" systemctl mask ${MASKED_UNITS.join(" ")}
chroot "$root" systemctl set-default multi-user.target
echo vmprune-pg > "$root/etc/hostname"
mkdir -p "$root/lib/modules"
cp -a '${files.modulesDir}' "$root/lib/modules/${files.kernelRelease}"
chroot "$root" install -d -o postgres -g postgres -m 2775 /run/postgresql
${asPostgres(`${bin}/pg_ctl -D ${dataDir} -w -l /tmp/pg-build.log -o "-c config_file=${config} -c listen_addresses=''" start`)} || { cat "$root/tmp/pg-build.log" >&2; exit 1; }
# A failing step below must not leave the server running on the host.
trap '${asPostgres(`${bin}/pg_ctl -D ${dataDir} -m immediate stop`)} || true' EXIT
${asPostgres(`createdb ${db.name}`)}
${asPostgres(`${bin}/pgbench -i -q -s ${db.scale} ${db.name}`)}
${asPostgres(`psql -q -d ${db.name} -c 'CREATE EXTENSION amcheck'`)}
${asPostgres(`psql -q -d ${db.name} -c CHECKPOINT`)}
${asPostgres(`${bin}/pg_ctl -D ${dataDir} -w -m fast stop`)}
trap - EXIT
rm -rf "$root/run/postgresql" "$root/tmp/pg-build.log"
`;
}

/**
 * The initrd's init: load the virtio drivers (the cloud kernel has virtio_blk as a module), mount the disk whose
 * serial is the lab's data disk as the root filesystem, read-write, and hand over to systemd.
 */
export function rootInitScript(): string {
  return `${INIT_PRELUDE}while read -r module; do insmod "/lib/modules/$module" || echo "init: insmod $module failed"; done < /lib/modules/load-order
root=""
for block in /sys/block/vd*; do
  [ "$(cat "$block/serial" 2>/dev/null)" = "${DISK_SERIAL.data}" ] && root="/dev/\${block##*/}"
done
mkdir -p /newroot
if [ -z "$root" ] || ! mount -t ext4 -o rw "$root" /newroot; then
  echo "init: cannot mount the root disk (serial ${DISK_SERIAL.data}: '$root')"
  poweroff -f
fi
umount /proc /sys
mount --move /dev /newroot/dev
exec switch_root /newroot /sbin/init
`;
}

/**
 * Reads the database's files into the guest's page cache (as a server that has been up for a while has them):
 * clean cache pages of the shared disk, which `--drop cache` sends as references.
 */
export function warmDatabaseCommand(): string {
  return `cat ${POSTGRES.dataDir}/base/*/* > /dev/null && grep -E '^(MemFree|Cached):' /proc/meminfo`;
}
