/**
 * A small non-validating XML reader for the documents libvirt prints (`virsh dumpxml`, `capabilities`): elements
 * with attributes and text, comments, processing instructions, CDATA and the five predefined entities plus
 * numeric character references (XML 1.0 §4.6, §4.1). No DTDs, no namespace resolution: a prefixed name such as
 * `qemu:arg` is kept as written. A pure function of its input; malformed input throws XmlError with the offset.
 */

export interface XmlElement {
  name: string;
  attributes: Readonly<Record<string, string>>;
  children: XmlElement[];
  /** The element's own text (character data directly inside it, entities decoded), whitespace kept. */
  text: string;
}

export class XmlError extends Error {
  override name = "XmlError";
  constructor(
    message: string,
    readonly offset: number,
  ) {
    super(`${message} at offset ${offset}`);
  }
}

const PREDEFINED_ENTITIES: Readonly<Record<string, string>> = {
  lt: "<",
  gt: ">",
  amp: "&",
  quot: '"',
  apos: "'",
};

function decodeEntities(text: string, offset: number): string {
  return text.replace(/&(#x[0-9a-fA-F]+|#[0-9]+|[A-Za-z]+);/g, (_, ref: string) => {
    if (ref.startsWith("#x")) return String.fromCodePoint(Number.parseInt(ref.slice(2), 16));
    if (ref.startsWith("#")) return String.fromCodePoint(Number.parseInt(ref.slice(1), 10));
    const value = PREDEFINED_ENTITIES[ref];
    if (value === undefined) throw new XmlError(`unknown entity &${ref};`, offset);
    return value;
  });
}

const NAME = /[A-Za-z_:][\w.:-]*/y;
const ATTRIBUTE = /\s*([A-Za-z_:][\w.:-]*)\s*=\s*(?:"([^"]*)"|'([^']*)')/y;

/** Parses one XML document and returns its root element. */
export function parseXml(text: string): XmlElement {
  const stack: XmlElement[] = [];
  let root: XmlElement | undefined;
  let at = 0;
  const skipPast = (terminator: string, what: string) => {
    const end = text.indexOf(terminator, at);
    if (end < 0) throw new XmlError(`unterminated ${what}`, at);
    const body = text.slice(at, end);
    at = end + terminator.length;
    return body;
  };
  while (at < text.length) {
    const lt = text.indexOf("<", at);
    const textEnd = lt < 0 ? text.length : lt;
    if (textEnd > at) {
      const chars = text.slice(at, textEnd);
      const parent = stack.at(-1);
      if (parent) parent.text += decodeEntities(chars, at);
      else if (chars.trim()) throw new XmlError("text outside the root element", at);
      at = textEnd;
      continue;
    }
    if (text.startsWith("<!--", at)) {
      at += 4;
      skipPast("-->", "comment");
    } else if (text.startsWith("<![CDATA[", at)) {
      at += 9;
      const chars = skipPast("]]>", "CDATA section");
      const parent = stack.at(-1);
      if (!parent) throw new XmlError("CDATA outside the root element", at);
      parent.text += chars;
    } else if (text.startsWith("<?", at) || text.startsWith("<!", at)) {
      at += 2;
      skipPast(">", "declaration");
    } else if (text.startsWith("</", at)) {
      at += 2;
      NAME.lastIndex = at;
      const name = NAME.exec(text)?.[0];
      const open = stack.pop();
      if (!name || !open || open.name !== name)
        throw new XmlError(`closing tag </${name ?? "?"}> does not match <${open?.name ?? "nothing"}>`, at);
      at += name.length;
      skipPast(">", "closing tag");
    } else {
      at += 1;
      NAME.lastIndex = at;
      const name = NAME.exec(text)?.[0];
      if (!name) throw new XmlError("expected an element name", at);
      at += name.length;
      const attributes: Record<string, string> = {};
      for (;;) {
        ATTRIBUTE.lastIndex = at;
        const match = ATTRIBUTE.exec(text);
        if (!match) break;
        const [whole, key = "", double, single] = match;
        attributes[key] = decodeEntities(double ?? single ?? "", at);
        at += whole.length;
      }
      while (/\s/.test(text[at] ?? "")) at++;
      const element: XmlElement = { name, attributes, children: [], text: "" };
      const parent = stack.at(-1);
      if (parent) parent.children.push(element);
      else if (root) throw new XmlError("a second root element", at);
      else root = element;
      if (text.startsWith("/>", at)) at += 2;
      else if (text[at] === ">") {
        at += 1;
        stack.push(element);
      } else throw new XmlError(`malformed start tag <${name}>`, at);
    }
  }
  if (stack.length > 0) throw new XmlError(`<${stack.at(-1)?.name}> is never closed`, at);
  if (!root) throw new XmlError("no root element", 0);
  return root;
}

/** The first descendant along a path of element names ("devices/emulator"), or undefined. */
export function child(element: XmlElement, path: string): XmlElement | undefined {
  let current: XmlElement | undefined = element;
  for (const name of path.split("/")) {
    current = current?.children.find((c) => c.name === name);
    if (!current) return undefined;
  }
  return current;
}

/** Every child element with this name (one level). */
export function childrenNamed(element: XmlElement, name: string): XmlElement[] {
  return element.children.filter((c) => c.name === name);
}
