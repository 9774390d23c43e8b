import { backoffCeiling, backoffDelay, DEFAULT_BACKOFF, type BackoffOptions } from "./backoff.js";
import { reconnectPolicy } from "./closeCodes.js";
import { Emitter } from "./emitter.js";
import { RoomcastError } from "./errors.js";
import { tokenExpiry } from "./jwt.js";
import type { ClientFrame, ConnectedFrame, ServerFrame } from "./protocol.js";
import { Room, type RoomHost } from "./room.js";
import { sseTransport, type EventSourceConstructor, type FetchFunction } from "./sse.js";
import {
  webSocketTransport,
  type Transport,
  type TransportClose,
  type TransportFactory,
  type TransportName,
  type WebSocketConstructor,
} from "./transport.js";

export type ConnectionState = "connecting" | "connected" | "disconnected";

export interface ConnectOptions {
  /** The gateway's WebSocket endpoint, e.g. `wss://rt.example.com/ws`. */
  url: string;
  /** A JWT. Without `getToken` the client stops when it expires (close code 4001). */
  token?: string;
  /**
   * Returns a fresh JWT. Called to connect when there is no usable token, before the current
   * one expires (then sent with `refresh`), and after a 4001 close or a 401 handshake.
   */
  getToken?: () => string | Promise<string>;
  /** How long a command waits for its reply, in ms (default 10000). */
  commandTimeoutMs?: number;
  /** How long a connection attempt may take until `connected`, in ms (default 10000). */
  connectTimeoutMs?: number;
  /** Reconnect delays: full jitter below `min(maxMs, initialMs * 2^attempt)`. */
  backoff?: BackoffOptions;
  /** Refresh the token this long before `exp` (default 30000; at most half its remaining life). */
  refreshMarginMs?: number;
  /** The WebSocket class (default: the global one, else the `ws` package). */
  WebSocket?: WebSocketConstructor;
  /**
   * The transports to use, in order of preference (default `["websocket", "sse"]`): after
   * `fallbackAfter` failed attempts in a row the client tries the next one. `["sse"]` forces
   * the SSE + POST fallback (networks that block WebSocket); `["websocket"]` never falls back.
   */
  transports?: TransportName[];
  /** Connection attempts that fail in a row before the client tries the next transport (default 2). */
  fallbackAfter?: number;
  /**
   * While connected over a transport other than the first of `transports`, try the first one
   * this often, in ms, and switch when it opens (default 60000; 0: never).
   */
  upgradeIntervalMs?: number;
  /** The SSE endpoint; default: `url` with `http(s):` for `ws(s):` and `/sse` for a final `/ws`. */
  sseUrl?: string;
  /** Where SSE commands are POSTed (`/sse/send` on any gateway); default: `sseUrl` + `/send`. */
  sseSendUrl?: string;
  /** `fetch` for the SSE transport (default: the global one). */
  fetch?: FetchFunction;
  /** The EventSource class for SSE (default: the global one; `null`: read the stream with fetch). */
  EventSource?: EventSourceConstructor | null;
  /** Replaces built-in transports (tests, a custom carriage). */
  transportFactories?: Partial<Record<TransportName, TransportFactory>>;
  /**
   * Replaces the WebSocket transport; without `transports` it is then the only one (no
   * fallback). Kept for compatibility: prefer `transportFactories`.
   */
  transport?: TransportFactory;
  /** Connect at once (default true); otherwise call `client.open()`. */
  autoConnect?: boolean;
  /** Random source of the jitter (tests). */
  random?: () => number;
}

export interface ConnectedInfo {
  clientId: string;
  user: string;
  gateway: string;
  /** The carriage of this connection: `websocket`, or `sse` (the fallback). */
  transport: TransportName;
}

