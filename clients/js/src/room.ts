import { Emitter } from "./emitter.js";
import { RoomcastError } from "./errors.js";
import type {
  HistoryFrame,
  JoinedFrame,
  Json,
  Member,
  MemberFrame,
  MessageFrame,
  PresenceFrame,
  PublishedFrame,
  ServerFrame,
  Since,
  ClientFrame,
} from "./protocol.js";

/** What a room's `joined` event carries (after the first join and after every re-join). */
export interface JoinInfo {
  room: string;
  epoch: string;
  /** The room's latest offset when the join was answered. */
  offset: number;
  /** True after an automatic re-join following a reconnect. */
  rejoin: boolean;
  /** Present when the join carried `since`: whether the missed messages were recovered. */
  recovered?: boolean;
  /** How many missed messages the join delivered (as `message` events, before this event). */
  missed: number;
}

/** A room's `recovery` event: emitted after each join with `since`. */
export interface RecoveryInfo {
  room: string;
  /** False: the history no longer covers the gap (or the epoch changed): reload state. */
  recovered: boolean;
  missed: number;
}

export interface RoomEvents {
  message: MessageFrame;
  member_joined: MemberFrame;
  member_left: MemberFrame;
  joined: JoinInfo;
  recovery: RecoveryInfo;
  /** Left the room: by `leave()`, or a backend unsubscribed this connection. */
  left: { room: string; byServer: boolean };
  /** A re-join after a reconnect was refused (e.g. `forbidden` with a new token). */
  error: RoomcastError;
}

export interface PublishOptions {
  /**
   * The idempotency key (1-64 bytes). Default: a random key generated per call, reused on every
   * automatic retry of this publish. Pass your own to retry a publish yourself after a timeout.
   */
  idempotencyKey?: string;
}

export interface HistoryOptions {
  since?: number;
  limit?: number;
}

/** What a room needs from its client (internal). */
export interface RoomHost {
  readonly connected: boolean;
  readonly isClosed: boolean;
  commandTimeoutMs: number;
  /** Sends a frame with a fresh `id`; `onReply` gets the reply or the error frame. */
  sendCommand(
    frame: ClientFrame,
    onReply: (frame: ServerFrame) => void,
    onLost: () => void,
  ): number | undefined;
  forget(id: number): void;
  retryDelay(attempt: number): number;
  /** Whether `clientId` is one of this client's connections (current or earlier). */
  isOwn(clientId: string): boolean;
}

interface OutboxEntry {
  frame: () => ClientFrame;
  resolve: (frame: ServerFrame) => void;
  reject: (err: RoomcastError) => void;
  timer: ReturnType<typeof setTimeout> | undefined;
  /** The id it was sent with on the current connection. */
  sentId: number | undefined;
}

function randomKey(): string {
  const c = (globalThis as { crypto?: { randomUUID?: () => string } }).crypto;
  if (c?.randomUUID) return c.randomUUID();
  return `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}-${Math.random().toString(36).slice(2)}`;
}

/**
 * A room. Obtained from `client.room(name)` (one object per name). `join()` makes the client
 * keep it joined across reconnects (re-joining with `since`, so messages are neither lost nor
 * repeated) until `leave()`.
 */
export class Room extends Emitter<RoomEvents> {
  /** The app asked to be in the room (join called, leave not). */
  private wanted = false;
  /** Joined on the current connection. */
  private active = false;
  private joining = false;
  private joinAttempts = 0;
  private epoch: string | undefined;
  private offset: number | undefined;
  private joinWaiters: Array<{ resolve: (i: JoinInfo) => void; reject: (e: RoomcastError) => void }> =
    [];
  private outbox: OutboxEntry[] = [];
  private everJoined = false;
  private lastJoin: JoinInfo | undefined;

  constructor(
    readonly name: string,
    private readonly host: RoomHost,
  ) {
    super();
  }

  /** Joined on the current connection. */
  get joined(): boolean {
    return this.active;
  }

  /** The last message seen (what a re-join sends as `since`), if any. */
  get lastSeen(): Since | undefined {
    return this.epoch !== undefined && this.offset !== undefined
      ? { epoch: this.epoch, offset: this.offset }
      : undefined;
  }

  /**
   * Joins the room, and keeps it joined across reconnects until `leave()`. `since` (e.g. saved
   * from an earlier session's `lastSeen`) recovers the messages after it. Resolves when joined
   * (waiting for the connection if needed); rejects with `forbidden` and the like.
   */
  join(opts: { since?: Since } = {}): Promise<JoinInfo> {
    if (this.host.isClosed) return Promise.reject(new RoomcastError("closed", "client closed"));
    if (opts.since) {
      this.epoch = opts.since.epoch;
      this.offset = opts.since.offset;
    }
    if (this.wanted && this.active && this.lastJoin) return Promise.resolve(this.lastJoin);
    this.wanted = true;
    const p = new Promise<JoinInfo>((resolve, reject) => {
      // The promise times out; the room stays wanted and is joined when the server answers
      // (a `joined` event follows), until `leave()`.
      const waiter = {
        resolve: (info: JoinInfo) => {
          clearTimeout(timer);
          resolve(info);
        },
        reject: (err: RoomcastError) => {
          clearTimeout(timer);
          reject(err);
        },
      };
      const timer = setTimeout(() => {
        const i = this.joinWaiters.indexOf(waiter);
        if (i >= 0) this.joinWaiters.splice(i, 1);
        reject(new RoomcastError("timeout", `join ${this.name} timed out (still trying)`));
      }, this.host.commandTimeoutMs);
      this.joinWaiters.push(waiter);
    });
    this.sendJoin();
    return p;
  }

