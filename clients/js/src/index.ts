export { connect, RoomcastClient, sseUrlFor } from "./client.js";
export type {
  ClientEvents,
  ConnectOptions,
  ConnectedInfo,
  ConnectionState,
  DisconnectedInfo,
} from "./client.js";
export { Room } from "./room.js";
export type { HistoryOptions, JoinInfo, PublishOptions, RecoveryInfo, RoomEvents } from "./room.js";
export { RoomcastError } from "./errors.js";
export type { ClientErrorCode, ErrorCode, ServerErrorCode } from "./errors.js";
export { backoffCeiling, backoffDelay, DEFAULT_BACKOFF } from "./backoff.js";
export type { BackoffOptions } from "./backoff.js";
export { reconnectPolicy } from "./closeCodes.js";
export type { ReconnectPolicy } from "./closeCodes.js";
export { tokenExpiry } from "./jwt.js";
export { WebSocketTransport, webSocketTransport } from "./transport.js";
export { EventStreamParser, SseTransport, sseSendUrl, sseTransport } from "./sse.js";
export type { EventSourceConstructor, EventSourceLike, FetchFunction, SseTransportConfig, StreamEvent } from "./sse.js";
export type {
  Transport,
  TransportClose,
  TransportFactory,
  TransportHandlers,
  TransportName,
  TransportOptions,
  WebSocketConstructor,
  WebSocketLike,
} from "./transport.js";
export type * from "./protocol.js";