export interface DisconnectedInfo {
  /** The close code (1006: the connection dropped, or could not be opened). */
  code: number;
  reason: string;
  /** HTTP status of a refused handshake, where the transport can see it. */
  httpStatus?: number;
  /** Whether the client will try again on its own. */
  willReconnect: boolean;
  /** In how many ms (absent when waiting for the browser to come back online). */
  retryInMs?: number;
}

export interface ClientEvents {
  state: ConnectionState;
  connecting: { attempt: number; transport: TransportName };
  connected: ConnectedInfo;
  disconnected: DisconnectedInfo;
  /** The token was replaced on the open connection (`refresh`). */
  refreshed: { expiresAt: number };
  /** An error frame without an id, or a failed background refresh. */
  error: RoomcastError;
  /** A backend subscribed this connection to a room (server API); the room object is here. */
  subscribed: Room;
}

interface Pending {
  onReply: (frame: ServerFrame) => void;
  onLost: () => void;
}

/** The code the client closes with when it drops a connection that stopped answering. */
const CLIENT_DROP = 4000;

/** The first upgrade probe after a fallback from a transport that had worked. */
const QUICK_UPGRADE_MS = 3000;

/** The SSE endpoint of a WebSocket URL: `ws(s):` becomes `http(s):`, a final `/ws` becomes `/sse`. */
export function sseUrlFor(url: string): string {
  const u = new URL(url);
  if (u.protocol === "ws:") u.protocol = "http:";
  else if (u.protocol === "wss:") u.protocol = "https:";
  u.pathname = /\/ws\/?$/.test(u.pathname)
    ? u.pathname.replace(/\/ws\/?$/, "/sse")
    : `${u.pathname.replace(/\/$/, "")}/sse`;
  u.searchParams.delete("token");
  return u.toString();
}

const hasWindow = (): boolean =>
  typeof window !== "undefined" && typeof window.addEventListener === "function";

/**
 * A Roomcast connection that reconnects by itself. Create it with `connect()`.
 */
export class RoomcastClient extends Emitter<ClientEvents> {
  private readonly opts: ConnectOptions;
  private readonly factories: Record<TransportName, TransportFactory>;
  /** The transports in order of preference. */
  private readonly order: TransportName[];
  /** Index in `order` of the transport the next attempt uses. */
  private mode = 0;
  /** Attempts in a row that ended before `connected` on `order[mode]`. */
  private failures = 0;
  /** The transport `_transport` was made as. */
  private current: TransportName = "websocket";
  /** A connection of the preferred transport opened while connected over a fallback. */
  private probe: Transport | undefined;
  private upgradeTimer: ReturnType<typeof setTimeout> | undefined;
  /** The preferred transport has connected before: a fallback is more likely an outage. */
  private preferredWorked = false;
  /** Upgrade probes since the client last connected over the preferred transport. */
  private probes = 0;
  /** The client ids of this client's connections (the latest ones). */
  private readonly ownClientIds = new Set<string>();
  private readonly rooms = new Map<string, Room>();
  private readonly pending = new Map<number, Pending>();
  private readonly waitingForConnection: Array<() => void> = [];
  private token: string | undefined;
  private forceNewToken = false;
  private nextId = 1;
  private attempt = 0;
  private stopped = false;
  private _state: ConnectionState = "disconnected";
  private connectTimer: ReturnType<typeof setTimeout> | undefined;
  private retryTimer: ReturnType<typeof setTimeout> | undefined;
  private refreshTimer: ReturnType<typeof setTimeout> | undefined;
  private info: ConnectedInfo | undefined;
  private readonly host: RoomHost;
  private readonly urls: Record<TransportName, string>;
  private readonly browserCleanup: Array<() => void> = [];
  /** The current transport. Exposed for tests and diagnostics; not part of the API. */
  _transport: Transport | undefined;
  commandTimeoutMs: number;

