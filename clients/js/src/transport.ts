import type { ClientFrame, ServerFrame } from "./protocol.js";

/** Why a transport ended. */
export interface TransportClose {
  /** The close code (1006 when the connection dropped without one). */
  code: number;
  reason: string;
  /**
   * The HTTP status of a refused handshake, when the transport can see it (Node's `ws` can;
   * browsers hide it and report 1006).
   */
  httpStatus?: number;
}

export interface TransportHandlers {
  onOpen(): void;
  onFrame(frame: ServerFrame): void;
  /** Called exactly once per transport, whether it opened or not. */
  onClose(close: TransportClose): void;
}

/** The built-in transports: WebSocket, and the SSE + POST fallback (contract §1.5). */
export type TransportName = "websocket" | "sse";

/**
 * One connection attempt's carriage of frames. The client creates a new transport per attempt:
 * `WebSocketTransport` here, `SseTransport` in `sse.ts`.
 */
export interface Transport {
  readonly name: string;
  /** Throws when the transport is not open (before `connected`, after a close). */
  send(frame: ClientFrame): void;
  /** Closes on purpose; `onClose` follows. */
  close(code?: number, reason?: string): void;
  /** The token was refreshed: a transport that sends it again (SSE's POSTs) uses the new one. */
  updateToken?(token: string): void;
}

export interface TransportOptions {
  /** The endpoint, e.g. `ws://localhost:8080/ws` or `http://localhost:8080/sse`. */
  url: string;
  token: string;
}

export type TransportFactory = (opts: TransportOptions, handlers: TransportHandlers) => Transport;

/** The subset of the WHATWG WebSocket the client uses (browsers, Node 22+, and `ws`). */
export interface WebSocketLike {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((ev: unknown) => void) | null;
  onmessage: ((ev: { data: unknown }) => void) | null;
  onclose: ((ev: { code: number; reason: string }) => void) | null;
  onerror: ((ev: unknown) => void) | null;
}

export type WebSocketConstructor = new (url: string) => WebSocketLike;

const OPEN = 1;

/** Adds `token` to the URL's query (browsers cannot set an Authorization header). */
export function withToken(url: string, token: string): string {
  const u = new URL(url);
  u.searchParams.set("token", token);
  return u.toString();
}

let nodeWs: Promise<WebSocketConstructor> | undefined;

/**
 * The WebSocket class to use: the global one (browsers, Node 22+), else the `ws` package
 * (Node 20), loaded on first use.
 */
export async function defaultWebSocket(): Promise<WebSocketConstructor> {
  const global = (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
  if (typeof global === "function") return global;
  nodeWs ??= import("ws").then(
    (m) => (m.default ?? m.WebSocket) as unknown as WebSocketConstructor,
    () => {
      throw new Error(
        "no WebSocket: this runtime has no global WebSocket and the `ws` package is not installed",
      );
    },
  );
  return nodeWs;
}

/** The WebSocket transport. `socket` is the underlying WebSocket (tests may reach for it). */
export class WebSocketTransport implements Transport {
  readonly name = "websocket";
  socket: WebSocketLike | undefined;
  private closed = false;
  private httpStatus: number | undefined;

  constructor(
    opts: TransportOptions,
    private readonly handlers: TransportHandlers,
    ctor: WebSocketConstructor | Promise<WebSocketConstructor>,
  ) {
    Promise.resolve(ctor).then(
      (Ctor) => {
        if (this.closed) return;
        let socket: WebSocketLike;
        try {
          socket = new Ctor(withToken(opts.url, opts.token));
        } catch (err) {
          this.finish({ code: 1006, reason: String(err) });
          return;
        }
        this.socket = socket;
        socket.onopen = () => {
          if (!this.closed) this.handlers.onOpen();
        };
        socket.onmessage = (ev) => {
          if (this.closed || typeof ev.data !== "string") return;
          let frame: ServerFrame;
          try {
            frame = JSON.parse(ev.data) as ServerFrame;
          } catch {
            return;
          }
          this.handlers.onFrame(frame);
        };
        socket.onerror = (ev) => {
          // `ws` reports a refused handshake as "Unexpected server response: 401".
          const message = (ev as { message?: string; error?: { message?: string } })?.message ??
            (ev as { error?: { message?: string } })?.error?.message;
          const m = typeof message === "string" ? /Unexpected server response: (\d+)/.exec(message) : null;
          if (m) this.httpStatus = Number(m[1]);
        };
        socket.onclose = (ev) => {
          this.finish({ code: ev.code || 1006, reason: ev.reason ?? "" });
        };
      },
      (err) => this.finish({ code: 1006, reason: String(err) }),
    );
  }

  send(frame: ClientFrame): void {
    if (this.closed || !this.socket || this.socket.readyState !== OPEN) {
      throw new Error("transport not open");
    }
    this.socket.send(JSON.stringify(frame));
  }

  close(code = 1000, reason = ""): void {
    if (this.closed) return;
    try {
      this.socket?.close(code, reason);
    } catch {
      // A socket still connecting may refuse some codes; it is dropped anyway.
    }
    this.finish({ code, reason });
  }

  private finish(close: TransportClose): void {
    if (this.closed) return;
    this.closed = true;
    if (this.socket) {
      this.socket.onopen = null;
      this.socket.onmessage = null;
      this.socket.onclose = null;
      // Keep an error handler: `ws` throws on an unhandled 'error' event.
      this.socket.onerror = () => {};
    }
    if (this.httpStatus !== undefined && close.code === 1006) close.httpStatus = this.httpStatus;
    this.handlers.onClose(close);
  }
}

export function webSocketTransport(ctor?: WebSocketConstructor): TransportFactory {
  return (opts, handlers) => new WebSocketTransport(opts, handlers, ctor ?? defaultWebSocket());
}
