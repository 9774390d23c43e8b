/** Error codes of the protocol (an `error` frame's `code`), and the client's own. */
export type ServerErrorCode =
  | "bad_request"
  | "unauthorized"
  | "forbidden"
  | "not_joined"
  | "rate_limited"
  | "too_large"
  | "unavailable"
  | "internal";

/**
 * Codes the client itself produces: `timeout` (no reply within the command timeout),
 * `disconnected` (the connection ended before the reply came; the command may or may not have
 * run), `closed` (the client was closed or stopped for good).
 */
export type ClientErrorCode = "timeout" | "disconnected" | "closed";

export type ErrorCode = ServerErrorCode | ClientErrorCode;

export class RoomcastError extends Error {
  readonly code: ErrorCode;
  /** The `id` of the command this error answers, when there was one. */
  readonly id?: number;

  constructor(code: ErrorCode, message: string, id?: number) {
    super(message);
    this.name = "RoomcastError";
    this.code = code;
    if (id !== undefined) this.id = id;
  }
}