  constructor(opts: ConnectOptions) {
    super();
    if (!opts.token && !opts.getToken) throw new Error("connect: give `token` or `getToken`");
    this.opts = opts;
    this.token = opts.token;
    this.commandTimeoutMs = opts.commandTimeoutMs ?? 10_000;
    const sseUrl = opts.sseUrl ?? sseUrlFor(opts.url);
    this.factories = {
      websocket: opts.transportFactories?.websocket ?? opts.transport ?? webSocketTransport(opts.WebSocket),
      sse:
        opts.transportFactories?.sse ??
        sseTransport({
          ...(opts.sseSendUrl !== undefined ? { sendUrl: opts.sseSendUrl } : {}),
          ...(opts.fetch !== undefined ? { fetch: opts.fetch } : {}),
          ...(opts.EventSource !== undefined ? { EventSource: opts.EventSource } : {}),
        }),
    };
    const order = opts.transports ?? (opts.transport ? ["websocket"] : ["websocket", "sse"]);
    this.order = [...new Set(order)];
    if (this.order.length === 0) throw new Error("connect: `transports` is empty");
    this.urls = { websocket: opts.url, sse: sseUrl };
    const self = this;
    this.host = {
      get connected() {
        return self._state === "connected";
      },
      get isClosed() {
        return self.stopped;
      },
      get commandTimeoutMs() {
        return self.commandTimeoutMs;
      },
      sendCommand: (frame, onReply, onLost) => this.sendCommand(frame, onReply, onLost),
      forget: (id) => {
        this.pending.delete(id);
      },
      retryDelay: (attempt) => backoffDelay(attempt, opts.backoff, opts.random),
      isOwn: (clientId) => this.ownClientIds.has(clientId),
    };
    this.watchBrowser();
    if (opts.autoConnect !== false) this.open();
  }

  get state(): ConnectionState {
    return this._state;
  }

  /** The `connected` frame's details while connected. */
  get connection(): ConnectedInfo | undefined {
    return this._state === "connected" ? this.info : undefined;
  }

  /** The transport in use while connected (`websocket` or `sse`), else undefined. */
  get transport(): TransportName | undefined {
    return this.connection?.transport;
  }

  /** True once `close()` was called or a terminal close code stopped the client. */
  get closed(): boolean {
    return this.stopped;
  }

  /** The room object for `name` (one per name; nothing is sent until `join`). */
  room(name: string): Room {
    let room = this.rooms.get(name);
    if (!room) {
      room = new Room(name, this.host);
      this.rooms.set(name, room);
    }
    return room;
  }

  /** Starts connecting (again, after a terminal close). */
  open(): void {
    if (this._transport || this.retryTimer) return;
    this.stopped = false;
    void this.attemptConnection();
  }

  /** Closes the connection for good; pending commands are rejected with `closed`. */
  close(): void {
    if (this.stopped && !this._transport) return;
    this.stopped = true;
    this.clearTimers();
    const t = this._transport;
    if (t) t.close(1000, "client closed");
    else this.finishStopped({ code: 1000, reason: "client closed" });
    for (const c of this.browserCleanup.splice(0)) c();
  }

  /** Application-level ping: resolves with the round trip in ms. */
  async ping(timeoutMs = this.commandTimeoutMs): Promise<number> {
    const start = performanceNow();
    await this.request({ type: "ping" }, timeoutMs);
    return performanceNow() - start;
  }

  /**
   * Replaces the connection's token with a new one from `getToken` (or the one given).
   * Done automatically before `exp` when `getToken` is set.
   */
  async refresh(token?: string): Promise<{ expiresAt: number }> {
    const t = token ?? (await this.fetchToken());
    const reply = await this.request({ type: "refresh", token: t }, this.commandTimeoutMs);
    const expiresAt = (reply as { expiresAt: number }).expiresAt;
    this.token = t;
    this._transport?.updateToken?.(t);
    this.scheduleRefresh();
    this.emit("refreshed", { expiresAt });
    return { expiresAt };
  }