  /** Leaves the room; pending publishes not yet sent are rejected with `not_joined`. */
  async leave(): Promise<void> {
    const wasActive = this.active;
    this.wanted = false;
    this.active = false;
    this.lastJoin = undefined;
    this.rejectJoinWaiters(new RoomcastError("not_joined", "left the room"));
    for (const e of this.outbox.splice(0)) {
      if (e.timer) clearTimeout(e.timer);
      if (e.sentId !== undefined) this.host.forget(e.sentId);
      e.reject(new RoomcastError("not_joined", "left the room"));
    }
    if (wasActive && this.host.connected) {
      await new Promise<void>((resolve, reject) => {
        const timer = setTimeout(
          () => reject(new RoomcastError("timeout", "leave timed out")),
          this.host.commandTimeoutMs,
        );
        const id = this.host.sendCommand(
          { type: "leave", room: this.name },
          (reply) => {
            clearTimeout(timer);
            if (reply.type === "error") reject(new RoomcastError(reply.code, reply.message, reply.id));
            else resolve();
          },
          () => {
            clearTimeout(timer);
            resolve(); // the connection ended: not in the room any more either way
          },
        );
        if (id === undefined) {
          clearTimeout(timer);
          resolve();
        }
      });
    }
    this.emit("left", { room: this.name, byServer: false });
  }

  /**
   * Publishes `data` (any JSON value) to the room. Resolves with the message's offset. Waits
   * for the room to be joined; a publish whose reply was lost in a reconnect is sent again
   * with the same idempotency key, so it is stored once.
   */
  publish(data: Json | unknown, opts: PublishOptions = {}): Promise<{ offset: number }> {
    if (!this.wanted) {
      return Promise.reject(new RoomcastError("not_joined", `join ${this.name} before publishing`));
    }
    const idempotencyKey = opts.idempotencyKey ?? randomKey();
    return this.enqueue(
      () => ({ type: "publish", room: this.name, data, idempotencyKey }),
      (f) => ({ offset: (f as PublishedFrame).offset }),
    );
  }

  /** The room's members. */
  presence(): Promise<Member[]> {
    if (!this.wanted) {
      return Promise.reject(new RoomcastError("not_joined", `join ${this.name} first`));
    }
    return this.enqueue(
      () => ({ type: "presence", room: this.name }),
      (f) => (f as PresenceFrame).members,
    );
  }

  /** Messages the room's history still holds (after `since`, at most `limit`). */
  history(opts: HistoryOptions = {}): Promise<HistoryFrame> {
    if (!this.wanted) {
      return Promise.reject(new RoomcastError("not_joined", `join ${this.name} first`));
    }
    return this.enqueue(
      () => ({ type: "history", room: this.name, ...opts }),
      (f) => f as HistoryFrame,
    );
  }

  // ---- internal, called by the client ----

  /** @internal The connection is up: re-join if wanted. */
  _connected(): void {
    this.active = false;
    this.joining = false;
    this.joinAttempts = 0;
    if (this.wanted) this.sendJoin();
  }

  /** @internal The connection ended: whatever was in flight goes again on the next one. */
  _disconnected(): void {
    this.active = false;
    this.joining = false;
    for (const e of this.outbox) e.sentId = undefined;
  }

  /** @internal The client was closed. */
  _closed(): void {
    this._disconnected();
    this.wanted = false;
    const err = new RoomcastError("closed", "client closed");
    this.rejectJoinWaiters(err);
    for (const e of this.outbox.splice(0)) {
      if (e.timer) clearTimeout(e.timer);
      e.reject(err);
    }
  }

  /** @internal A frame for this room that is not a reply. */
  _frame(frame: ServerFrame): void {
    switch (frame.type) {
      case "message":
        this.deliver(frame);
        break;
      case "member_joined":
      case "member_left":
        this.emit(frame.type, frame);
        break;
      case "joined":
        // A backend subscribed this connection (server API `Subscribe`). The subscription
        // belongs to the connection, so a new connection would lose it: keep the room wanted
        // like one the app joined, re-joined with `since` after a reconnect, until `leave()`
        // or a server-side unsubscribe.
        this.wanted = true;
        this.onJoined(frame, false);
        break;
      case "left":
        // A backend unsubscribed this connection.
        this.active = false;
        this.wanted = false;
        this.emit("left", { room: this.name, byServer: true });
        break;
    }
  }

