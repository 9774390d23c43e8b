/**
 * React hooks for the Roomcast client (`roomcast/react`). React is a peer dependency of this
 * entry point only; the core client has none.
 */
import {
  createContext,
  createElement,
  useCallback,
  useContext,
  useEffect,
  useRef,
  useState,
  type ReactNode,
} from "react";
import { connect, type ConnectedInfo, type ConnectOptions, type ConnectionState, type RoomcastClient } from "./client.js";
import type { RoomcastError } from "./errors.js";
import type { Json, Member, MessageFrame } from "./protocol.js";
import type { PublishOptions, Room } from "./room.js";

const Context = createContext<RoomcastClient | null>(null);

/** Makes `client` the one `useRoom` uses below it. */
export function RoomcastProvider(props: { client: RoomcastClient | null; children?: ReactNode }) {
  return createElement(Context.Provider, { value: props.client }, props.children);
}

export interface UseRoomcast {
  /** Null until the effect ran (first render, server rendering). */
  client: RoomcastClient | null;
  state: ConnectionState;
  connection: ConnectedInfo | undefined;
  /** The last `disconnected` event's code and reason. */
  lastClose: { code: number; reason: string; willReconnect: boolean } | undefined;
}

/**
 * Creates a client for `options.url` and closes it on unmount. Only a change of `url` makes a
 * new connection: a new `token` is handed to the open connection with `refresh`, and
 * `getToken` is read at call time, so re-renders with new option objects cause no reconnect.
 * Under StrictMode's mount-unmount-mount the first client is closed before it opens a socket.
 */
export function useRoomcast(options: ConnectOptions): UseRoomcast {
  const optionsRef = useRef(options);
  optionsRef.current = options;
  const [client, setClient] = useState<RoomcastClient | null>(null);
  const [state, setState] = useState<ConnectionState>("disconnected");
  const [connection, setConnection] = useState<ConnectedInfo | undefined>(undefined);
  const [lastClose, setLastClose] = useState<UseRoomcast["lastClose"]>(undefined);

  useEffect(() => {
    const opts = optionsRef.current;
    const c = connect({
      ...opts,
      getToken: opts.getToken ? () => optionsRef.current.getToken!() : undefined,
      autoConnect: false,
    });
    const offs = [
      c.on("state", (s) => {
        setState(s);
        setConnection(c.connection);
      }),
      c.on("disconnected", (d) => setLastClose({ code: d.code, reason: d.reason, willReconnect: d.willReconnect })),
    ];
    setClient(c);
    // Opened after the commit, so StrictMode's immediate cleanup finds nothing to tear down.
    const timer = setTimeout(() => c.open(), 0);
    return () => {
      clearTimeout(timer);
      for (const off of offs) off();
      c.close();
      setClient((cur) => (cur === c ? null : cur));
    };
  }, [options.url]);

  // A new token (without getToken) goes to the open connection; no reconnect.
  const token = options.token;
  const first = useRef(true);
  useEffect(() => {
    if (first.current) {
      first.current = false;
      return;
    }
    if (client && token) client.setToken(token).catch(() => {});
  }, [client, token]);

  return { client, state, connection, lastClose };
}

export interface UseRoomOptions {
  /** The client; default: the one of the nearest `RoomcastProvider`. */
  client?: RoomcastClient | null;
  /** Messages kept in `messages` (default 200, the newest). */
  maxMessages?: number;
}

export interface UseRoom {
  room: Room | null;
  joined: boolean;
  /**
   * The room's messages since the hook joined, in offset order, each once; those published
   * through this hook's `publish` are added when the server acknowledges them (the server
   * does not send a connection its own messages).
   */
  messages: MessageFrame[];
  /** The members, from `presence` after each (re-)join, kept up to date by events. */
  members: Member[];
  /** False after a re-join that could not recover the gap: reload your state. */
  recovered: boolean | undefined;
  /** The last error (a join refused, a failed presence). */
  error: RoomcastError | undefined;
  publish: (data: unknown, opts?: PublishOptions) => Promise<{ offset: number }>;
}