  /**
   * Uses `token` from now on: sent with `refresh` when connected (resolves once the server took
   * it), and used for the next connection otherwise.
   */
  async setToken(token: string): Promise<void> {
    this.token = token;
    if (this._state === "connected") await this.refresh(token);
  }

  // ---- commands ----

  /**
   * Sends a client-level command once connected (waiting for the connection if needed) and
   * resolves with its reply; rejects with the reply's error code, `timeout`, `disconnected`
   * (the connection ended before the reply) or `closed`.
   */
  private request(frame: ClientFrame, timeoutMs: number): Promise<ServerFrame> {
    if (this.stopped) return Promise.reject(new RoomcastError("closed", "client closed"));
    return new Promise<ServerFrame>((resolve, reject) => {
      let id: number | undefined;
      let done = false;
      const timer = setTimeout(() => {
        done = true;
        if (id !== undefined) this.pending.delete(id);
        reject(new RoomcastError("timeout", `${frame.type} timed out after ${timeoutMs} ms`, id));
      }, timeoutMs);
      const send = () => {
        if (done) return;
        if (this.stopped) {
          clearTimeout(timer);
          done = true;
          reject(new RoomcastError("closed", "client closed"));
          return;
        }
        id = this.sendCommand(
          frame,
          (reply) => {
            clearTimeout(timer);
            done = true;
            if (reply.type === "error") reject(new RoomcastError(reply.code, reply.message, reply.id));
            else resolve(reply);
          },
          () => {
            clearTimeout(timer);
            done = true;
            reject(
              new RoomcastError(
                this.stopped ? "closed" : "disconnected",
                `connection ended before the reply to ${frame.type}`,
                id,
              ),
            );
          },
        );
        if (id === undefined) this.waitingForConnection.push(send);
      };
      send();
    });
  }

  private sendCommand(
    frame: ClientFrame,
    onReply: (frame: ServerFrame) => void,
    onLost: () => void,
  ): number | undefined {
    const t = this._transport;
    if (!t || this._state !== "connected") return undefined;
    const id = this.nextId++;
    try {
      t.send({ ...frame, id });
    } catch {
      return undefined;
    }
    this.pending.set(id, { onReply, onLost });
    return id;
  }

  // ---- connection lifecycle ----

  private async attemptConnection(): Promise<void> {
    this.retryTimer = undefined;
    if (this.stopped) return;
    const name = this.order[this.mode]!;
    this.setState("connecting");
    this.emit("connecting", { attempt: this.attempt, transport: name });
    let token: string;
    try {
      token = await this.connectToken();
    } catch (err) {
      this.afterClose({ code: 1006, reason: `getToken failed: ${String(err)}` });
      return;
    }
    if (this.stopped) return;
    const transport = this.createTransport(name, token);
    this._transport = transport;
    this.current = name;
    this.connectTimer = setTimeout(() => {
      if (this._transport === transport && this._state !== "connected") {
        transport.close(CLIENT_DROP, "connect timeout");
      }
    }, this.opts.connectTimeoutMs ?? 10_000);
  }

  /**
   * A transport whose events reach the client while it is the current one, or, as an upgrade
   * probe, until its `connected` frame makes it the current one.
   */
  private createTransport(name: TransportName, token: string): Transport {
    const transport: Transport = this.factories[name](
      { url: this.urls[name], token },
      {
        onOpen: () => {},
        onFrame: (frame: ServerFrame) => {
          if (this._transport === transport) this.onFrame(frame);
          else if (this.probe === transport && frame.type === "connected") this.upgrade(transport, name, frame);
        },
        onClose: (close: TransportClose) => {
          if (this._transport === transport) this.onTransportClose(close);
          else if (this.probe === transport) {
            this.probe = undefined;
            this.scheduleUpgrade();
          }
        },
      },
    );
    return transport;
  }

