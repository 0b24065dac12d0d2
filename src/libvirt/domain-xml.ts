/**
 * What vmprune needs from a libvirt domain's XML (`virsh dumpxml`, format: libvirt docs/formatdomain.rst): its
 * name and UUID, how its RAM is backed (`<memoryBacking>`, and per NUMA cell `memAccess`), and a second QMP monitor
 * the domain gives QEMU through `<qemu:commandline>` (docs/drvqemu.rst "Pass-through of arbitrary qemu
 * commands"), which vmprune can use without taking libvirt's own monitor.
 */
import { child, childrenNamed, parseXml, type XmlElement } from "./xml.ts";

/** The XML namespace of `<qemu:commandline>` (docs/drvqemu.rst). */
export const QEMU_COMMANDLINE_NAMESPACE = "http://libvirt.org/schemas/domain/qemu/1.0";

/** `<memoryBacking><source type=.../>` (formatdomain.rst "Memory Backing"); absent: anonymous memory. */
export type MemorySourceType = "file" | "anonymous" | "memfd";
/** `<access mode=.../>`, or a NUMA cell's `memAccess`: whether QEMU maps the backing with MAP_SHARED. */
export type MemoryAccessMode = "shared" | "private";

export interface RamBacking {
  source: MemorySourceType;
  /** The domain-wide `<access mode>`; absent in the XML: undefined (QEMU's default for the backend: private). */
  access: MemoryAccessMode | undefined;
  hugepages: boolean;
  /** NUMA cells (`<cpu><numa><cell id memAccess>`): each is its own memory backend, `ram-node<id>`. */
  cells: { id: number; access: MemoryAccessMode | undefined }[];
}

export interface DomainDescription {
  name: string;
  uuid: string;
  /** The running domain's id (`<domain id=...>` in live XML); undefined when it does not run. */
  id: number | undefined;
  /** 'kvm' or 'qemu' (TCG). */
  type: string;
  memoryKiB: number;
  ram: RamBacking;
  /** A QMP monitor on a unix socket from `<qemu:commandline>`, as QEMU sees the path; undefined if none. */
  extraQmpSocket: string | undefined;
  /** The arguments of `<qemu:commandline>` in order. */
  qemuCommandline: string[];
}

export class DomainXmlError extends Error {
  override name = "DomainXmlError";
}

function memorySource(value: string | undefined): MemorySourceType {
  if (value === undefined || value === "anonymous") return "anonymous";
  if (value === "file" || value === "memfd") return value;
  throw new DomainXmlError(
    `unknown <memoryBacking><source type='${value}'/> (known: file, anonymous, memfd)`,
  );
}

function accessMode(value: string | undefined, where: string): MemoryAccessMode | undefined {
  if (value === undefined) return undefined;
  if (value === "shared" || value === "private") return value;
  throw new DomainXmlError(`unknown ${where} '${value}' (known: shared, private)`);
}

/** `<memory unit='KiB'>` in KiB (formatdomain.rst: unit defaults to KiB). */
function memoryKiB(element: XmlElement | undefined): number {
  if (!element) throw new DomainXmlError("the domain XML has no <memory> element");
  const value = Number(element.text.trim());
  const unit = (element.attributes.unit ?? "KiB").toLowerCase();
  const factor: Record<string, number> = {
    b: 1 / 1024,
    bytes: 1 / 1024,
    k: 1,
    kib: 1,
    m: 1024,
    mib: 1024,
    g: 1024 ** 2,
    gib: 1024 ** 2,
  };
  const f = factor[unit];
  if (!Number.isFinite(value) || f === undefined)
    throw new DomainXmlError(`cannot read <memory unit='${unit}'>${element.text}</memory>`);
  return value * f;
}

/** The prefix the document binds to QEMU_COMMANDLINE_NAMESPACE (libvirt prints "qemu"), if any. */
function qemuPrefix(root: XmlElement): string | undefined {
  for (const [key, value] of Object.entries(root.attributes))
    if (key.startsWith("xmlns:") && value === QEMU_COMMANDLINE_NAMESPACE) return key.slice("xmlns:".length);
  return undefined;
}

