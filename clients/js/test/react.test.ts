// @vitest-environment jsdom
import { act, cleanup, render } from "@testing-library/react";
import { createElement, StrictMode, useEffect } from "react";
import { afterEach, describe, expect, it } from "vitest";
import type { ClientFrame, ServerFrame, TransportFactory, TransportHandlers } from "../src/index.js";
import { RoomcastProvider, useRoom, useRoomcast, type UseRoom, type UseRoomcast } from "../src/react.js";
import { mintToken } from "./server.js";

(globalThis as { IS_REACT_ACT_ENVIRONMENT?: boolean }).IS_REACT_ACT_ENVIRONMENT = true;

class FakeTransport {
  readonly name = "fake";
  sent: ClientFrame[] = [];
  closed = false;
  constructor(
    readonly url: string,
    readonly token: string,
    private readonly h: TransportHandlers,
  ) {}
  send(frame: ClientFrame) {
    this.sent.push(frame);
  }
  close() {
    if (this.closed) return;
    this.closed = true;
    this.h.onClose({ code: 1000, reason: "" });
  }
  frame(f: ServerFrame) {
    this.h.onFrame(f);
  }
  connected() {
    this.frame({ type: "connected", clientId: "me", user: "u", gateway: "g" });
  }
  all(type: string) {
    return this.sent.filter((f) => f.type === type) as Array<ClientFrame & { id: number }>;
  }
}

function fake() {
  const transports: FakeTransport[] = [];
  const factory: TransportFactory = (opts, h) => {
    const t = new FakeTransport(opts.url, opts.token, h);
    transports.push(t);
    return t;
  };
  return { transports, factory };
}

const wait = (ms = 5) => act(() => new Promise<void>((r) => setTimeout(r, ms)));
const token = mintToken("s", { sub: "u" });

afterEach(() => cleanup());

describe("react hooks", () => {
  it("useRoomcast opens one connection under StrictMode, closes it on unmount, and does not reconnect on re-render", async () => {
    const { transports, factory } = fake();
    let seen: UseRoomcast | undefined;
    function App(props: { url: string; token: string }) {
      seen = useRoomcast({ url: props.url, token: props.token, transport: factory });
      return null;
    }
    const ui = (url: string, t: string) => createElement(StrictMode, null, createElement(App, { url, token: t }));
    const view = render(ui("ws://a/ws", token));
    await wait();
    expect(transports).toHaveLength(1);
    act(() => transports[0]!.connected());
    expect(seen!.state).toBe("connected");
    expect(seen!.connection?.clientId).toBe("me");

    // a re-render with a new token refreshes the open connection instead of reconnecting
    const token2 = mintToken("s", { sub: "u", exp: Math.floor(Date.now() / 1000) + 7200 });
    view.rerender(ui("ws://a/ws", token2));
    await wait();
    expect(transports).toHaveLength(1);
    expect(transports[0]!.all("refresh").map((f) => (f as { token: string }).token)).toEqual([token2]);

    // a new url is a new connection, and the old one is closed
    view.rerender(ui("ws://b/ws", token2));
    await wait();
    expect(transports).toHaveLength(2);
    expect(transports[0]!.closed).toBe(true);
    expect(transports[1]!.url).toBe("ws://b/ws");
    view.unmount();
    expect(transports[1]!.closed).toBe(true);
  });

  it("useRoom joins once under StrictMode, tracks messages and members, publishes, and leaves on unmount", async () => {
    const { transports, factory } = fake();
    let room: UseRoom | undefined;
    function Chat() {
      room = useRoom("chat:1");
      return null;
    }
    function App() {
      const { client } = useRoomcast({ url: "ws://a/ws", token, transport: factory });
      useEffect(() => {}, []);
      return createElement(RoomcastProvider, { client }, createElement(Chat));
    }
    const view = render(createElement(StrictMode, null, createElement(App)));
    await wait();
    const t = transports[0]!;
    act(() => t.connected());
    await wait();
    const joins = t.all("join");
    expect(joins).toHaveLength(1);
    act(() => t.frame({ type: "joined", id: joins[0]!.id, room: "chat:1", epoch: "e", offset: 0 }));
    await wait();
    expect(room!.joined).toBe(true);
    const presence = t.all("presence");
    expect(presence).toHaveLength(1);
    await act(async () =>
      t.frame({ type: "presence", id: presence[0]!.id, room: "chat:1", members: [{ user: "u", clientId: "me" }] }),
    );
    act(() => t.frame({ type: "member_joined", room: "chat:1", user: "v", clientId: "other" }));
    const msg = { type: "message", room: "chat:1", epoch: "e", user: "v", clientId: "other" } as const;
    act(() => {
      t.frame({ ...msg, offset: 1, data: "a" });
      t.frame({ ...msg, offset: 1, data: "a" });
      t.frame({ ...msg, offset: 2, data: "b" });
    });
    expect(room!.messages.map((m) => m.data)).toEqual(["a", "b"]);
    expect(room!.members.map((m) => m.user)).toEqual(["u", "v"]);
    act(() => t.frame({ type: "member_left", room: "chat:1", user: "v", clientId: "other" }));
    expect(room!.members.map((m) => m.user)).toEqual(["u"]);

    let published: Promise<{ offset: number }> | undefined;
    act(() => {
      published = room!.publish({ text: "hi" });
    });
    const pub = t.all("publish")[0]!;
    await act(async () => t.frame({ type: "published", id: pub.id, room: "chat:1", offset: 3 }));
    await expect(published).resolves.toEqual({ offset: 3 });
    // our own message is in the list once acknowledged, in offset order with a late one
    expect(room!.messages.map((m) => [m.offset, m.data, m.clientId])).toEqual([
      [1, "a", "other"],
      [2, "b", "other"],
      [3, { text: "hi" }, "me"],
    ]);
    act(() => {
      published = room!.publish("second");
    });
    const pub2 = t.all("publish")[1]!;
    await act(async () => t.frame({ type: "published", id: pub2.id, room: "chat:1", offset: 5 }));
    act(() => t.frame({ ...msg, offset: 4, data: "late" }));
    act(() => t.frame({ ...msg, offset: 6, data: "next" }));
    expect(room!.messages.map((m) => m.offset)).toEqual([1, 2, 3, 4, 5, 6]);

    view.unmount();
    expect(t.all("leave")).toHaveLength(0); // the client closed at once; leaving is implied
    expect(t.closed).toBe(true);
  });

  it("useRoom leaves the room when the component unmounts but the client stays", async () => {
    const { transports, factory } = fake();
    function Chat() {
      useRoom("chat:2");
      return null;
    }
    function App(props: { show: boolean }) {
      const { client } = useRoomcast({ url: "ws://a/ws", token, transport: factory });
      return createElement(RoomcastProvider, { client }, props.show ? createElement(Chat) : null);
    }
    const view = render(createElement(StrictMode, null, createElement(App, { show: true })));
    await wait();
    const t = transports[0]!;
    act(() => t.connected());
    await wait();
    const join = t.all("join")[0]!;
    act(() => t.frame({ type: "joined", id: join.id, room: "chat:2", epoch: "e", offset: 0 }));
    await wait();
    view.rerender(createElement(StrictMode, null, createElement(App, { show: false })));
    await wait();
    expect(t.all("join")).toHaveLength(1);
    expect(t.all("leave").map((f) => (f as { room: string }).room)).toEqual(["chat:2"]);
    expect(t.closed).toBe(false);
    view.unmount();
  });
});