  /** The token to connect with: the current one unless it is (nearly) expired or refused. */
  private async connectToken(): Promise<string> {
    if (this.opts.getToken) {
      const exp = this.token ? tokenExpiry(this.token) : undefined;
      const stale = exp !== undefined && exp * 1000 <= Date.now() + 1000;
      if (!this.token || this.forceNewToken || stale) {
        this.token = await this.fetchToken();
        this.forceNewToken = false;
      }
    }
    return this.token!;
  }

  private async fetchToken(): Promise<string> {
    if (!this.opts.getToken) throw new RoomcastError("unauthorized", "no getToken to fetch a new token");
    const t = await this.opts.getToken();
    if (typeof t !== "string" || t === "") throw new Error("getToken returned no token");
    return t;
  }

  private onFrame(frame: ServerFrame): void {
    const id = (frame as { id?: number }).id;
    if (id !== undefined) {
      const p = this.pending.get(id);
      if (p) {
        this.pending.delete(id);
        p.onReply(frame);
        return;
      }
    }
    switch (frame.type) {
      case "connected":
        this.onConnected(frame);
        return;
      case "message":
      case "member_joined":
      case "member_left":
        this.rooms.get(frame.room)?._frame(frame);
        return;
      case "joined": {
        if (id !== undefined) return; // a reply that timed out
        const room = this.room(frame.room);
        room._frame(frame);
        this.emit("subscribed", room);
        return;
      }
      case "left":
        if (id === undefined) this.rooms.get(frame.room)?._frame(frame);
        return;
      case "error":
        if (id === undefined) this.emit("error", new RoomcastError(frame.code, frame.message));
        return;
      case "disconnect":
        // The SSE fallback's last event; its transport reports it as a close.
        return;
    }
  }

  private onConnected(frame: ConnectedFrame): void {
    if (this.connectTimer) clearTimeout(this.connectTimer);
    this.connectTimer = undefined;
    this.attempt = 0;
    this.failures = 0;
    this.ownClientIds.add(frame.clientId);
    if (this.ownClientIds.size > 64) this.ownClientIds.delete(this.ownClientIds.values().next().value!);
    if (this.current === this.order[0]) {
      this.preferredWorked = true;
      this.probes = 0;
    }
    this.info = {
      clientId: frame.clientId,
      user: frame.user,
      gateway: frame.gateway,
      transport: this.current,
    };
    this.setState("connected");
    this.emit("connected", this.info);
    this.scheduleRefresh();
    this.scheduleUpgrade();
    for (const room of this.rooms.values()) room._connected();
    for (const send of this.waitingForConnection.splice(0)) send();
  }

  private onTransportClose(close: TransportClose): void {
    const wasConnected = this._state === "connected";
    this._transport = undefined;
    this.clearTimers();
    this.dropTransportState();
    if (!wasConnected && ++this.failures >= (this.opts.fallbackAfter ?? 2) && this.order.length > 1) {
      // This transport does not get through (a proxy refusing WebSocket, say): try the next.
      this.mode = (this.mode + 1) % this.order.length;
      this.failures = 0;
    }
    this.afterClose(close);
  }

  /** Commands in flight on the transport that ended are lost; rooms re-join on the next one. */
  private dropTransportState(): void {
    const lost = [...this.pending.values()];
    this.pending.clear();
    for (const room of this.rooms.values()) room._disconnected();
    for (const p of lost) p.onLost();
  }

