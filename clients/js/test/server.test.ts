// The client against a real `roomcast standalone` (target/debug/roomcast, built by the caller).
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import WebSocket from "ws";
import {
  connect,
  RoomcastError,
  WebSocketTransport,
  webSocketTransport,
  type ConnectOptions,
  type MessageFrame,
  type RoomcastClient,
} from "../src/index.js";
import { sseServed, startServer, waitFor, type TestServer } from "./server.js";

let server: TestServer;
const clients: RoomcastClient[] = [];

beforeAll(async () => {
  server = await startServer();
});

afterAll(async () => {
  for (const c of clients) c.close();
  await server?.stop();
});

function client(sub: string, opts: Partial<ConnectOptions> = {}): RoomcastClient {
  const c = connect({
    url: server.url,
    token: opts.getToken ? undefined : server.token({ sub }),
    backoff: { initialMs: 100, maxMs: 1000 },
    ...opts,
  });
  clients.push(c);
  return c;
}

/** Drops the client's socket without a close handshake, as a network failure would. */
function dropSocket(c: RoomcastClient): void {
  const socket = (c._transport as WebSocketTransport).socket as unknown as WebSocket;
  socket.terminate();
}

let roomSeq = 0;
const roomName = () => `sdk-${process.pid}-${++roomSeq}`;

