// The demo page: a small chat on the `roomcast` client. Query options: `token` (a JWT; the
// standalone command prints a link with one), `room` (rooms to join at start, comma-separated;
// default `lobby`), `transport=sse` (force the SSE + POST fallback, as behind a proxy that
// blocks WebSocket) or `transport=websocket` (never fall back).
import {
  connect,
  RoomcastError,
  type DisconnectedInfo,
  type MessageFrame,
  type Room,
  type RoomcastClient,
  type TransportName,
} from "roomcast";

interface MessageItem {
  kind: "message";
  /** Set once stored (a message of ours is shown before the server acknowledged it). */
  offset: number | undefined;
  user: string;
  text: string;
  mine: boolean;
  failed?: string;
}

interface NoticeItem {
  kind: "notice";
  text: string;
  error?: boolean;
}

type Item = MessageItem | NoticeItem;

interface RoomView {
  name: string;
  room: Room;
  items: Item[];
  /** Offsets shown, in the current epoch: a message recovered again is not shown twice. */
  seen: Set<number>;
  epoch: string | undefined;
  members: Map<string, string>;
  unread: number;
  recovery: { recovered: boolean; missed: number; at: Date } | undefined;
  offs: Array<() => void>;
}

const MAX_ITEMS = 500;
const TRANSPORT_LABEL: Record<TransportName, string> = { websocket: "WebSocket", sse: "SSE" };

const params = new URLSearchParams(location.search);
const forced = params.get("transport");
const transports: TransportName[] | undefined =
  forced === "sse" ? ["sse"] : forced === "websocket" ? ["websocket"] : undefined;

const $ = <T extends HTMLElement>(id: string): T => {
  const el = document.getElementById(id);
  if (!el) throw new Error(`#${id} missing`);
  return el as T;
};
const el = <K extends keyof HTMLElementTagNameMap>(tag: K, cls?: string, text?: string): HTMLElementTagNameMap[K] => {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
};

const ui = {
  state: $("state"),
  transport: $("transport"),
  identity: $("identity"),
  tokenForm: $<HTMLFormElement>("token-form"),
  token: $<HTMLInputElement>("token"),
  joinForm: $<HTMLFormElement>("join-form"),
  roomName: $<HTMLInputElement>("room-name"),
  rooms: $("rooms"),
  roomTitle: $("room-title"),
  leave: $<HTMLButtonElement>("leave"),
  recovery: $("recovery"),
  messages: $("messages"),
  sendForm: $<HTMLFormElement>("send-form"),
  text: $<HTMLInputElement>("text"),
  send: $<HTMLButtonElement>("send-form").querySelector("button")!,
  members: $("members"),
  memberCount: $("member-count"),
};

let client: RoomcastClient | undefined;
const views = new Map<string, RoomView>();
let current: string | undefined;
let countdown: ReturnType<typeof setInterval> | undefined;

// ---- connection ----

function start(token: string): void {
  const rooms = views.size > 0 ? [...views.keys()] : (params.get("room") ?? "lobby").split(",").filter(Boolean);
  if (client) {
    for (const v of views.values()) for (const off of v.offs) off();
    views.clear();
    client.close();
  }
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const c = connect({
    url: `${scheme}//${location.host}/ws`,
    token,
    ...(transports ? { transports } : {}),
  });
  client = c;
  c.on("connecting", ({ attempt, transport }) => {
    if (client !== c) return;
    stopCountdown();
    setState(attempt > 0 ? "reconnecting" : "connecting", attempt > 0 ? "reconnecting…" : "connecting…");
    ui.transport.textContent = TRANSPORT_LABEL[transport];
  });
  let transport: TransportName | undefined;
  c.on("connected", (info) => {
    if (client !== c) return;
    if (transport && transport !== info.transport && current) {
      notice(views.get(current)!, `switched to ${TRANSPORT_LABEL[info.transport]}`);
    }
    transport = info.transport;
    stopCountdown();
    setState("connected", "connected");
    ui.transport.textContent = TRANSPORT_LABEL[info.transport];
    ui.identity.textContent = `${info.user} · gateway ${info.gateway}`;
    render();
  });
  c.on("disconnected", (d) => {
    if (client !== c) return;
    showDisconnected(d);
    render();
  });
  c.on("error", (err) => current && notice(views.get(current)!, `error: ${err.code}: ${err.message}`, true));
  c.on("subscribed", (room) => {
    if (!views.has(room.name)) addView(room.name);
  });
  for (const name of rooms) join(name);
  if (!current && rooms[0]) select(rooms[0]);
}

function setState(cls: string, text: string): void {
  ui.state.className = `pill ${cls}`;
  ui.state.textContent = text;
}

