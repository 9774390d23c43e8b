/**
 * The fallback transport of contract §1.5: server frames come as Server-Sent Events from
 * `GET /sse?token=`, commands go as `POST /sse/send` (to any gateway: the session id routes
 * them). Browsers read the stream with `EventSource`; Node 20 has none, so there the stream is
 * read with `fetch` and parsed here.
 */
import type { ClientFrame, ServerFrame } from "./protocol.js";
import { withToken, type Transport, type TransportClose, type TransportFactory, type TransportHandlers, type TransportOptions } from "./transport.js";

/** One dispatched event of a `text/event-stream`. */
export interface StreamEvent {
  /** The `event:` field, `message` when absent. */
  event: string;
  data: string;
}

/**
 * An incremental `text/event-stream` parser (the WHATWG HTML "event stream interpretation"):
 * lines end with CRLF, LF or CR (a CR at the end of a chunk may be the first half of a CRLF),
 * `data:` lines of one event are joined with newlines, a blank line dispatches, lines starting
 * with `:` are comments.
 */
export class EventStreamParser {
  private buffer = "";
  private data: string[] = [];
  private event = "";
  private started = false;
  /** The previous chunk ended with CR: a LF at the start of this one belongs to it. */
  private pendingCR = false;

  constructor(
    private readonly onEvent: (e: StreamEvent) => void,
    private readonly onComment: (text: string) => void = () => {},
  ) {}

  /** Feeds decoded text; complete events are dispatched before it returns. */
  push(chunk: string): void {
    if (chunk.length === 0) return;
    if (!this.started) {
      this.started = true;
      if (chunk.charCodeAt(0) === 0xfeff) chunk = chunk.slice(1);
    }
    if (this.pendingCR && chunk.startsWith("\n")) chunk = chunk.slice(1);
    this.pendingCR = false;
    let text = this.buffer + chunk;
    let start = 0;
    for (let i = 0; i < text.length; i++) {
      const c = text.charCodeAt(i);
      if (c !== 10 && c !== 13) continue;
      this.line(text.slice(start, i));
      if (c === 13) {
        if (i + 1 === text.length) this.pendingCR = true;
        else if (text.charCodeAt(i + 1) === 10) i++;
      }
      start = i + 1;
    }
    text = text.slice(start);
    this.buffer = text;
  }

  private line(line: string): void {
    if (line === "") {
      if (this.data.length > 0) this.onEvent({ event: this.event || "message", data: this.data.join("\n") });
      this.data = [];
      this.event = "";
      return;
    }
    if (line.startsWith(":")) {
      this.onComment(line.slice(1).trimStart());
      return;
    }
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "data") this.data.push(value);
    else if (field === "event") this.event = value;
    // `id` and `retry` steer EventSource's own reconnects, which this client does not use:
    // a new stream is a new session, and the client re-joins with `since` itself.
  }
}

/** The subset of the WHATWG EventSource the transport uses. */
export interface EventSourceLike {
  onopen: ((ev: unknown) => void) | null;
  onmessage: ((ev: { data: string }) => void) | null;
  onerror: ((ev: unknown) => void) | null;
  close(): void;
}

export type EventSourceConstructor = new (url: string) => EventSourceLike;

export type FetchFunction = typeof fetch;

export interface SseTransportConfig {
  /** The `POST /sse/send` URL; default: the stream URL's path + `/send`. */
  sendUrl?: string;
  /** Default: the global `fetch`. */
  fetch?: FetchFunction;
  /**
   * The EventSource class; default: the global one where it exists (browsers), else the stream
   * is read with `fetch`. `null` always reads it with `fetch`.
   */
  EventSource?: EventSourceConstructor | null;
  /**
   * Largest POST body in bytes, several frames batched (default 32768). A single larger frame
   * still goes alone; a batch the gateway refuses as too large (413) is split and sent again.
   */
  maxBatchBytes?: number;
}

/** The default `/sse/send` URL of a stream URL: same origin, path + `/send`, no query. */
export function sseSendUrl(streamUrl: string): string {
  const u = new URL(streamUrl);
  u.pathname = u.pathname.replace(/\/$/, "") + "/send";
  u.search = "";
  return u.toString();
}

/** The silence after which a fetch-read stream counts as dead when `connected` gave none. */
const DEFAULT_STREAM_TIMEOUT_MS = 30_000;