describe("against roomcast standalone", () => {
  it("two clients join, publish and receive; presence and history", async () => {
    const alice = client("alice");
    const bob = client("bob");
    const name = roomName();
    const ra = alice.room(name);
    const rb = bob.room(name);
    const info = await ra.join();
    expect(info).toMatchObject({ room: name, rejoin: false, missed: 0 });
    const joinedSeen = new Promise((r) => ra.on("member_joined", r));
    await rb.join();
    expect(await joinedSeen).toMatchObject({ room: name, user: "bob" });
    expect(alice.connection?.user).toBe("alice");

    const received: MessageFrame[] = [];
    rb.on("message", (m) => received.push(m));
    const { offset } = await ra.publish({ text: "hi" });
    await waitFor(() => received.length === 1, 5000, "bob's message");
    expect(received[0]).toMatchObject({ room: name, offset, user: "alice", data: { text: "hi" } });

    const members = await ra.presence();
    expect(members.map((m) => m.user).sort()).toEqual(["alice", "bob"]);
    const history = await rb.history();
    expect(history.messages.map((m) => m.data)).toEqual([{ text: "hi" }]);

    const leftSeen = new Promise((r) => ra.on("member_left", r));
    await rb.leave();
    expect(await leftSeen).toMatchObject({ user: "bob" });
  });

  it("matches concurrent commands by id", async () => {
    const c = client("carol");
    const name = roomName();
    const room = c.room(name);
    await room.join();
    const results = await Promise.all([
      room.publish(1),
      room.presence(),
      room.publish(2),
      room.history(),
      c.ping(),
      room.publish(3),
    ]);
    const [p1, members, p2, , rtt, p3] = results as [
      { offset: number },
      Array<{ user: string }>,
      { offset: number },
      unknown,
      number,
      { offset: number },
    ];
    expect([p1.offset, p2.offset, p3.offset]).toEqual([1, 2, 3]);
    expect(members.map((m) => m.user)).toEqual(["carol"]);
    expect(rtt).toBeGreaterThanOrEqual(0);
  });

  it("types errors by code: a room the token does not allow is forbidden", async () => {
    const limited = connect({
      url: server.url,
      token: server.token({ sub: "dave", rooms: ["allowed:*"] }),
    });
    clients.push(limited);
    await limited.room("allowed:1").join();
    const err = await limited
      .room("secret")
      .join()
      .catch((e: unknown) => e);
    expect(err).toBeInstanceOf(RoomcastError);
    expect((err as RoomcastError).code).toBe("forbidden");
    expect(limited.state).toBe("connected");
  });

  it("recovers every message exactly once, in order, after its socket dropped", async () => {
    const reader = client("erin", { backoff: { initialMs: 300, maxMs: 600 } });
    const writer = client("frank");
    const name = roomName();
    const rr = reader.room(name);
    const rw = writer.room(name);
    await rr.join();
    await rw.join();
    const got: number[] = [];
    rr.on("message", (m) => got.push(m.data as number));
    const recoveries: Array<{ recovered: boolean; missed: number }> = [];
    rr.on("recovery", (r) => recoveries.push(r));
    const states: string[] = [];
    reader.on("state", (s) => states.push(s));

    const total = 40;
    for (let i = 1; i <= total; i++) {
      if (i === 10) dropSocket(reader);
      await rw.publish(i);
      await new Promise((r) => setTimeout(r, 10));
    }
    await waitFor(() => got.length >= total, 10_000, "every message");
    await new Promise((r) => setTimeout(r, 200)); // nothing more may arrive
    expect(got).toEqual(Array.from({ length: total }, (_, i) => i + 1));
    expect(states).toContain("disconnected");
    expect(states.at(-1)).toBe("connected");
    expect(recoveries).toHaveLength(1);
    expect(recoveries[0]!.recovered).toBe(true);
    expect(recoveries[0]!.missed).toBeGreaterThan(0);
  });

  it("a publish retried across a reconnect with its idempotency key is stored once", async () => {
    // Record the frames sent on every connection, to see the retry's key.
    const sent: Array<{ type: string; idempotencyKey?: string }> = [];
    const c = client("grace", {
      backoff: { initialMs: 50, maxMs: 100 },
      transport: (opts, handlers) => {
        const t = webSocketTransport()(opts, handlers);
        const send = t.send.bind(t);
        t.send = (frame) => {
          sent.push(frame as { type: string });
          send(frame);
        };
        return t;
      },
    });
    const name = roomName();
    const room = c.room(name);
    await room.join();
    // The first attempt reaches the server, but its reply is lost with the connection.
    const socket = (c._transport as WebSocketTransport).socket as unknown as WebSocket;
    const deliver = socket.onmessage!;
    let replyLost = false;
    socket.onmessage = (ev) => {
      if (JSON.parse(String(ev.data)).type === "published") replyLost = true;
      else deliver(ev);
    };
    const p = room.publish({ n: 1 });
    await waitFor(() => replyLost, 5000, "the first reply");
    const firstKey = sent.find((f) => f.type === "publish")!.idempotencyKey;
    socket.terminate();
    await waitFor(() => c.state === "connected" && room.joined, 5000, "reconnect");
    const { offset } = await p;
    expect(offset).toBe(1);
    expect(sent.filter((f) => f.type === "publish").map((f) => f.idempotencyKey)).toEqual([firstKey, firstKey]);
    const history = await room.history();
    expect(history.messages.map((m) => m.data)).toEqual([{ n: 1 }]);

    // The same key given by the app (retrying after a timeout) gets the first offset too.
    const again = await room.publish({ n: 1 }, { idempotencyKey: firstKey! });
    expect(again.offset).toBe(1);
    expect((await room.history()).messages).toHaveLength(1);
  });

  it("does not reconnect after 4001 without getToken", async () => {
    const c = connect({
      url: server.url,
      token: server.token({ sub: "heidi", exp: Math.floor(Date.now() / 1000) + 2 }),
      backoff: { initialMs: 50, maxMs: 100 },
    });
    clients.push(c);
    await waitFor(() => c.state === "connected", 5000, "connected");
    const d = await new Promise<{ code: number; willReconnect: boolean }>((r) => c.on("disconnected", r));
    expect(d).toMatchObject({ code: 4001, willReconnect: false });
    await new Promise((r) => setTimeout(r, 300));
    expect(c.state).toBe("disconnected");
    expect(c.closed).toBe(true);
  });

  it("stops on a refused handshake (401) without getToken; gets a new token with it", async () => {
    const bad = connect({ url: server.url, token: server.token({ sub: "judy" }) + "x" });
    clients.push(bad);
    const d = await new Promise<{ code: number; httpStatus?: number; willReconnect: boolean }>((r) =>
      bad.on("disconnected", r),
    );
    expect(d).toMatchObject({ code: 1006, httpStatus: 401, willReconnect: false });

    let calls = 0;
    const good = connect({
      url: server.url,
      token: server.token({ sub: "judy" }) + "x",
      getToken: () => {
        calls++;
        return server.token({ sub: "judy" });
      },
      backoff: { initialMs: 20, maxMs: 50 },
    });
    clients.push(good);
    await waitFor(() => good.state === "connected", 5000, "connected with a new token");
    expect(calls).toBe(1);
  });

  it("over SSE: chats with a WebSocket client, refreshes its token and goes on posting past the first one's exp", async (ctx) => {
    const httpUrl = server.url.replace(/^ws/, "http").replace(/\/ws$/, "");
    if (!(await sseServed(httpUrl, server.token({ sub: "probe" })))) {
      ctx.skip("the gateway answers 404 on /sse");
      return;
    }
    const exp = () => Math.floor(Date.now() / 1000) + 3;
    const sse = client("sse-kim", {
      transports: ["sse"],
      EventSource: null,
      getToken: () => server.token({ sub: "sse-kim", exp: exp() }),
    });
    const ws = client("ws-lee");
    const disconnects: number[] = [];
    sse.on("disconnected", (d) => disconnects.push(d.code));
    const name = roomName();
    const rs = sse.room(name);
    const rw = ws.room(name);
    await rs.join();
    await rw.join();
    expect(sse.transport).toBe("sse");
    expect(ws.transport).toBe("websocket");
    const atSse: unknown[] = [];
    const atWs: unknown[] = [];
    rs.on("message", (m) => atSse.push(m.data));
    rw.on("message", (m) => atWs.push(m.data));
    // several commands in one tick: one POST, run in order
    const offsets = await Promise.all([rs.publish("s1"), rs.publish("s2"), rs.publish("s3")]);
    expect(offsets.map((o) => o.offset)).toEqual([1, 2, 3]);
    await rw.publish("w1");
    await waitFor(() => atWs.length === 3 && atSse.length === 1, 5000, "both sides' messages");
    expect(atWs).toEqual(["s1", "s2", "s3"]);
    expect(atSse).toEqual(["w1"]);
    expect((await rs.presence()).map((m) => m.user).sort()).toEqual(["sse-kim", "ws-lee"]);
    // past the first token's exp: POSTs carry the refreshed one
    await new Promise((r) => setTimeout(r, 3500));
    expect(await rs.publish("s4")).toEqual({ offset: 5 });
    expect(disconnects).toEqual([]);
    expect(sse.transport).toBe("sse");
  }, 15_000);

  it("refreshes a short-lived token with getToken and stays connected past exp", async () => {
    const c = client("ivan", {
      getToken: () => server.token({ sub: "ivan", exp: Math.floor(Date.now() / 1000) + 3 }),
    });
    const disconnects: number[] = [];
    c.on("disconnected", (d) => disconnects.push(d.code));
    const refreshed = new Promise<{ expiresAt: number }>((r) => c.on("refreshed", r));
    await waitFor(() => c.state === "connected", 5000, "connected");
    const { expiresAt } = await refreshed;
    expect(expiresAt).toBeGreaterThan(Date.now() / 1000);
    await new Promise((r) => setTimeout(r, 3500));
    expect(disconnects).toEqual([]);
    expect(c.state).toBe("connected");
  }, 15_000);
});