function showDisconnected(d: DisconnectedInfo): void {
  stopCountdown();
  const why = `${d.code}${d.reason ? ` ${d.reason}` : ""}`;
  ui.state.title = `closed: ${why}`;
  if (!d.willReconnect) {
    setState("disconnected", `disconnected (${why})`);
    return;
  }
  if (d.retryInMs === undefined) {
    setState("disconnected", "offline: waiting for the network");
    return;
  }
  const until = Date.now() + d.retryInMs;
  const tick = () => {
    const s = Math.max(0, (until - Date.now()) / 1000);
    setState("reconnecting", `reconnecting in ${s.toFixed(1)} s`);
  };
  tick();
  countdown = setInterval(tick, 100);
}

function stopCountdown(): void {
  if (countdown) clearInterval(countdown);
  countdown = undefined;
}

// ---- rooms ----

function addView(name: string): RoomView {
  const room = client!.room(name);
  const v: RoomView = {
    name,
    room,
    items: [],
    seen: new Set(),
    epoch: undefined,
    members: new Map(),
    unread: 0,
    recovery: undefined,
    offs: [],
  };
  views.set(name, v);
  v.offs.push(
    room.on("message", (m) => {
      addMessage(v, m);
      if (current !== name) v.unread++;
      render();
    }),
    room.on("member_joined", (m) => {
      if (v.members.has(m.clientId)) return;
      v.members.set(m.clientId, m.user);
      notice(v, `${m.user} joined`);
    }),
    room.on("member_left", (m) => {
      if (!v.members.delete(m.clientId)) return;
      notice(v, `${m.user} left`);
    }),
    room.on("joined", (info) => {
      if (!info.rejoin) {
        notice(v, `joined ${name}`);
        void loadHistory(v);
      }
      loadMembers(v);
    }),
    room.on("recovery", ({ recovered, missed }) => {
      if (recovered && missed === 0) {
        // (also after a switch of transport): keep the banner of the last real gap
        notice(v, "re-joined: nothing missed");
        return;
      }
      v.recovery = { recovered, missed, at: new Date() };
      if (recovered) {
        notice(v, `reconnected: ${missed} missed message${missed === 1 ? "" : "s"} recovered`);
      } else {
        // The room's history no longer covers the gap (or was reset): show it afresh.
        v.items = [];
        v.seen.clear();
        notice(v, "reconnected: the history no longer covers the gap; reloaded");
        void loadHistory(v);
      }
      render();
    }),
    room.on("left", ({ byServer }) => {
      if (byServer) notice(v, "a backend removed this connection from the room", true);
    }),
    room.on("error", (err) => notice(v, `error: ${err.code}: ${err.message}`, true)),
  );
  return v;
}

function join(name: string): void {
  if (!client) return;
  const v = views.get(name) ?? addView(name);
  v.room.join().catch((err: unknown) => {
    const e = err instanceof RoomcastError ? `${err.code}: ${err.message}` : String(err);
    notice(v, `join refused: ${e}`, true);
  });
  render();
}

async function loadHistory(v: RoomView): Promise<void> {
  try {
    const h = await v.room.history({ limit: 50 });
    if (v.epoch !== h.epoch) {
      v.epoch = h.epoch;
      v.seen.clear();
    }
    const older: Item[] = [];
    for (const m of h.messages) {
      if (v.seen.has(m.offset)) continue;
      v.seen.add(m.offset);
      older.push(messageItem(m));
    }
    if (older.length > 0) v.items.unshift(...older, { kind: "notice", text: `${older.length} earlier message${older.length === 1 ? "" : "s"} from history` });
    render();
  } catch (err) {
    notice(v, `history failed: ${String(err)}`, true);
  }
}

function loadMembers(v: RoomView): void {
  v.room.presence().then(
    (members) => {
      v.members = new Map(members.map((m) => [m.clientId, m.user]));
      render();
    },
    () => {},
  );
}

function messageItem(m: MessageFrame): MessageItem {
  const data = m.data as { text?: unknown } | null;
  const text = data && typeof data === "object" && typeof data.text === "string" ? data.text : JSON.stringify(m.data);
  return { kind: "message", offset: m.offset, user: m.user, text, mine: m.clientId === client?.connection?.clientId };
}

function addMessage(v: RoomView, m: MessageFrame): void {
  if (v.epoch !== m.epoch) {
    v.epoch = m.epoch;
    v.seen.clear();
  }
  // Our own message, already shown when sent, may come again in a recovery.
  if (v.seen.has(m.offset)) return;
  v.seen.add(m.offset);
  push(v, messageItem(m));
}

function push(v: RoomView, item: Item): void {
  v.items.push(item);
  if (v.items.length > MAX_ITEMS) v.items.splice(0, v.items.length - MAX_ITEMS);
}

function notice(v: RoomView, text: string, error = false): void {
  push(v, error ? { kind: "notice", text, error } : { kind: "notice", text });
  render();
}