  /** Emits `m` unless it was seen already or is our own; true when emitted. */
  private deliver(m: MessageFrame): boolean {
    if (m.epoch === this.epoch && this.offset !== undefined && m.offset <= this.offset) return false;
    this.epoch = m.epoch;
    this.offset = m.offset;
    // The server never sends a connection its own messages, but a re-join's `missed` holds
    // what an earlier connection of this client published: the app had those as replies.
    if (this.host.isOwn(m.clientId)) return false;
    this.emit("message", m);
    return true;
  }

  private sendJoin(): void {
    if (!this.host.connected || this.joining || this.active) return;
    const since = this.lastSeen;
    this.joining = true;
    const id = this.host.sendCommand(
      since ? { type: "join", room: this.name, since } : { type: "join", room: this.name },
      (reply) => {
        this.joining = false;
        if (reply.type === "joined") {
          if (!this.wanted) {
            // left (or the client closed) while the join was on its way: undo it on the server
            this.host.sendCommand({ type: "leave", room: this.name }, () => {}, () => {});
            return;
          }
          this.onJoined(reply, since !== undefined);
          return;
        }
        if (reply.type !== "error") return;
        if (reply.code === "rate_limited" || reply.code === "unavailable" || reply.code === "internal") {
          // Try again on this connection after a backoff.
          const delay = this.host.retryDelay(this.joinAttempts++);
          setTimeout(() => this.sendJoin(), Math.max(100, delay));
          return;
        }
        if (reply.code === "bad_request" && /already joined/.test(reply.message)) {
          this.active = true;
          this.flush();
          return;
        }
        const err = new RoomcastError(reply.code, reply.message, reply.id);
        this.wanted = false;
        const hadWaiters = this.joinWaiters.length > 0;
        this.rejectJoinWaiters(err);
        for (const e of this.outbox.splice(0)) {
          if (e.timer) clearTimeout(e.timer);
          e.reject(err);
        }
        if (!hadWaiters) this.emit("error", err);
      },
      () => {
        this.joining = false; // sent again on the next connection
      },
    );
    if (id === undefined) this.joining = false;
  }

  private onJoined(frame: JoinedFrame, withSince: boolean): void {
    const rejoin = this.everJoined;
    let missed = 0;
    for (const m of frame.missed ?? []) {
      if (this.deliver(m)) missed++;
    }
    if (withSince && frame.recovered === true && this.epoch === frame.epoch) {
      // The missed messages came above; go on from the room's latest offset.
      this.offset = Math.max(this.offset ?? 0, frame.offset);
    } else {
      // A first join, or the gap could not be filled: go on from the room's current position.
      this.epoch = frame.epoch;
      this.offset = frame.offset;
    }
    this.active = true;
    this.everJoined = true;
    this.joinAttempts = 0;
    const info: JoinInfo = { room: this.name, epoch: frame.epoch, offset: frame.offset, rejoin, missed };
    if (frame.recovered !== undefined) info.recovered = frame.recovered;
    this.lastJoin = info;
    if (withSince) {
      this.emit("recovery", { room: this.name, recovered: frame.recovered !== false, missed });
    }
    this.emit("joined", info);
    const waiters = this.joinWaiters.splice(0);
    for (const w of waiters) w.resolve(info);
    this.flush();
  }

  private rejectJoinWaiters(err: RoomcastError): void {
    for (const w of this.joinWaiters.splice(0)) w.reject(err);
  }

  private enqueue<T>(frame: () => ClientFrame, map: (f: ServerFrame) => T): Promise<T> {
    if (this.host.isClosed) return Promise.reject(new RoomcastError("closed", "client closed"));
    return new Promise<T>((resolve, reject) => {
      const entry: OutboxEntry = {
        frame,
        resolve: (f) => resolve(map(f)),
        reject,
        timer: undefined,
        sentId: undefined,
      };
      entry.timer = setTimeout(() => {
        this.remove(entry);
        if (entry.sentId !== undefined) this.host.forget(entry.sentId);
        reject(new RoomcastError("timeout", `${frame().type} timed out`));
      }, this.host.commandTimeoutMs);
      this.outbox.push(entry);
      this.flush();
    });
  }

  private remove(entry: OutboxEntry): void {
    const i = this.outbox.indexOf(entry);
    if (i >= 0) this.outbox.splice(i, 1);
  }

  private flush(): void {
    if (!this.active || !this.host.connected) return;
    for (const entry of this.outbox) {
      if (entry.sentId !== undefined) continue;
      const id = this.host.sendCommand(
        entry.frame(),
        (reply) => {
          if (entry.timer) clearTimeout(entry.timer);
          this.remove(entry);
          if (reply.type === "error") entry.reject(new RoomcastError(reply.code, reply.message, reply.id));
          else entry.resolve(reply);
        },
        () => {
          entry.sentId = undefined; // sent again after the re-join
        },
      );
      if (id === undefined) return;
      entry.sentId = id;
    }
  }
}