/**
 * The SSE + POST transport. `session` is the stream's session once `connected` arrived.
 *
 * Commands queued in one tick go in one POST, and at most one POST is in flight, so the
 * session's gateway runs them in the order they were sent. Any POST that fails closes the
 * transport (the client reconnects, re-joins with `since` and sends again what was unanswered,
 * publishes under the same idempotency key), as a WebSocket that failed to write would.
 */
export class SseTransport implements Transport {
  readonly name = "sse";
  session: string | undefined;
  private closed = false;
  private token: string;
  private readonly sendUrl: string;
  private readonly fetchFn: FetchFunction;
  private readonly maxBatchBytes: number;
  private readonly abort = new AbortController();
  private source: EventSourceLike | undefined;
  private queue: Array<{ frame: ClientFrame; json: string }> = [];
  private posting = false;
  private flushQueued = false;
  /** After a 413, the number of frames the next POSTs may carry (halved each time). */
  private batchLimit = Infinity;
  private watchdog: ReturnType<typeof setTimeout> | undefined;
  private silenceMs = DEFAULT_STREAM_TIMEOUT_MS;

  constructor(
    opts: TransportOptions,
    private readonly handlers: TransportHandlers,
    config: SseTransportConfig = {},
  ) {
    this.token = opts.token;
    this.sendUrl = config.sendUrl ?? sseSendUrl(opts.url);
    const f = config.fetch ?? (globalThis as { fetch?: FetchFunction }).fetch;
    this.fetchFn = f ? f.bind(globalThis) : () => Promise.reject(new Error("no fetch in this runtime"));
    this.maxBatchBytes = config.maxBatchBytes ?? 32_768;
    const ES =
      config.EventSource === null
        ? undefined
        : (config.EventSource ?? (globalThis as { EventSource?: EventSourceConstructor }).EventSource);
    const url = withToken(opts.url, opts.token);
    // Started after the constructor returns, as a WebSocket's events are: the client records
    // the transport before any handler runs.
    queueMicrotask(() => {
      if (this.closed) return;
      if (typeof ES === "function") this.openEventSource(ES, url);
      else void this.readStream(url);
    });
  }

  send(frame: ClientFrame): void {
    if (this.closed || this.session === undefined) throw new Error("transport not open");
    this.queue.push({ frame, json: JSON.stringify(frame) });
    if (!this.posting && !this.flushQueued) {
      this.flushQueued = true;
      queueMicrotask(() => {
        this.flushQueued = false;
        void this.flush();
      });
    }
  }

  close(code = 1000, reason = ""): void {
    this.finish({ code, reason });
  }

  /** Later POSTs carry this token (after the client's `refresh`). */
  updateToken(token: string): void {
    this.token = token;
  }

  // ---- the stream ----

  private openEventSource(ES: EventSourceConstructor, url: string): void {
    let source: EventSourceLike;
    try {
      source = new ES(url);
    } catch (err) {
      this.finish({ code: 1006, reason: String(err) });
      return;
    }
    this.source = source;
    source.onmessage = (ev) => this.onData(ev.data);
    // EventSource would reconnect by itself, opening a new session the client knows nothing
    // about, and it hides the HTTP status: any error ends this transport.
    source.onerror = () => {
      this.finish({ code: 1006, reason: this.session ? "stream lost" : "stream could not be opened" });
    };
  }

  private async readStream(url: string): Promise<void> {
    let res: Response;
    try {
      res = await this.fetchFn(url, {
        headers: { Accept: "text/event-stream" },
        cache: "no-store",
        signal: this.abort.signal,
      });
    } catch (err) {
      this.finish({ code: 1006, reason: `stream request failed: ${String(err)}` });
      return;
    }
    if (this.closed) return;
    if (res.status !== 200 || !res.body) {
      const text = await res.text().catch(() => "");
      this.finish({ code: 1006, reason: text.trim() || `HTTP ${res.status}`, httpStatus: res.status });
      return;
    }
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    // Comments (`: ping`) only keep the watchdog quiet, which any bytes do.
    const parser = new EventStreamParser((e) => {
      if (e.event === "message") this.onData(e.data);
    });
    this.armWatchdog();
    try {
      for (;;) {
        const { done, value } = await reader.read();
        if (this.closed) return;
        if (done) break;
        this.armWatchdog();
        parser.push(decoder.decode(value, { stream: true }));
        if (this.closed) return;
      }
      this.finish({ code: 1006, reason: "stream ended" });
    } catch (err) {
      this.finish({ code: 1006, reason: `stream failed: ${String(err)}` });
    } finally {
      reader.cancel().catch(() => {});
    }
  }

