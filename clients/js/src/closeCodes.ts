/**
 * What a client does after a close code (docs/protocol.md, "Reconnecting after a close", and
 * `roomcast_common::close_code::CloseCode::reconnect` on the server):
 * - `retry`: the server's transient condition (1001 drain, 1011, 1012, 1014, 4008 slow consumer,
 *   and 1005/1006/1015, where no close code arrived: the connection dropped): reconnect with
 *   jittered backoff.
 * - `slow_down`: 1013, 4029 and other 4000-4499: reconnect, but not before a backoff.
 * - `new_token`: 4001, the token expired: reconnect only with a new token from `getToken`.
 * - `terminal`: 1000, 1008, 1002, 1003, 1007, 1009, 1010, 3000-3999, 4500-4999 (and anything
 *   else): ended on purpose, by policy, or by the client's own protocol fault; not retried.
 */
export type ReconnectPolicy = "retry" | "slow_down" | "new_token" | "terminal";

export function reconnectPolicy(code: number): ReconnectPolicy {
  switch (code) {
    case 1001:
    case 1005:
    case 1006:
    case 1011:
    case 1012:
    case 1014:
    case 1015:
    case 4008:
      return "retry";
    case 4001:
      return "new_token";
    case 1013:
      return "slow_down";
  }
  if (code >= 4000 && code <= 4499) return "slow_down";
  return "terminal";
}
