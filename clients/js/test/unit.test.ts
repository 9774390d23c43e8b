import { afterEach, describe, expect, it, vi } from "vitest";
import {
  backoffCeiling,
  backoffDelay,
  connect,
  reconnectPolicy,
  RoomcastError,
  tokenExpiry,
  type ClientFrame,
  type ServerFrame,
  type TransportFactory,
  type TransportHandlers,
} from "../src/index.js";
import { readFileSync } from "node:fs";
import { mintToken } from "./server.js";

describe("backoff", () => {
  it("full jitter stays in [0, min(cap, base * 2^n))", () => {
    const opts = { initialMs: 100, maxMs: 5000 };
    for (let n = 0; n < 20; n++) {
      const ceiling = backoffCeiling(n, opts);
      expect(ceiling).toBe(Math.min(5000, 100 * 2 ** n));
      expect(backoffDelay(n, opts, () => 0)).toBe(0);
      expect(backoffDelay(n, opts, () => 0.999999)).toBeLessThan(ceiling);
      expect(backoffDelay(n, opts, () => 0.999999)).toBeGreaterThanOrEqual(ceiling - 1);
      for (let i = 0; i < 50; i++) {
        const d = backoffDelay(n, opts);
        expect(d).toBeGreaterThanOrEqual(0);
        expect(d).toBeLessThan(ceiling);
      }
    }
    expect(backoffCeiling(1000, opts)).toBe(5000); // no overflow past the cap
  });

  it("is jittered, not a fixed schedule", () => {
    const delays = new Set(Array.from({ length: 40 }, () => backoffDelay(6, { initialMs: 100, maxMs: 60_000 })));
    expect(delays.size).toBeGreaterThan(20);
  });
});

describe("close codes", () => {
  it("follow the protocol's table", () => {
    for (const c of [1001, 1006, 1011, 1012, 1014, 4008]) expect(reconnectPolicy(c)).toBe("retry");
    for (const c of [1013, 4029, 4000, 4499]) expect(reconnectPolicy(c)).toBe("slow_down");
    expect(reconnectPolicy(4001)).toBe("new_token");
    for (const c of [1000, 1002, 1003, 1007, 1008, 1009, 1010, 3000, 3999, 4500, 4999]) {
      expect(reconnectPolicy(c)).toBe("terminal");
    }
  });
});

describe("close codes agree with the server's table", () => {
  it("matches every case of CloseCode::reconnect's test in common/src/close_code.rs", () => {
    const rust = readFileSync(new URL("../../../common/src/close_code.rs", import.meta.url), "utf8");
    const names = { Yes: "retry", AfterBackoff: "slow_down", WithNewToken: "new_token", No: "terminal" } as const;
    const cases = [...rust.matchAll(/\((\d{4}), (Yes|AfterBackoff|WithNewToken|No)\)/g)];
    expect(cases.length).toBeGreaterThan(15);
    for (const [, code, want] of cases) {
      expect([code, reconnectPolicy(Number(code))]).toEqual([code, names[want as keyof typeof names]]);
    }
  });
});

describe("tokenExpiry", () => {
  it("reads exp without verifying", () => {
    expect(tokenExpiry(mintToken("x", { sub: "a", exp: 1234 }))).toBe(1234);
    expect(tokenExpiry("not a jwt")).toBeUndefined();
    expect(tokenExpiry("a.b.c")).toBeUndefined();
  });
});

// ---- a scripted transport ----

class FakeTransport {
  readonly name = "fake";
  sent: ClientFrame[] = [];
  closed = false;
  constructor(
    readonly token: string,
    private readonly h: TransportHandlers,
  ) {}
  send(frame: ClientFrame) {
    if (this.closed) throw new Error("closed");
    this.sent.push(frame);
  }
  close(code = 1000, reason = "") {
    this.drop(code, reason);
  }
  // test side
  connected() {
    this.h.onOpen();
    this.h.onFrame({ type: "connected", clientId: "c", user: "u", gateway: "g" });
  }
  frame(f: ServerFrame) {
    this.h.onFrame(f);
  }
  drop(code = 1006, reason = "") {
    if (this.closed) return;
    this.closed = true;
    this.h.onClose({ code, reason });
  }
  last(type: string) {
    return [...this.sent].reverse().find((f) => f.type === type) as (ClientFrame & { id: number }) | undefined;
  }
}

