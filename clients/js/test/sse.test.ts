// The SSE + POST transport, the transport fallback and upgrade policy, and server-subscribed
// rooms, with a scripted fetch and scripted transports (no server).
import { afterEach, describe, expect, it, vi } from "vitest";
import {
  connect,
  EventStreamParser,
  SseTransport,
  sseSendUrl,
  sseUrlFor,
  type ClientFrame,
  type ConnectedInfo,
  type FetchFunction,
  type ServerFrame,
  type StreamEvent,
  type TransportClose,
  type TransportFactory,
  type TransportHandlers,
} from "../src/index.js";
import { mintToken } from "./server.js";

const token = mintToken("s", { sub: "u" });
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function until(cond: () => boolean, ms = 2000, what = "condition"): Promise<void> {
  const deadline = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(2);
  }
}

describe("EventStreamParser", () => {
  const stream = [
    ": ping\n",
    "data: {\"a\":1}\n\n",
    "event: custom\ndata: x\n\n",
    "data: line one\r\ndata: line two\r\n\r\n",
    "data:no-space\rdata:  two spaces\r\r",
    "id: 7\nretry: 100\ndata\n\n",
    "data: only-after-blank\n",
    "\n",
  ].join("");
  const expected: StreamEvent[] = [
    { event: "message", data: '{"a":1}' },
    { event: "custom", data: "x" },
    { event: "message", data: "line one\nline two" },
    { event: "message", data: "no-space\n two spaces" },
    { event: "message", data: "" },
    { event: "message", data: "only-after-blank" },
  ];

  function parse(chunks: string[]): { events: StreamEvent[]; comments: string[] } {
    const events: StreamEvent[] = [];
    const comments: string[] = [];
    const p = new EventStreamParser(
      (e) => events.push(e),
      (c) => comments.push(c),
    );
    for (const c of chunks) p.push(c);
    return { events, comments };
  }

  it("parses events, comments, multi-line data and every line ending", () => {
    expect(parse([stream])).toEqual({ events: expected, comments: ["ping"] });
  });

  it("gives the same events however the stream is split into chunks", () => {
    for (let i = 0; i <= stream.length; i++) {
      for (const j of [i, Math.min(stream.length, i + 1), Math.min(stream.length, i + 7)]) {
        const chunks = [stream.slice(0, i), stream.slice(i, j), stream.slice(j)];
        expect(parse(chunks).events, `split at ${i}/${j}`).toEqual(expected);
      }
    }
    // one character at a time: CRLF and CR CR split across chunks
    expect(parse([...stream]).events).toEqual(expected);
  });

  it("strips a leading BOM, keeps an event without its blank line pending", () => {
    expect(parse(["\uFEFFdata: a\n\n", "data: b\n"]).events).toEqual([{ event: "message", data: "a" }]);
  });
});

// ---- a scripted fetch: streams the test writes to, POSTs the test answers ----

interface Post {
  url: string;
  headers: Record<string, string>;
  body: unknown;
  respond(status: number, text?: string): void;
  fail(err: Error): void;
}

class FakeServer {
  streams: Array<{ url: string; write(s: string): void; end(): void; error(e: Error): void }> = [];
  posts: Post[] = [];
  streamStatus = 200;
  private encoder = new TextEncoder();

  fetch: FetchFunction = async (input, init) => {
    const url = String(input);
    const headers = Object.fromEntries(new Headers(init?.headers).entries());
    const signal = init?.signal ?? undefined;
    if ((init?.method ?? "GET") === "GET") {
      if (this.streamStatus !== 200) return new Response("refused", { status: this.streamStatus });
      let ctl!: ReadableStreamDefaultController<Uint8Array>;
      const body = new ReadableStream<Uint8Array>({ start: (c) => void (ctl = c) });
      let open = true;
      signal?.addEventListener("abort", () => {
        if (open) ctl.error(new DOMException("aborted", "AbortError"));
        open = false;
      });
      this.streams.push({
        url,
        write: (s) => open && ctl.enqueue(this.encoder.encode(s)),
        end: () => {
          if (open) ctl.close();
          open = false;
        },
        error: (e) => {
          if (open) ctl.error(e);
          open = false;
        },
      });
      return new Response(body, { status: 200, headers: { "Content-Type": "text/event-stream" } });
    }
    return new Promise<Response>((resolve, reject) => {
      this.posts.push({
        url,
        headers,
        body: JSON.parse(String(init?.body)),
        respond: (status, text = "") => resolve(new Response(status === 202 ? null : text, { status })),
        fail: reject,
      });
    });
  };