/** QEMU's `-opt value` list from `<qemu:commandline><qemu:arg value=.../>`. */
function commandlineArgs(root: XmlElement): string[] {
  const prefix = qemuPrefix(root);
  if (!prefix) return [];
  const args: string[] = [];
  for (const block of childrenNamed(root, `${prefix}:commandline`))
    for (const arg of childrenNamed(block, `${prefix}:arg`))
      if (arg.attributes.value !== undefined) args.push(arg.attributes.value);
  return args;
}

/** "a=1,b,c=x" (QEMU's option syntax, ",," escapes a comma) → ordered pairs; a bare word is [word, ""]. */
function qemuOptions(text: string): [string, string][] {
  const parts: string[] = [];
  let current = "";
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if (c === "," && text[i + 1] === ",") {
      current += ",";
      i++;
    } else if (c === ",") {
      parts.push(current);
      current = "";
    } else current += c;
  }
  parts.push(current);
  return parts.map((p) => {
    const eq = p.indexOf("=");
    return eq < 0 ? [p, ""] : [p.slice(0, eq), p.slice(eq + 1)];
  });
}

/**
 * The unix socket of a QMP monitor among QEMU arguments: `-qmp unix:PATH[,server=on,...]`, or a
 * `-chardev socket,id=ID,path=PATH,server=on` used by `-mon chardev=ID,mode=control` (QEMU's qemu-options.hx).
 */
export function extraQmpSocket(args: readonly string[]): string | undefined {
  const chardevs = new Map<string, string>();
  const monitors: string[] = [];
  for (let i = 0; i + 1 < args.length; i++) {
    const option = args[i]?.replace(/^--/, "-");
    const value = args[i + 1] ?? "";
    if (option === "-qmp" && value.startsWith("unix:")) {
      const [first] = qemuOptions(value.slice("unix:".length));
      if (first?.[0]) return first[0];
    }
    if (option === "-chardev") {
      const options = qemuOptions(value);
      const fields = new Map(options);
      if (options[0]?.[0] === "socket" && fields.get("id") && fields.get("path"))
        chardevs.set(fields.get("id") as string, fields.get("path") as string);
    }
    if (option === "-mon") {
      const fields = new Map(qemuOptions(value));
      if (fields.get("mode") === "control" && fields.get("chardev"))
        monitors.push(fields.get("chardev") as string);
    }
  }
  for (const id of monitors) {
    const path = chardevs.get(id);
    if (path) return path;
  }
  return undefined;
}

export function parseDomainXml(text: string): DomainDescription {
  const root = parseXml(text);
  if (root.name !== "domain") throw new DomainXmlError(`expected a <domain> document, got <${root.name}>`);
  const name = child(root, "name")?.text.trim();
  if (!name) throw new DomainXmlError("the domain XML has no <name>");
  const backing = child(root, "memoryBacking");
  const cells = childrenNamed(
    child(root, "cpu/numa") ?? { name: "", attributes: {}, children: [], text: "" },
    "cell",
  );
  const qemuCommandline = commandlineArgs(root);
  const id = root.attributes.id === undefined ? undefined : Number(root.attributes.id);
  return {
    name,
    uuid: child(root, "uuid")?.text.trim() ?? "",
    id: id !== undefined && Number.isInteger(id) && id >= 0 ? id : undefined,
    type: root.attributes.type ?? "",
    memoryKiB: memoryKiB(child(root, "memory")),
    ram: {
      source: memorySource(backing ? child(backing, "source")?.attributes.type : undefined),
      access: accessMode(backing ? child(backing, "access")?.attributes.mode : undefined, "<access mode>"),
      hugepages: backing ? child(backing, "hugepages") !== undefined : false,
      cells: cells.map((cell) => ({
        id: Number(cell.attributes.id ?? "0"),
        access: accessMode(cell.attributes.memAccess, "<cell memAccess>"),
      })),
    },
    extraQmpSocket: extraQmpSocket(qemuCommandline),
    qemuCommandline,
  };
}