function fake() {
  const transports: FakeTransport[] = [];
  const factory: TransportFactory = (opts, h) => {
    const t = new FakeTransport(opts.token, h);
    transports.push(t);
    return t;
  };
  return { transports, factory };
}

const tick = () => new Promise((r) => setTimeout(r, 0));

describe("client with a scripted transport", () => {
  afterEach(() => {
    vi.useRealTimers();
  });

  const token = mintToken("s", { sub: "u" });

  it("re-joins with since after a reconnect, drops duplicates, resends a publish with the same key", async () => {
    const { transports, factory } = fake();
    const client = connect({ url: "ws://x/ws", token, transport: factory, backoff: { initialMs: 1, maxMs: 1 } });
    await tick();
    transports[0]!.connected();
    const room = client.room("r");
    const got: number[] = [];
    room.on("message", (m) => got.push(m.offset));
    const joined = room.join();
    const join = transports[0]!.last("join")!;
    expect(join).toEqual({ type: "join", room: "r", id: join.id });
    transports[0]!.frame({ type: "joined", id: join.id, room: "r", epoch: "e", offset: 4 });
    await joined;
    const msg = (offset: number) =>
      ({ type: "message", room: "r", offset, epoch: "e", user: "v", clientId: "x", data: offset }) as const;
    transports[0]!.frame(msg(5));
    transports[0]!.frame(msg(6));
    transports[0]!.frame(msg(6)); // duplicate

    const published = room.publish({ hi: 1 });
    const pub1 = transports[0]!.last("publish")! as { idempotencyKey: string; id: number };
    expect(pub1.idempotencyKey).toMatch(/.+/);
    transports[0]!.drop(1006);

    const events: string[] = [];
    client.on("disconnected", (d) => events.push(`d${d.code}`));
    await new Promise((r) => setTimeout(r, 20));
    expect(transports.length).toBe(2);
    transports[1]!.connected();
    const rejoin = transports[1]!.last("join")!;
    expect(rejoin).toMatchObject({ room: "r", since: { epoch: "e", offset: 6 } });
    // no publish before the room is joined again
    expect(transports[1]!.last("publish")).toBeUndefined();
    const recovery = new Promise((r) => room.on("recovery", r));
    transports[1]!.frame({
      type: "joined",
      id: rejoin.id,
      room: "r",
      epoch: "e",
      offset: 8,
      recovered: true,
      missed: [msg(6), msg(7), msg(8)],
    });
    expect(await recovery).toEqual({ room: "r", recovered: true, missed: 2 });
    const pub2 = transports[1]!.last("publish")! as { idempotencyKey: string; id: number };
    expect(pub2.idempotencyKey).toBe(pub1.idempotencyKey);
    transports[1]!.frame({ type: "published", id: pub2.id, room: "r", offset: 9 });
    expect(await published).toEqual({ offset: 9 });
    transports[1]!.frame(msg(8)); // duplicate
    transports[1]!.frame(msg(10));
    expect(got).toEqual([5, 6, 7, 8, 10]);
    client.close();
  });

  it("does not hand the app its own earlier publishes again when a re-join recovers them", async () => {
    const { transports, factory } = fake();
    const client = connect({ url: "ws://x/ws", token, transport: factory, backoff: { initialMs: 1, maxMs: 1 } });
    await tick();
    transports[0]!.connected(); // clientId "c"
    const room = client.room("r");
    const got: number[] = [];
    room.on("message", (m) => got.push(m.offset));
    const j = room.join();
    transports[0]!.frame({ type: "joined", id: transports[0]!.last("join")!.id, room: "r", epoch: "e", offset: 5 });
    await j;
    const p = room.publish("mine");
    transports[0]!.frame({ type: "published", id: transports[0]!.last("publish")!.id, room: "r", offset: 6 });
    await p;
    transports[0]!.drop(1006);
    await new Promise((r) => setTimeout(r, 20));
    transports[1]!.frame({ type: "connected", clientId: "c2", user: "u", gateway: "g" });
    const rejoin = transports[1]!.last("join")!;
    expect(rejoin).toMatchObject({ since: { epoch: "e", offset: 5 } });
    const recovery = new Promise((r) => room.on("recovery", r));
    const msg = (offset: number, clientId: string) =>
      ({ type: "message", room: "r", offset, epoch: "e", user: "u", clientId, data: offset }) as const;
    transports[1]!.frame({
      type: "joined",
      id: rejoin.id,
      room: "r",
      epoch: "e",
      offset: 7,
      recovered: true,
      missed: [msg(6, "c"), msg(7, "other")],
    });
    expect(await recovery).toEqual({ room: "r", recovered: true, missed: 1 });
    expect(got).toEqual([7]);
    expect(room.lastSeen).toEqual({ epoch: "e", offset: 7 });
    client.close();
  });

  it("emits recovered: false and goes on from the room's offset", async () => {
    const { transports, factory } = fake();
    const client = connect({ url: "ws://x/ws", token, transport: factory, backoff: { initialMs: 1, maxMs: 1 } });
    await tick();
    transports[0]!.connected();
    const room = client.room("r");
    const j = room.join();
    transports[0]!.frame({ type: "joined", id: transports[0]!.last("join")!.id, room: "r", epoch: "e", offset: 3 });
    await j;
    transports[0]!.drop(1001);
    await new Promise((r) => setTimeout(r, 20));
    transports[1]!.connected();
    const recovery = new Promise((r) => room.on("recovery", r));
    transports[1]!.frame({
      type: "joined",
      id: transports[1]!.last("join")!.id,
      room: "r",
      epoch: "f",
      offset: 1,
      recovered: false,
      missed: [],
    });
    expect(await recovery).toEqual({ room: "r", recovered: false, missed: 0 });
    expect(room.lastSeen).toEqual({ epoch: "f", offset: 1 });
    client.close();
  });

  it("undoes a join answered after leave() and joins once when join() follows at once", async () => {
    const { transports, factory } = fake();
    const client = connect({ url: "ws://x/ws", token, transport: factory });
    await tick();
    const t = transports[0]!;
    t.connected();
    const room = client.room("r");
    room.join().catch(() => {});
    await room.leave();
    const join = t.last("join")!;
    t.frame({ type: "joined", id: join.id, room: "r", epoch: "e", offset: 0 });
    expect(room.joined).toBe(false);
    expect(t.last("leave")).toMatchObject({ room: "r" });
    // leave + join before the reply (StrictMode's effects): one join frame, joined at the end
    const again = room.join();
    void room.leave();
    const third = room.join();
    const joins = t.sent.filter((f) => f.type === "join");
    expect(joins).toHaveLength(2);
    t.frame({ type: "joined", id: t.last("join")!.id, room: "r", epoch: "e", offset: 0 });
    await expect(third).resolves.toMatchObject({ room: "r" });
    await expect(again).rejects.toMatchObject({ code: "not_joined" });
    expect(room.joined).toBe(true);
    client.close();
  });

  it("matches replies by id and times out", async () => {
    const { transports, factory } = fake();
    const client = connect({ url: "ws://x/ws", token, transport: factory, commandTimeoutMs: 50 });
    await tick();
    transports[0]!.connected();
    const a = client.ping();
    const b = client.ping();
    const [pa, pb] = transports[0]!.sent as Array<{ id: number }>;
    expect(pa!.id).not.toBe(pb!.id);
    transports[0]!.frame({ type: "pong", id: pb!.id });
    await expect(b).resolves.toBeTypeOf("number");
    const err = await a.catch((e: unknown) => e);
    expect(err).toBeInstanceOf(RoomcastError);
    expect((err as RoomcastError).code).toBe("timeout");
    // a join times out too, but the room stays wanted and joins when the answer comes
    const room = client.room("slow");
    await expect(room.join()).rejects.toMatchObject({ code: "timeout" });
    const joined = new Promise((r) => room.on("joined", r));
    transports[0]!.frame({ type: "joined", id: transports[0]!.last("join")!.id, room: "slow", epoch: "e", offset: 0 });
    await joined;
    expect(room.joined).toBe(true);
    client.close();
  });

  it("does not retry a terminal code or 4001 without getToken; retries 4001 with getToken", async () => {
    for (const code of [1008, 4001, 1000, 4500]) {
      const { transports, factory } = fake();
      const client = connect({ url: "ws://x/ws", token, transport: factory, backoff: { initialMs: 1, maxMs: 1 } });
      await tick();
      transports[0]!.connected();
      const d = new Promise<{ willReconnect: boolean }>((r) => client.on("disconnected", r));
      transports[0]!.drop(code);
      expect((await d).willReconnect).toBe(false);
      await new Promise((r) => setTimeout(r, 20));
      expect(transports.length).toBe(1);
      expect(client.closed).toBe(true);
    }
    const { transports, factory } = fake();
    let n = 0;
    const client = connect({
      url: "ws://x/ws",
      getToken: () => mintToken("s", { sub: "u", rooms: [`t${++n}`] }),
      transport: factory,
      backoff: { initialMs: 1, maxMs: 1 },
    });
    await new Promise((r) => setTimeout(r, 5));
    transports[0]!.connected();
    transports[0]!.drop(4001);
    await new Promise((r) => setTimeout(r, 20));
    expect(transports.length).toBe(2);
    expect(transports[1]!.token).not.toBe(transports[0]!.token);
    client.close();
  });

  it("refreshes the token before exp with getToken", async () => {
    const { transports, factory } = fake();
    const exp = () => Math.floor(Date.now() / 1000) + 2;
    const client = connect({
      url: "ws://x/ws",
      getToken: () => mintToken("s", { sub: "u", exp: exp() }),
      transport: factory,
      refreshMarginMs: 30_000,
    });
    await new Promise((r) => setTimeout(r, 5));
    transports[0]!.connected();
    // at most half the remaining life (~1-2 s) before exp
    await new Promise((r) => setTimeout(r, 1100));
    const refresh = transports[0]!.last("refresh");
    expect(refresh).toBeDefined();
    transports[0]!.frame({ type: "refreshed", id: refresh!.id, expiresAt: exp() });
    client.close();
  });
});