  /** Writes a frame as one event, in two chunks split in the middle. */
  event(frame: object, stream = this.streams.at(-1)!): void {
    const text = `data: ${JSON.stringify(frame)}\n\n`;
    const cut = Math.floor(text.length / 2);
    stream.write(text.slice(0, cut));
    stream.write(text.slice(cut));
  }
}

/** Bytes written split inside a multi-byte character, to check the transport's decoding. */
function rawStreamFetch(chunks: Uint8Array[]): FetchFunction {
  return async () =>
    new Response(
      new ReadableStream<Uint8Array>({
        start(c) {
          for (const ch of chunks) c.enqueue(ch);
        },
      }),
      { status: 200 },
    );
}

function recorder() {
  const frames: ServerFrame[] = [];
  const closes: TransportClose[] = [];
  let opened = 0;
  const handlers: TransportHandlers = {
    onOpen: () => void opened++,
    onFrame: (f) => void frames.push(f),
    onClose: (c) => void closes.push(c),
  };
  return { frames, closes, handlers, opened: () => opened };
}

const connectedFrame = (session = "s1") => ({
  type: "connected",
  clientId: "c1",
  user: "u",
  gateway: "g1",
  session,
  heartbeat: { intervalMs: 10_000, timeoutMs: 30_000 },
});