  private afterClose(close: TransportClose): void {
    if (this.stopped) {
      this.finishStopped(close);
      return;
    }
    const decision = this.decide(close);
    if (decision === "stop") {
      this.stopped = true;
      this.finishStopped(close);
      return;
    }
    const base: DisconnectedInfo = { code: close.code, reason: close.reason, willReconnect: true };
    if (close.httpStatus !== undefined) base.httpStatus = close.httpStatus;
    if (hasWindow() && typeof navigator !== "undefined" && navigator.onLine === false) {
      // Offline: wait for the browser's `online` event.
      this.setState("disconnected");
      this.emit("disconnected", base);
      return;
    }
    let delay = backoffDelay(this.attempt, this.opts.backoff, this.opts.random);
    if (decision === "slow_down") {
      // Not before a backoff: at least the first step, at most the cap.
      const initial = this.opts.backoff?.initialMs ?? DEFAULT_BACKOFF.initialMs;
      delay = Math.min(backoffCeiling(Infinity, this.opts.backoff), initial + delay);
    }
    this.attempt++;
    this.setState("disconnected");
    this.emit("disconnected", { ...base, retryInMs: delay });
    this.retryTimer = setTimeout(() => void this.attemptConnection(), delay);
  }

  /** What to do after a close: retry, retry after a backoff, or stop. */
  private decide(close: TransportClose): "retry" | "slow_down" | "stop" {
    const canRenew = this.opts.getToken !== undefined;
    if (close.httpStatus !== undefined) {
      if (close.httpStatus === 401) {
        if (!canRenew) return "stop";
        this.forceNewToken = true;
        return "slow_down";
      }
      if (close.httpStatus === 429 || close.httpStatus >= 500) return "slow_down";
      return "stop"; // 400, 403 (origin), 426: retrying does not help
    }
    if (close.code === 1006 && !canRenew && this.token) {
      // Browsers hide a 401: an expired token cannot connect again.
      const exp = tokenExpiry(this.token);
      if (exp !== undefined && exp * 1000 <= Date.now()) return "stop";
    }
    if (close.code === CLIENT_DROP) return "retry";
    switch (reconnectPolicy(close.code)) {
      case "retry":
        return "retry";
      case "slow_down":
        return "slow_down";
      case "new_token":
        if (!canRenew) return "stop";
        this.forceNewToken = true;
        return "retry";
      case "terminal":
        return "stop";
    }
  }

  private finishStopped(close: TransportClose): void {
    this.clearTimers();
    for (const p of [...this.pending.values()]) p.onLost();
    this.pending.clear();
    for (const room of this.rooms.values()) room._closed();
    for (const send of this.waitingForConnection.splice(0)) send();
    const info: DisconnectedInfo = { code: close.code, reason: close.reason, willReconnect: false };
    if (close.httpStatus !== undefined) info.httpStatus = close.httpStatus;
    this.setState("disconnected");
    this.emit("disconnected", info);
  }

  private scheduleRefresh(): void {
    if (this.refreshTimer) clearTimeout(this.refreshTimer);
    this.refreshTimer = undefined;
    if (!this.opts.getToken || !this.token || this._state !== "connected") return;
    const exp = tokenExpiry(this.token);
    if (exp === undefined) return;
    const remaining = exp * 1000 - Date.now();
    const margin = Math.min(this.opts.refreshMarginMs ?? 30_000, remaining / 2);
    const delay = Math.max(0, remaining - margin);
    this.refreshTimer = setTimeout(() => {
      this.refreshTimer = undefined;
      this.refresh().catch((err: unknown) => {
        const e =
          err instanceof RoomcastError ? err : new RoomcastError("unauthorized", `refresh failed: ${String(err)}`);
        if (e.code !== "disconnected" && e.code !== "closed") this.emit("error", e);
        // Try again later while the token is still valid; past `exp` the server closes
        // with 4001 and the client reconnects with a new token.
        const left = exp * 1000 - Date.now();
        if (left > 2000 && this._state === "connected" && !this.refreshTimer) {
          this.refreshTimer = setTimeout(() => this.scheduleRefresh(), Math.min(5000, left / 2));
        }
      });
    }, delay);
  }

  private clearTimers(): void {
    for (const t of [this.connectTimer, this.retryTimer, this.refreshTimer, this.upgradeTimer]) {
      if (t) clearTimeout(t);
    }
    this.connectTimer = this.retryTimer = this.refreshTimer = this.upgradeTimer = undefined;
    const probe = this.probe;
    this.probe = undefined;
    probe?.close(1000, "upgrade cancelled");
  }

