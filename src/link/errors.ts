/** Typed failures of the send ↔ receive link: what was wrong and, for bytes on the wire, at which byte. */

export type LinkErrorCode =
  /** HELLO did not start with the link magic: the peer is not a vmprune link endpoint. */
  | "bad-magic"
  /** The peer speaks another major version of the protocol. */
  | "unsupported-version"
  /** A frame's type byte is not a known message type. */
  | "unknown-type"
  /** A frame's length is above the protocol's bound (or that message type's own bound). */
  | "bad-length"
  /** A payload whose fields do not fit its length or hold impossible values. */
  | "bad-payload"
  /** The byte stream ended inside a frame. */
  | "truncated"
  /** A well-formed message that may not come now, or not in this direction. */
  | "unexpected-message"
  /** The peer's HMAC does not prove knowledge of the pre-shared key. */
  | "auth-failed"
  /** The pre-shared key is unusable (too short). */
  | "bad-key"
  /** The handshake did not complete in time. */
  | "timeout"
  /** The peer closed or reset the connection during the handshake. */
  | "closed"
  /** REF ids out of order, or PAGE_DATA/NACK/ACK naming a ref that is not outstanding. */
  | "unknown-ref"
  /** send held more stream bytes past an unsettled REF than receive's window allows. */
  | "window-exceeded"
  /** The peer sent ERROR. */
  | "peer-error";

export class LinkError extends Error {
  override readonly name = "LinkError";
  constructor(
    readonly code: LinkErrorCode,
    readonly detail: string,
    /** Offset in the link byte stream (of the frame that could not be decoded), when the error is about bytes. */
    readonly offset?: number,
  ) {
    super(
      offset === undefined ? `link: ${detail} (${code})` : `link stream, byte ${offset}: ${detail} (${code})`,
    );
  }
}