describe("SseTransport", () => {
  it("derives its URLs from the WebSocket URL", () => {
    expect(sseUrlFor("ws://h:8080/ws")).toBe("http://h:8080/sse");
    expect(sseUrlFor("wss://h/rt/ws?token=x&a=1")).toBe("https://h/rt/sse?a=1");
    expect(sseUrlFor("https://h/base/")).toBe("https://h/base/sse");
    expect(sseSendUrl("http://h:8080/sse?token=t")).toBe("http://h:8080/sse/send");
  });

  it("reads frames from the stream; the session comes from `connected`", async () => {
    const srv = new FakeServer();
    const r = recorder();
    const t = new SseTransport({ url: "http://gw/sse", token }, r.handlers, { fetch: srv.fetch, EventSource: null });
    await until(() => srv.streams.length === 1);
    expect(new URL(srv.streams[0]!.url).searchParams.get("token")).toBe(token);
    expect(() => t.send({ type: "ping" })).toThrow(/not open/);
    srv.streams[0]!.write(": ping\n\n");
    srv.event(connectedFrame("sess-1"));
    srv.event({ type: "message", room: "r", offset: 1, epoch: "e", user: "v", clientId: "x", data: { t: "héllo ✓" } });
    await until(() => r.frames.length === 2);
    expect(r.opened()).toBe(1);
    expect(t.session).toBe("sess-1");
    expect(r.frames[1]).toMatchObject({ type: "message", data: { t: "héllo ✓" } });
    t.close();
    expect(r.closes).toEqual([{ code: 1000, reason: "" }]);
  });

  it("decodes UTF-8 split across chunks", async () => {
    const bytes = new TextEncoder().encode(
      `data: ${JSON.stringify(connectedFrame())}\n\ndata: {"type":"pong","id":1,"x":"日本"}\n\n`,
    );
    const i = bytes.length - 9; // inside 本's three bytes
    const r = recorder();
    new SseTransport({ url: "http://gw/sse", token }, r.handlers, {
      fetch: rawStreamFetch([bytes.slice(0, i), bytes.slice(i)]),
      EventSource: null,
    });
    await until(() => r.frames.length === 2);
    expect(r.frames[1]).toEqual({ type: "pong", id: 1, x: "日本" });
  });

  it("batches frames sent in one tick into one POST, one POST in flight, in order", async () => {
    const srv = new FakeServer();
    const r = recorder();
    const t = new SseTransport({ url: "http://gw/sse", token }, r.handlers, {
      fetch: srv.fetch,
      EventSource: null,
      sendUrl: "http://other-gw/sse/send",
    });
    await until(() => srv.streams.length === 1);
    srv.event(connectedFrame("sess-9"));
    await until(() => r.opened() === 1);
    const f = (n: number): ClientFrame => ({ type: "publish", id: n, room: "r", data: n });
    t.send(f(1));
    t.send(f(2));
    t.send(f(3));
    await until(() => srv.posts.length === 1);
    const first = srv.posts[0]!;
    expect(first.url).toBe("http://other-gw/sse/send");
    expect(first.headers["x-roomcast-session"]).toBe("sess-9");
    expect(first.headers["authorization"]).toBe(`Bearer ${token}`);
    expect(first.headers["content-type"]).toBe("application/json");
    expect(first.body).toEqual([f(1), f(2), f(3)]);
    // while it is in flight, later frames wait
    t.send(f(4));
    await sleep(5);
    t.send(f(5));
    await sleep(5);
    expect(srv.posts).toHaveLength(1);
    first.respond(202);
    await until(() => srv.posts.length === 2);
    expect(srv.posts[1]!.body).toEqual([f(4), f(5)]);
    // a token refreshed on the connection goes with later POSTs
    t.updateToken("new-token");
    srv.posts[1]!.respond(202);
    t.send(f(6));
    await until(() => srv.posts.length === 3);
    expect(srv.posts[2]!.body).toEqual(f(6)); // a lone frame goes as an object
    expect(srv.posts[2]!.headers["authorization"]).toBe("Bearer new-token");
    srv.posts[2]!.respond(202);
    expect(r.closes).toEqual([]);
    t.close();
  });

  it("splits a batch the gateway refuses as too large; a single frame too large is a 1009 close", async () => {
    const srv = new FakeServer();
    const r = recorder();
    const t = new SseTransport({ url: "http://gw/sse", token }, r.handlers, { fetch: srv.fetch, EventSource: null });
    await until(() => srv.streams.length === 1);
    srv.event(connectedFrame());
    await until(() => r.opened() === 1);
    for (let i = 1; i <= 4; i++) t.send({ type: "publish", room: "r", data: i });
    await until(() => srv.posts.length === 1);
    srv.posts[0]!.respond(413);
    await until(() => srv.posts.length === 2);
    expect((srv.posts[1]!.body as Array<{ data: number }>).map((x) => x.data)).toEqual([1, 2]);
    srv.posts[1]!.respond(202);
    await until(() => srv.posts.length === 3);
    expect((srv.posts[2]!.body as Array<{ data: number }>).map((x) => x.data)).toEqual([3, 4]);
    srv.posts[2]!.respond(202);
    t.send({ type: "publish", room: "r", data: "x".repeat(100) });
    await until(() => srv.posts.length === 4);
    srv.posts[3]!.respond(413, "too large");
    await until(() => r.closes.length === 1);
    expect(r.closes[0]).toMatchObject({ code: 1009 });
  });

  it("404 from /sse/send (session gone) and a failed POST close the transport so the client reconnects", async () => {
    for (const fail of [
      (p: Post) => p.respond(404, "no such session"),
      (p: Post) => p.fail(new TypeError("fetch failed")),
      (p: Post) => p.respond(502),
    ]) {
      const srv = new FakeServer();
      const r = recorder();
      const t = new SseTransport({ url: "http://gw/sse", token }, r.handlers, { fetch: srv.fetch, EventSource: null });
      await until(() => srv.streams.length === 1);
      srv.event(connectedFrame());
      await until(() => r.opened() === 1);
      t.send({ type: "ping", id: 1 });
      t.send({ type: "ping", id: 2 });
      await until(() => srv.posts.length === 1);
      t.send({ type: "ping", id: 3 }); // queued behind the failing POST: dropped with it
      fail(srv.posts[0]!);
      await until(() => r.closes.length === 1);
      expect(r.closes[0]!.code).toBe(1006);
      await sleep(5);
      expect(srv.posts).toHaveLength(1);
      expect(() => t.send({ type: "ping" })).toThrow();
    }
  });

  it("a `disconnect` event is a close with its code; a refused stream reports its HTTP status", async () => {
    const srv = new FakeServer();
    const r = recorder();
    new SseTransport({ url: "http://gw/sse", token }, r.handlers, { fetch: srv.fetch, EventSource: null });
    await until(() => srv.streams.length === 1);
    srv.event(connectedFrame());
    srv.event({ type: "disconnect", code: 4008, reason: "slow consumer" });
    await until(() => r.closes.length === 1);
    expect(r.closes[0]).toEqual({ code: 4008, reason: "slow consumer" });
    expect(r.frames.map((f) => f.type)).toEqual(["connected"]);

    const refused = new FakeServer();
    refused.streamStatus = 401;
    const r2 = recorder();
    new SseTransport({ url: "http://gw/sse", token }, r2.handlers, { fetch: refused.fetch, EventSource: null });
    await until(() => r2.closes.length === 1);
    expect(r2.closes[0]).toMatchObject({ code: 1006, httpStatus: 401, reason: "refused" });
    expect(r2.opened()).toBe(0);
  });

  it("a stream that ends or goes silent past the heartbeat timeout closes with 1006", async () => {
    const srv = new FakeServer();
    const r = recorder();
    new SseTransport({ url: "http://gw/sse", token }, r.handlers, { fetch: srv.fetch, EventSource: null });
    await until(() => srv.streams.length === 1);
    srv.event({ ...connectedFrame(), heartbeat: { intervalMs: 20, timeoutMs: 60 } });
    for (let i = 0; i < 4; i++) {
      await sleep(30);
      srv.streams[0]!.write(": ping\n"); // kept alive by comments
    }
    expect(r.closes).toEqual([]);
    await until(() => r.closes.length === 1, 1000, "the silence timeout");
    expect(r.closes[0]).toMatchObject({ code: 1006, reason: "stream silent" });

    const r2 = recorder();
    const srv2 = new FakeServer();
    new SseTransport({ url: "http://gw/sse", token }, r2.handlers, { fetch: srv2.fetch, EventSource: null });
    await until(() => srv2.streams.length === 1);
    srv2.event(connectedFrame());
    srv2.streams[0]!.end();
    await until(() => r2.closes.length === 1);
    expect(r2.closes[0]).toMatchObject({ code: 1006, reason: "stream ended" });
  });

  it("uses EventSource where there is one, and ends the transport on its first error", async () => {
    const sources: FakeEventSource[] = [];
    class FakeEventSource {
      onopen: ((ev: unknown) => void) | null = null;
      onmessage: ((ev: { data: string }) => void) | null = null;
      onerror: ((ev: unknown) => void) | null = null;
      closed = false;
      constructor(readonly url: string) {
        sources.push(this);
      }
      close() {
        this.closed = true;
      }
    }
    const r = recorder();
    new SseTransport({ url: "http://gw/sse", token }, r.handlers, { EventSource: FakeEventSource });
    await until(() => sources.length === 1);
    sources[0]!.onmessage!({ data: JSON.stringify(connectedFrame("es")) });
    expect(r.opened()).toBe(1);
    sources[0]!.onerror!({});
    expect(r.closes).toEqual([{ code: 1006, reason: "stream lost" }]);
    expect(sources[0]!.closed).toBe(true);
  });
});