  /** The server writes `: ping` every heartbeat interval: silence past the timeout is a dead link. */
  private armWatchdog(): void {
    if (this.watchdog) clearTimeout(this.watchdog);
    this.watchdog = setTimeout(() => this.finish({ code: 1006, reason: "stream silent" }), this.silenceMs);
  }

  private onData(data: string): void {
    if (this.closed) return;
    let frame: ServerFrame;
    try {
      frame = JSON.parse(data) as ServerFrame;
    } catch {
      return;
    }
    if (typeof frame !== "object" || frame === null) return;
    if (frame.type === "disconnect") {
      // The stream's equivalent of a close frame.
      this.finish({ code: frame.code, reason: frame.reason ?? "" });
      return;
    }
    if (frame.type === "connected" && this.session === undefined) {
      if (typeof frame.session !== "string" || frame.session === "") {
        this.finish({ code: 1002, reason: "connected event without a session" });
        return;
      }
      this.session = frame.session;
      if (frame.heartbeat?.timeoutMs) this.silenceMs = frame.heartbeat.timeoutMs;
      if (this.watchdog) this.armWatchdog();
      this.handlers.onOpen();
    }
    this.handlers.onFrame(frame);
  }

  // ---- commands ----

  private async flush(): Promise<void> {
    if (this.posting || this.closed || this.queue.length === 0) return;
    this.posting = true;
    const batch = this.takeBatch();
    const body = batch.length === 1 ? batch[0]!.json : `[${batch.map((b) => b.json).join(",")}]`;
    let status: number;
    let text = "";
    try {
      const res = await this.fetchFn(this.sendUrl, {
        method: "POST",
        headers: {
          Authorization: `Bearer ${this.token}`,
          "X-Roomcast-Session": this.session!,
          "Content-Type": "application/json",
        },
        body,
        cache: "no-store",
        signal: this.abort.signal,
      });
      status = res.status;
      if (status >= 300) text = (await res.text().catch(() => "")).trim();
      else res.body?.cancel().catch(() => {});
    } catch (err) {
      this.posting = false;
      this.finish({ code: 1006, reason: `send failed: ${String(err)}` });
      return;
    }
    this.posting = false;
    if (this.closed) return;
    if (status >= 200 && status < 300) {
      void this.flush();
      return;
    }
    if (status === 413 && batch.length > 1) {
      // Over the gateway's MAX_FRAME_BYTES together: send them again in smaller batches.
      this.batchLimit = Math.ceil(batch.length / 2);
      this.queue.unshift(...batch);
      void this.flush();
      return;
    }
    this.finish(postFailure(status, text));
  }

  private takeBatch(): Array<{ frame: ClientFrame; json: string }> {
    let bytes = 0;
    let n = 0;
    while (n < this.queue.length && n < this.batchLimit) {
      const size = this.queue[n]!.json.length + 1;
      if (n > 0 && bytes + size > this.maxBatchBytes) break;
      bytes += size;
      n++;
    }
    return this.queue.splice(0, n);
  }

  private finish(close: TransportClose): void {
    if (this.closed) return;
    this.closed = true;
    if (this.watchdog) clearTimeout(this.watchdog);
    this.queue = [];
    this.abort.abort();
    if (this.source) {
      this.source.onmessage = null;
      this.source.onerror = null;
      this.source.close();
    }
    this.handlers.onClose(close);
  }
}

/**
 * The close a refused POST stands for, so the client decides as after a WebSocket close
 * (`reconnectPolicy`): 404 is a session that ended or whose gateway died (reconnect), 401 a
 * token no longer valid (new token), 413 a frame over the limit (1009, as the WebSocket), 429
 * and 503 "later".
 */
function postFailure(status: number, text: string): TransportClose {
  const reason = `POST /sse/send: HTTP ${status}${text ? ` ${text}` : ""}`;
  switch (status) {
    case 404:
      return { code: 1006, reason };
    case 401:
      return { code: 4001, reason };
    case 403:
      return { code: 1008, reason };
    case 413:
      return { code: 1009, reason };
    case 400:
      return { code: 1002, reason };
    case 429:
      return { code: 1013, reason };
  }
  return { code: 1006, reason };
}

export function sseTransport(config: SseTransportConfig = {}): TransportFactory {
  return (opts, handlers) => new SseTransport(opts, handlers, config);
}
