import { useState } from "react";
import { useRoom } from "roomcast/react";

export function Chat({ room }: { room: string }) {
  // Joins while mounted and re-joins after every reconnect with `since`: `messages` has each
  // message once, in order, including the ones missed while the connection was down.
  const { joined, messages, members, recovered, error, publish } = useRoom(room);
  const [text, setText] = useState("");
  const [sendError, setSendError] = useState<string>();

  const send = async () => {
    const body = text.trim();
    if (!body) return;
    setText("");
    try {
      // Sent when joined (queued while reconnecting), retried safely with an idempotency key.
      await publish({ text: body });
      setSendError(undefined);
    } catch (e) {
      setSendError(String(e));
    }
  };

  return (
    <main>
      <section>
        <h2>
          {room} {joined ? "" : <small>(joining…)</small>}
        </h2>
        {error && <p className="error">{error.code}: {error.message}</p>}
        {recovered === false && <p className="error">Some messages could not be recovered; reload for the full history.</p>}
        <ol className="messages">
          {messages.map((m) => (
            <li key={`${m.epoch}:${m.offset}`}>
              <b>{m.user}</b> {textOf(m.data)}
            </li>
          ))}
        </ol>
        <form
          onSubmit={(e) => {
            e.preventDefault();
            void send();
          }}
        >
          <input value={text} onChange={(e) => setText(e.target.value)} placeholder="Say something" aria-label="message" />
          <button disabled={!text.trim()}>Send</button>
        </form>
        {sendError && <p className="error">{sendError}</p>}
      </section>
      <aside>
        <h3>Here now ({members.length})</h3>
        <ul>
          {members.map((m) => (
            <li key={m.clientId}>{m.user}</li>
          ))}
        </ul>
      </aside>
    </main>
  );
}

function textOf(data: unknown): string {
  if (data && typeof data === "object" && "text" in data && typeof data.text === "string") return data.text;
  return JSON.stringify(data);
}