describe("the client over SSE", () => {
  it("reconnects after a 404 from /sse/send and re-joins with since; a disconnect code decides like a close code", async () => {
    const srv = new FakeServer();
    const client = connect({
      url: "ws://gw/ws",
      token,
      transports: ["sse"],
      fetch: srv.fetch,
      EventSource: null,
      backoff: { initialMs: 1, maxMs: 1 },
    });
    const connected: ConnectedInfo[] = [];
    client.on("connected", (c) => connected.push(c));
    await until(() => srv.streams.length === 1);
    expect(srv.streams[0]!.url).toMatch(/^http:\/\/gw\/sse\?token=/);
    srv.event(connectedFrame("one"));
    await until(() => client.state === "connected");
    expect(client.transport).toBe("sse");
    const room = client.room("r");
    const got: number[] = [];
    room.on("message", (m) => got.push(m.offset));
    const joined = room.join();
    await until(() => srv.posts.length === 1);
    const join = srv.posts[0]!.body as { id: number; type: string; room: string };
    expect(join).toMatchObject({ type: "join", room: "r" });
    expect(srv.posts[0]!.url).toBe("http://gw/sse/send");
    srv.posts[0]!.respond(202);
    srv.event({ type: "joined", id: join.id, room: "r", epoch: "e", offset: 2 });
    await joined;
    srv.event({ type: "message", room: "r", offset: 3, epoch: "e", user: "v", clientId: "x", data: 3 });
    await until(() => got.length === 1);

    // The session's gateway died: the POST gets 404, the client reconnects and re-joins.
    const pub = room.publish("hello");
    await until(() => srv.posts.length === 2);
    const key = (srv.posts[1]!.body as { idempotencyKey: string }).idempotencyKey;
    srv.posts[1]!.respond(404);
    await until(() => srv.streams.length === 2, 2000, "a new stream");
    srv.event(connectedFrame("two"));
    await until(() => srv.posts.length === 3);
    const rejoin = srv.posts[2]!.body as { id: number };
    expect(rejoin).toMatchObject({ type: "join", room: "r", since: { epoch: "e", offset: 3 } });
    expect(srv.posts[2]!.headers["x-roomcast-session"]).toBe("two");
    srv.posts[2]!.respond(202);
    srv.event({
      type: "joined",
      id: rejoin.id,
      room: "r",
      epoch: "e",
      offset: 4,
      recovered: true,
      missed: [{ type: "message", room: "r", offset: 4, epoch: "e", user: "v", clientId: "x", data: 4 }],
    });
    // the publish goes again with its key
    await until(() => srv.posts.length === 4);
    const again = srv.posts[3]!.body as { id: number; idempotencyKey: string };
    expect(again.idempotencyKey).toBe(key);
    srv.posts[3]!.respond(202);
    srv.event({ type: "published", id: again.id, room: "r", offset: 5 });
    expect(await pub).toEqual({ offset: 5 });
    expect(got).toEqual([3, 4]);

    // 4008 (slow consumer) reconnects; 1008 (policy) stops.
    srv.event({ type: "disconnect", code: 4008, reason: "slow" });
    await until(() => srv.streams.length === 3, 2000, "a reconnect after 4008");
    srv.event(connectedFrame("three"));
    await until(() => client.state === "connected");
    const stopped = new Promise<{ code: number; willReconnect: boolean }>((r) => client.on("disconnected", r));
    srv.event({ type: "disconnect", code: 1008, reason: "policy" });
    expect(await stopped).toMatchObject({ code: 1008, willReconnect: false });
    await sleep(20);
    expect(srv.streams).toHaveLength(3);
    expect(connected.map((c) => c.transport)).toEqual(["sse", "sse", "sse"]);
  });
});