describe("rooms a backend subscribed the connection to", () => {
  it("are re-joined with since after a reconnect, until the server unsubscribes", async () => {
    const { transports, factory } = fake();
    const token = mintToken("s", { sub: "u" });
    const client = connect({ url: "ws://x/ws", token, transport: factory, backoff: { initialMs: 1, maxMs: 1 } });
    const subscribed: string[] = [];
    client.on("subscribed", (r) => subscribed.push(r.name));
    await tick();
    transports[0]!.connected();
    transports[0]!.frame({ type: "joined", room: "news", epoch: "e", offset: 4 });
    transports[0]!.frame({ type: "message", room: "news", offset: 5, epoch: "e", user: "b", clientId: "s", data: 5 });
    expect(subscribed).toEqual(["news"]);
    const news = client.room("news");
    expect(news.joined).toBe(true);
    transports[0]!.drop(1006);
    await new Promise((r) => setTimeout(r, 20));
    transports[1]!.connected();
    const rejoin = transports[1]!.last("join");
    expect(rejoin).toMatchObject({ room: "news", since: { epoch: "e", offset: 5 } });
    transports[1]!.frame({ type: "joined", id: rejoin!.id, room: "news", epoch: "e", offset: 5, recovered: true, missed: [] });
    expect(news.joined).toBe(true);
    // unsubscribed by the backend: not re-joined any more
    transports[1]!.frame({ type: "left", room: "news" });
    transports[1]!.drop(1006);
    await new Promise((r) => setTimeout(r, 20));
    transports[2]!.connected();
    expect(transports[2]!.last("join")).toBeUndefined();
    client.close();
  });
});
