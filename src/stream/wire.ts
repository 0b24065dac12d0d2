/**
 * Constants of QEMU's migration stream (main channel), as QEMU 7.2 and 10.0 write them. References are to QEMU's
 * sources as `path@vX.Y.Z:LINE`; ../shared/docs/qemu-migration-stream.md collects them with context.
 */

/** `QEMU_VM_FILE_MAGIC` "QEVM" and `QEMU_VM_FILE_VERSION`: migration/savevm.h@v7.2.0:17-18 (same in 10.x). */
export const FILE_MAGIC = 0x5145564d;
export const FILE_VERSION = 3;

/** Top-level record types: migration/savevm.h@v7.2.0:20-30 (same in 10.x). */
export const VM = {
  EOF: 0x00,
  SECTION_START: 0x01,
  SECTION_PART: 0x02,
  SECTION_END: 0x03,
  SECTION_FULL: 0x04,
  SUBSECTION: 0x05,
  VMDESCRIPTION: 0x06,
  CONFIGURATION: 0x07,
  COMMAND: 0x08,
  SECTION_FOOTER: 0x7e,
} as const;

export const SECTION_TYPE_NAMES = {
  [VM.SECTION_START]: "START",
  [VM.SECTION_PART]: "PART",
  [VM.SECTION_END]: "END",
  [VM.SECTION_FULL]: "FULL",
} as const;
export type SectionType = (typeof SECTION_TYPE_NAMES)[keyof typeof SECTION_TYPE_NAMES];

/**
 * `enum qemu_vm_cmd` (migration/savevm.c@v7.2.0:72-96, @v10.2.2:77-118) with the payload length the
 * destination accepts (`mig_cmd_args`, savevm.c@v7.2.0:98-111): a number is the only valid length, -1 any
 * length. POSTCOPY_ADVISE is variable there, but only 0 (dirty-bitmaps) and 16 (postcopy-ram: page size summary
 * and target page size, loadvm_postcopy_handle_advise, savevm.c@v7.2.0:1650-1700) are ever sent.
 * SWITCHOVER_START is new in 10.0.
 */
export const COMMANDS: Record<number, { name: string; len: number | readonly number[] }> = {
  1: { name: "OPEN_RETURN_PATH", len: 0 },
  2: { name: "PING", len: 4 },
  3: { name: "POSTCOPY_ADVISE", len: [0, 16] },
  4: { name: "POSTCOPY_LISTEN", len: 0 },
  5: { name: "POSTCOPY_RUN", len: 0 },
  6: { name: "POSTCOPY_RAM_DISCARD", len: -1 },
  7: { name: "PACKAGED", len: 4 },
  8: { name: "ENABLE_COLO", len: 0 },
  9: { name: "POSTCOPY_RESUME", len: 0 },
  10: { name: "RECV_BITMAP", len: -1 },
  11: { name: "SWITCHOVER_START", len: 0 },
};
export const CMD_PACKAGED = 7;
export const CMD_POSTCOPY_ADVISE = 3;
/**
 * The largest PACKAGED blob vmprune accepts. QEMU's own limit is UINT32_MAX (`MAX_VM_CMD_PACKAGED_SIZE`,
 * migration/savevm.c@v7.2.0:94), but the package holds only the postcopy switch-over's device state (13 KiB in
 * a 7.2 capture, see the stream doc §3.4): more than 16 MiB is treated as garbage (the relay then passes through).
 */
export const MAX_PACKAGED_SIZE = 1 << 24;

/** The RAM section: `register_savevm_live("ram", 0, 4, ...)`, migration/ram.c@v7.2.0:4682, @v10.2.2:4777. */
export const RAM_IDSTR = "ram";
export const RAM_SECTION_VERSION = 4;

/** RAM record flags, the low bits of a be64 whose high bits are the page offset: ram.c@v7.2.0:70-84, ram.h@v10.2.2:36-62. */
export const RAM_FLAG = {
  ZERO: 0x02,
  MEM_SIZE: 0x04,
  PAGE: 0x08,
  EOS: 0x10,
  CONTINUE: 0x20,
  XBZRLE: 0x40,
  HOOK: 0x80,
  COMPRESS_PAGE: 0x100,
  MULTIFD_FLUSH: 0x200,
} as const;

/** `ENCODING_FLAG_XBZRLE`: migration/ram.c@v7.2.0:749; the only encoding byte an XBZRLE record may carry. */
export const XBZRLE_ENCODING_FLAG = 0x01;
/** zlib's compressBound(4096): the largest COMPRESS_PAGE payload the destination accepts (ram.c@v7.2.0:4367-4368). */
export const MAX_COMPRESSED_PAGE = 4096 + 14;

/** x86's TARGET_PAGE_BITS; `configuration/target-page-bits` overrides it on other targets (savevm.c@v7.2.0:271-304). */
export const DEFAULT_TARGET_PAGE_BITS = 12;

/** Configuration subsections the parser understands (savevm.c@v7.2.0:237-521, @v10.2.2:275-559). */
export const CONFIG_SUBSECTIONS = {
  TARGET_PAGE_BITS: "configuration/target-page-bits",
  CAPABILITIES: "configuration/capabilities",
  UUID: "configuration/uuid",
} as const;

/** Multifd channel handshake magic (`MULTIFD_MAGIC`): migration/multifd.c@v7.2.0:34. */
export const MULTIFD_MAGIC = 0x11223344;

/** Sanity bounds on lengths that QEMU itself does not cap more tightly; beyond them the stream is garbage. */
export const LIMITS = {
  machineTypeName: 256,
  vmdesc: 64 * 1024 * 1024,
  ramTotal: 2 ** 50,
  capabilities: 256,
} as const;