// ---- fallback and upgrade with scripted transports ----

class Scripted {
  sent: ClientFrame[] = [];
  closed: TransportClose | undefined;
  constructor(
    readonly name: string,
    readonly url: string,
    private readonly h: TransportHandlers,
  ) {}
  send(frame: ClientFrame) {
    if (this.closed) throw new Error("closed");
    this.sent.push(frame);
  }
  close(code = 1000, reason = "") {
    this.drop(code, reason);
  }
  connected(gateway = "g") {
    this.h.onOpen();
    this.h.onFrame({ type: "connected", clientId: `${this.name}-c`, user: "u", gateway });
  }
  frame(f: ServerFrame) {
    this.h.onFrame(f);
  }
  drop(code = 1006, reason = "") {
    if (this.closed) return;
    this.closed = { code, reason };
    this.h.onClose({ code, reason });
  }
  last(type: string) {
    return [...this.sent].reverse().find((f) => f.type === type) as (ClientFrame & { id: number }) | undefined;
  }
}

function scripted() {
  const all: Scripted[] = [];
  const make =
    (name: string): TransportFactory =>
    (opts, h) => {
      const t = new Scripted(name, opts.url, h);
      all.push(t);
      return t;
    };
  return { all, factories: { websocket: make("websocket"), sse: make("sse") } };
}

