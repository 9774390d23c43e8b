import { useState } from "react";
import { RoomcastProvider, useRoomcast } from "roomcast/react";
import { Chat } from "./Chat";

// The gateway's WebSocket endpoint: `roomcast standalone` listens on 127.0.0.1:8080. Another
// one with ?gateway=ws://host:port/ws, or VITE_ROOMCAST_URL when building.
const params = new URLSearchParams(location.search);
const GATEWAY_URL = params.get("gateway") ?? import.meta.env.VITE_ROOMCAST_URL ?? "ws://127.0.0.1:8080/ws";

export function App() {
  // A real app gets its token from its own backend (pass `getToken` to useRoomcast so the
  // client can refresh it); here it is pasted, or given as ?token= in the page's URL.
  const [token, setToken] = useState(() => params.get("token") ?? "");
  if (!token) return <TokenForm onToken={setToken} />;
  return <Connected token={token} />;
}

function Connected({ token }: { token: string }) {
  const { client, state, connection, lastClose } = useRoomcast({ url: GATEWAY_URL, token });
  const [room, setRoom] = useState("lobby");

  return (
    <RoomcastProvider client={client}>
      <header>
        <strong>Roomcast chat</strong>
        <span className={`state ${state}`}>{state}</span>
        {connection && (
          <span className="muted">
            {connection.user} via {connection.transport === "sse" ? "SSE" : "WebSocket"}
          </span>
        )}
        {state !== "connected" && lastClose && (
          <span className="muted">
            closed {lastClose.code} {lastClose.reason} {lastClose.willReconnect ? "(reconnecting)" : ""}
          </span>
        )}
        <RoomPicker room={room} onRoom={setRoom} />
      </header>
      {/* A new room name re-runs useRoom: it leaves the old room and joins the new one. */}
      <Chat room={room} />
    </RoomcastProvider>
  );
}

function RoomPicker({ room, onRoom }: { room: string; onRoom: (r: string) => void }) {
  const [draft, setDraft] = useState(room);
  return (
    <form
      className="picker"
      onSubmit={(e) => {
        e.preventDefault();
        if (draft.trim()) onRoom(draft.trim());
      }}
    >
      <input value={draft} onChange={(e) => setDraft(e.target.value)} aria-label="room" />
      <button>Switch room</button>
    </form>
  );
}

function TokenForm({ onToken }: { onToken: (t: string) => void }) {
  const [draft, setDraft] = useState("");
  return (
    <form
      className="token"
      onSubmit={(e) => {
        e.preventDefault();
        onToken(draft.trim());
      }}
    >
      <p>Paste the dev token that `roomcast standalone` printed:</p>
      <input value={draft} onChange={(e) => setDraft(e.target.value)} aria-label="token" />
      <button disabled={!draft.trim()}>Connect</button>
    </form>
  );
}