  /** Connected over a fallback: try the preferred transport again later. */
  private scheduleUpgrade(): void {
    if (this.upgradeTimer) clearTimeout(this.upgradeTimer);
    this.upgradeTimer = undefined;
    const every = this.opts.upgradeIntervalMs ?? 60_000;
    const preferred = this.order[0]!;
    if (every <= 0 || this._state !== "connected" || this.current === preferred || this.probe) return;
    // Where the preferred transport worked before, the fallback most likely followed an outage
    // (its attempts failed while the gateway was down): the first probe comes soon.
    const delay = this.preferredWorked && this.probes === 0 ? Math.min(every, QUICK_UPGRADE_MS) : every;
    this.upgradeTimer = setTimeout(() => {
      this.probes++;
      this.upgradeTimer = undefined;
      if (this._state !== "connected" || this.stopped || !this.token) return;
      const probe = this.createTransport(preferred, this.token);
      this.probe = probe;
      setTimeout(() => {
        if (this.probe === probe) probe.close(CLIENT_DROP, "upgrade timeout");
      }, this.opts.connectTimeoutMs ?? 10_000);
    }, delay);
  }

  /**
   * The probe opened: it becomes the connection. What was in flight on the old one is sent
   * again and the rooms re-join with `since`, as after any reconnect, so nothing is lost or
   * repeated; the state stays `connected` and `connected` is emitted with the new transport.
   */
  private upgrade(probe: Transport, name: TransportName, frame: ConnectedFrame): void {
    const old = this._transport;
    this.probe = undefined;
    this._transport = probe;
    this.current = name;
    this.mode = this.order.indexOf(name);
    this.dropTransportState();
    old?.close(1000, `switched to ${name}`);
    this.onConnected(frame);
  }

  private setState(state: ConnectionState): void {
    if (this._state === state) return;
    this._state = state;
    this.emit("state", state);
  }

  /** Browsers: reconnect at once when back online; check the connection when the page is shown again. */
  private watchBrowser(): void {
    if (!hasWindow()) return;
    const online = () => {
      if (this.stopped || this._transport) return;
      if (this.retryTimer) clearTimeout(this.retryTimer);
      this.retryTimer = undefined;
      this.attempt = 0;
      void this.attemptConnection();
    };
    const offline = () => {
      // The socket may not notice for a while: check it now, and at `online` again.
      if (this._state === "connected") this.checkAlive(3000);
    };
    const visible = () => {
      if (typeof document !== "undefined" && document.visibilityState === "visible") {
        if (this._state === "connected") this.checkAlive(5000);
        else if (!this._transport && !this.stopped) online();
      }
    };
    window.addEventListener("online", online);
    window.addEventListener("offline", offline);
    this.browserCleanup.push(() => window.removeEventListener("online", online));
    this.browserCleanup.push(() => window.removeEventListener("offline", offline));
    if (typeof document !== "undefined" && typeof document.addEventListener === "function") {
      document.addEventListener("visibilitychange", visible);
      this.browserCleanup.push(() => document.removeEventListener("visibilitychange", visible));
    }
  }

  /** Pings; a connection that does not answer in time is dropped (and reconnected). */
  private checkAlive(timeoutMs: number): void {
    const t = this._transport;
    this.ping(timeoutMs).catch((err: unknown) => {
      if (err instanceof RoomcastError && err.code === "timeout" && this._transport === t && t) {
        t.close(CLIENT_DROP, "ping timeout");
      }
    });
  }
}

function performanceNow(): number {
  return typeof performance !== "undefined" ? performance.now() : Date.now();
}

/** Creates a client and starts connecting. */
export function connect(opts: ConnectOptions): RoomcastClient {
  return new RoomcastClient(opts);
}