// Components using the same room of the same client share one join.
const holders = new WeakMap<Room, number>();

/** `m` placed by offset (it may be older than the newest: our own acknowledged late), once. */
function insertMessage(prev: MessageFrame[], m: MessageFrame, max: number): MessageFrame[] {
  let i = prev.length;
  while (i > 0 && prev[i - 1]!.epoch === m.epoch && prev[i - 1]!.offset > m.offset) i--;
  if (i > 0 && prev[i - 1]!.epoch === m.epoch && prev[i - 1]!.offset === m.offset) return prev;
  const next = [...prev.slice(0, i), m, ...prev.slice(i)];
  return next.length > max ? next.slice(next.length - max) : next;
}

/**
 * Joins `name` while mounted (components sharing a room share the join) and returns its
 * messages, members and a `publish` function.
 */
export function useRoom(name: string, opts: UseRoomOptions = {}): UseRoom {
  const fromContext = useContext(Context);
  const client = opts.client !== undefined ? opts.client : fromContext;
  const max = opts.maxMessages ?? 200;
  const maxRef = useRef(max);
  maxRef.current = max;
  const [room, setRoom] = useState<Room | null>(null);
  const [joined, setJoined] = useState(false);
  const [messages, setMessages] = useState<MessageFrame[]>([]);
  const [members, setMembers] = useState<Member[]>([]);
  const [recovered, setRecovered] = useState<boolean | undefined>(undefined);
  const [error, setError] = useState<RoomcastError | undefined>(undefined);

  useEffect(() => {
    if (!client || client.closed) return;
    const r = client.room(name);
    let active = true;
    setRoom(r);
    setMessages([]);
    setMembers([]);
    setRecovered(undefined);
    setError(undefined);
    const loadPresence = () => {
      r.presence().then(
        (m) => active && setMembers(m),
        (e: RoomcastError) => active && e.code !== "closed" && setError(e),
      );
    };
    const offs = [
      r.on("message", (m) => setMessages((prev) => insertMessage(prev, m, maxRef.current))),
      r.on("member_joined", (m) =>
        setMembers((prev) => (prev.some((x) => x.clientId === m.clientId) ? prev : [...prev, { user: m.user, clientId: m.clientId }])),
      ),
      r.on("member_left", (m) => setMembers((prev) => prev.filter((x) => x.clientId !== m.clientId))),
      r.on("joined", () => {
        setJoined(true);
        loadPresence();
      }),
      r.on("recovery", (info) => setRecovered(info.recovered)),
      r.on("error", (e) => setError(e)),
      client.on("state", (s) => {
        if (s !== "connected") setJoined(false);
      }),
    ];
    holders.set(r, (holders.get(r) ?? 0) + 1);
    if (r.joined) {
      setJoined(true);
      loadPresence();
    }
    r.join().catch((e: RoomcastError) => {
      if (active && e.code !== "closed" && e.code !== "not_joined") setError(e);
    });
    return () => {
      active = false;
      for (const off of offs) off();
      const n = (holders.get(r) ?? 1) - 1;
      holders.set(r, n);
      if (n === 0) r.leave().catch(() => {});
      setJoined(false);
    };
  }, [client, name]);

  const roomRef = useRef(room);
  roomRef.current = room;
  const publish = useCallback(
    async (data: unknown, o?: PublishOptions) => {
      if (!room || !client) throw new Error("useRoom: no client yet");
      const result = await room.publish(data, o);
      const conn = client.connection;
      const epoch = room.lastSeen?.epoch;
      if (conn && epoch !== undefined && roomRef.current === room) {
        const own: MessageFrame = {
          type: "message",
          room: room.name,
          offset: result.offset,
          epoch,
          user: conn.user,
          clientId: conn.clientId,
          data: data as Json,
        };
        setMessages((prev) => insertMessage(prev, own, maxRef.current));
      }
      return result;
    },
    [room, client],
  );

  return { room, joined, messages, members, recovered, error, publish };
}