describe("transport fallback and upgrade", () => {
  afterEach(() => {
    vi.useRealTimers();
  });

  it("probes soon after a fallback from a transport that had worked (an outage), then every upgradeIntervalMs", async () => {
    vi.useFakeTimers();
    const { all, factories } = scripted();
    const client = connect({
      url: "ws://gw/ws",
      token,
      transportFactories: factories,
      fallbackAfter: 1,
      upgradeIntervalMs: 60_000,
      backoff: { initialMs: 1, maxMs: 1 },
    });
    await vi.advanceTimersByTimeAsync(1);
    all[0]!.connected(); // WebSocket works here
    all[0]!.drop(1006); // the gateway goes away...
    await vi.advanceTimersByTimeAsync(5);
    all[1]!.drop(1006); // ...and refuses for a moment: the client falls back
    await vi.advanceTimersByTimeAsync(5);
    expect(all.map((t) => t.name)).toEqual(["websocket", "websocket", "sse"]);
    all[2]!.connected();
    await vi.advanceTimersByTimeAsync(2900);
    expect(all).toHaveLength(3);
    await vi.advanceTimersByTimeAsync(200);
    expect(all).toHaveLength(4);
    expect(all[3]!.name).toBe("websocket");
    all[3]!.drop(1006); // still refused: the next probe waits the full interval
    await vi.advanceTimersByTimeAsync(59_000);
    expect(all).toHaveLength(4);
    await vi.advanceTimersByTimeAsync(1_100);
    expect(all).toHaveLength(5);
    all[4]!.connected();
    expect(client.transport).toBe("websocket");
    client.close();
  });

  it("falls back to SSE after `fallbackAfter` failed WebSocket attempts and stays on it across reconnects", async () => {
    const { all, factories } = scripted();
    const client = connect({
      url: "ws://gw/ws",
      token,
      transportFactories: factories,
      fallbackAfter: 3,
      upgradeIntervalMs: 0,
      backoff: { initialMs: 1, maxMs: 2 },
      autoConnect: false,
    });
    const attempts: string[] = [];
    client.on("connecting", (c) => attempts.push(c.transport));
    client.open();
    for (let i = 0; i < 3; i++) {
      await until(() => all.length === i + 1);
      all[i]!.drop(1006); // a proxy refusing the upgrade
    }
    await until(() => all.length === 4);
    expect(all.map((t) => t.name)).toEqual(["websocket", "websocket", "websocket", "sse"]);
    expect(all[3]!.url).toBe("http://gw/sse");
    all[3]!.connected();
    expect(client.connection).toMatchObject({ transport: "sse" });
    // A dropped SSE connection reconnects over SSE, not WebSocket first.
    all[3]!.drop(1006);
    await until(() => all.length === 5);
    expect(all[4]!.name).toBe("sse");
    all[4]!.connected();
    // A connection that had opened does not count as a failure: one more drop stays on SSE.
    all[4]!.drop(1006);
    await until(() => all.length === 6);
    expect(all[5]!.name).toBe("sse");
    expect(attempts).toEqual(["websocket", "websocket", "websocket", "sse", "sse", "sse"]);
    client.close();
  });

  it("`transports: ['sse']` uses SSE only; `['websocket']` never falls back", async () => {
    const a = scripted();
    const sseOnly = connect({ url: "ws://gw/ws", token, transports: ["sse"], transportFactories: a.factories, backoff: { initialMs: 1, maxMs: 1 } });
    for (let i = 0; i < 4; i++) {
      await until(() => a.all.length === i + 1);
      a.all[i]!.drop(1006);
    }
    expect(a.all.every((t) => t.name === "sse")).toBe(true);
    sseOnly.close();

    const b = scripted();
    const wsOnly = connect({ url: "ws://gw/ws", token, transports: ["websocket"], transportFactories: b.factories, backoff: { initialMs: 1, maxMs: 1 } });
    for (let i = 0; i < 4; i++) {
      await until(() => b.all.length === i + 1);
      b.all[i]!.drop(1006);
    }
    expect(b.all.every((t) => t.name === "websocket")).toBe(true);
    wsOnly.close();
  });

  it("upgrades from SSE to WebSocket once a probe opens, re-joining with since without a disconnect", async () => {
    const { all, factories } = scripted();
    const client = connect({
      url: "ws://gw/ws",
      token,
      transportFactories: factories,
      fallbackAfter: 1,
      upgradeIntervalMs: 40,
      backoff: { initialMs: 1, maxMs: 1 },
      autoConnect: false,
    });
    const states: string[] = [];
    client.on("state", (s) => states.push(s));
    const connected: string[] = [];
    client.on("connected", (c) => connected.push(c.transport));
    client.open();
    await until(() => all.length === 1);
    all[0]!.drop(1006);
    await until(() => all.length === 2);
    const sse = all[1]!;
    sse.connected();
    const room = client.room("r");
    const got: number[] = [];
    room.on("message", (m) => got.push(m.offset));
    const j = room.join();
    sse.frame({ type: "joined", id: sse.last("join")!.id, room: "r", epoch: "e", offset: 7 });
    await j;

    // The first probe fails: the client stays on SSE and tries again later.
    await until(() => all.length === 3, 1000, "the first probe");
    expect(all[2]!.name).toBe("websocket");
    all[2]!.drop(1006);
    expect(client.transport).toBe("sse");
    await until(() => all.length === 4, 1000, "the second probe");
    const ws = all[3]!;
    expect(ws.name).toBe("websocket");
    // A publish in flight on SSE when the switch happens goes again on the WebSocket.
    const pub = room.publish("p");
    const key = (sse.last("publish") as { idempotencyKey: string }).idempotencyKey;
    sse.frame({ type: "message", room: "r", offset: 8, epoch: "e", user: "v", clientId: "x", data: 8 });
    ws.connected("g2");
    expect(sse.closed).toMatchObject({ code: 1000 });
    expect(client.connection).toMatchObject({ transport: "websocket", gateway: "g2" });
    const rejoin = ws.last("join")!;
    expect(rejoin).toMatchObject({ room: "r", since: { epoch: "e", offset: 8 } });
    // frames still arriving on the old stream are ignored
    sse.frame({ type: "message", room: "r", offset: 9, epoch: "e", user: "v", clientId: "x", data: 9 });
    ws.frame({
      type: "joined",
      id: rejoin.id,
      room: "r",
      epoch: "e",
      offset: 9,
      recovered: true,
      missed: [{ type: "message", room: "r", offset: 9, epoch: "e", user: "v", clientId: "x", data: 9 }],
    });
    const again = ws.last("publish") as { id: number; idempotencyKey: string };
    expect(again.idempotencyKey).toBe(key);
    ws.frame({ type: "published", id: again.id, room: "r", offset: 10 });
    expect(await pub).toEqual({ offset: 10 });
    expect(got).toEqual([8, 9]);
    expect(states).toEqual(["connecting", "disconnected", "connecting", "connected"]);
    expect(connected).toEqual(["sse", "websocket"]);
    // On the preferred transport there is nothing to upgrade to.
    await sleep(100);
    expect(all).toHaveLength(4);
    client.close();
  });
});