function select(name: string): void {
  current = name;
  const v = views.get(name);
  if (v) v.unread = 0;
  render();
}

async function leave(name: string): Promise<void> {
  const v = views.get(name);
  if (!v) return;
  views.delete(name);
  for (const off of v.offs) off();
  if (current === name) current = views.keys().next().value;
  render();
  await v.room.leave().catch(() => {});
}

function send(text: string): void {
  const v = current ? views.get(current) : undefined;
  if (!v || !client) return;
  const item: MessageItem = { kind: "message", offset: undefined, user: client.connection?.user ?? "me", text, mine: true };
  push(v, item);
  render();
  v.room.publish({ text }).then(
    ({ offset }) => {
      item.offset = offset;
      const epoch = v.room.lastSeen?.epoch;
      if (epoch && v.epoch === undefined) v.epoch = epoch;
      v.seen.add(offset);
      render();
    },
    (err: unknown) => {
      item.failed = err instanceof RoomcastError ? err.code : String(err);
      render();
    },
  );
}

// ---- rendering ----

let renderQueued = false;
function render(): void {
  if (renderQueued) return;
  renderQueued = true;
  queueMicrotask(() => {
    renderQueued = false;
    draw();
  });
}

function draw(): void {
  ui.rooms.replaceChildren(
    ...[...views.values()].map((v) => {
      const li = el("li", v.name === current ? "current" : undefined);
      li.dataset.testid = "room-tab";
      li.dataset.room = v.name;
      li.append(el("span", undefined, v.name));
      if (v.unread > 0) li.append(el("span", "badge", String(v.unread)));
      li.onclick = () => select(v.name);
      return li;
    }),
  );
  const v = current ? views.get(current) : undefined;
  ui.roomTitle.textContent = v ? v.name : "no room";
  ui.leave.hidden = !v;
  const connected = client?.state === "connected";
  ui.text.disabled = !v;
  ui.send.disabled = !v;
  ui.text.placeholder = v ? (connected ? `message ${v.name}` : "message (sent when reconnected)") : "join a room first";

  if (v?.recovery) {
    const r = v.recovery;
    ui.recovery.hidden = false;
    ui.recovery.className = r.recovered ? "recovery" : "recovery lost";
    ui.recovery.textContent = r.recovered
      ? `${r.missed} missed message${r.missed === 1 ? "" : "s"} recovered after the reconnect (${r.at.toLocaleTimeString()})`
      : `The history no longer covered the gap after the reconnect; the room was reloaded (${r.at.toLocaleTimeString()})`;
  } else {
    ui.recovery.hidden = true;
  }

  const list = ui.messages;
  const atBottom = list.scrollTop + list.clientHeight >= list.scrollHeight - 30;
  list.replaceChildren(...(v ? v.items.map(drawItem) : []));
  if (atBottom) list.scrollTop = list.scrollHeight;

  const members = v ? [...v.members.entries()].sort((a, b) => a[1].localeCompare(b[1])) : [];
  ui.memberCount.textContent = String(members.length);
  const me = client?.connection?.clientId;
  ui.members.replaceChildren(
    ...members.map(([clientId, user]) => {
      const li = el("li", undefined, user);
      li.dataset.testid = "member";
      li.title = clientId;
      if (clientId === me) li.append(" ", el("span", "me", "(you)"));
      return li;
    }),
  );
}

function drawItem(item: Item): HTMLLIElement {
  if (item.kind === "notice") {
    const li = el("li", item.error ? "notice error" : "notice", item.text);
    li.dataset.testid = "notice";
    return li;
  }
  const li = el("li", item.mine ? "mine" : undefined);
  li.dataset.testid = "message";
  if (item.offset !== undefined) li.dataset.offset = String(item.offset);
  li.append(el("span", "user", item.user), el("span", "text", item.text));
  if (item.failed) li.append(el("span", "offset error", `not sent: ${item.failed}`));
  else if (item.offset === undefined) li.classList.add("pending");
  else li.append(el("span", "offset", `#${item.offset}`));
  return li;
}

// ---- forms ----

ui.tokenForm.onsubmit = (e) => {
  e.preventDefault();
  const token = ui.token.value.trim();
  if (token) start(token);
};
ui.joinForm.onsubmit = (e) => {
  e.preventDefault();
  const name = ui.roomName.value.trim();
  if (!name || !client) return;
  join(name);
  select(name);
  ui.roomName.value = "";
};
ui.sendForm.onsubmit = (e) => {
  e.preventDefault();
  const text = ui.text.value.trim();
  if (!text) return;
  send(text);
  ui.text.value = "";
};
ui.leave.onclick = () => {
  if (current) void leave(current);
};

const initial = params.get("token") ?? "";
ui.token.value = initial;
if (initial) start(initial);
else setState("disconnected", "paste a token to connect");
draw();
