// A small HTTP + WebSocket reverse proxy standing in for a load balancer in the tests: each
// request (and each WebSocket upgrade) goes to the first reachable backend in the order a
// routing function gives, and every routed request is logged, so a test can show where the
// SSE stream and the POSTs of one client landed.
import { createServer, request, type IncomingMessage, type Server } from "node:http";
import { connect as tcpConnect, type Socket } from "node:net";

export interface Routed {
  method: string;
  path: string;
  /** Index of the backend that took it. */
  backend: number;
  status?: number;
}

export interface TestProxy {
  /** `http://127.0.0.1:P` */
  url: string;
  /** `ws://127.0.0.1:P/ws` */
  wsUrl: string;
  log: Routed[];
  /** While down, requests get 503 and upgrades are dropped (a load balancer without a healthy backend). */
  down: boolean;
  close(): Promise<void>;
}

/** The backends to try for a request, in order (indices into `backends`). */
export type Route = (req: IncomingMessage) => number[];

/**
 * `backends` are `host:port`. A backend that refuses the connection is skipped; one that fails
 * after the request was sent is not retried (the request may have run): the client gets 502,
 * as behind a real load balancer.
 */
export async function startProxy(backends: string[], route: Route): Promise<TestProxy> {
  const sockets = new Set<Socket>();
  const log: Routed[] = [];
  const state = { down: false };

  const server: Server = createServer((req, res) => {
    if (state.down) {
      res.writeHead(503).end("no backend");
      return;
    }
    const chunks: Buffer[] = [];
    req.on("data", (c: Buffer) => chunks.push(c));
    req.on("end", () => {
      const body = Buffer.concat(chunks);
      const order = route(req);
      const attempt = (k: number): void => {
        if (k >= order.length) {
          res.writeHead(502).end("no backend reachable");
          return;
        }
        const backend = order[k]!;
        const [host, port] = backends[backend]!.split(":");
        const entry: Routed = { method: req.method ?? "GET", path: (req.url ?? "/").split("?")[0]!, backend };
        let connected = false;
        const up = request({
          host,
          port: Number(port),
          method: req.method,
          path: req.url,
          headers: { ...req.headers, connection: "close" },
          agent: false,
        });
        up.on("socket", (s) => s.on("connect", () => (connected = true)));
        up.on("response", (upRes) => {
          entry.status = upRes.statusCode;
          log.push(entry);
          res.writeHead(upRes.statusCode ?? 502, upRes.headers);
          res.flushHeaders();
          upRes.pipe(res);
          // a backend that dies mid-stream: end the client's response without a clean end
          upRes.on("error", () => res.destroy());
          upRes.on("aborted", () => res.destroy());
          upRes.socket.on("close", () => {
            if (!upRes.complete) res.destroy();
          });
        });
        up.on("error", () => {
          if (!connected) attempt(k + 1);
          else if (!res.headersSent) res.writeHead(502).end("backend failed");
          else res.destroy();
        });
        res.on("close", () => up.destroy());
        up.end(body);
      };
      attempt(0);
    });
  });

  server.on("upgrade", (req: IncomingMessage, client: Socket, head: Buffer) => {
    sockets.add(client);
    client.on("close", () => sockets.delete(client));
    client.on("error", () => client.destroy());
    if (state.down) {
      client.end("HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n");
      return;
    }
    const order = route(req);
    const attempt = (k: number): void => {
      if (k >= order.length) {
        client.end("HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n");
        return;
      }
      const backend = order[k]!;
      const [host, port] = backends[backend]!.split(":");
      const up = tcpConnect({ host: host!, port: Number(port) });
      sockets.add(up);
      up.on("close", () => sockets.delete(up));
      let connected = false;
      up.on("connect", () => {
        connected = true;
        log.push({ method: "UPGRADE", path: (req.url ?? "/").split("?")[0]!, backend });
        let head0 = `${req.method} ${req.url} HTTP/1.1\r\n`;
        for (let i = 0; i < req.rawHeaders.length; i += 2) head0 += `${req.rawHeaders[i]}: ${req.rawHeaders[i + 1]}\r\n`;
        up.write(head0 + "\r\n");
        if (head.length) up.write(head);
        up.pipe(client);
        client.pipe(up);
        up.on("close", () => client.destroy());
        client.on("close", () => up.destroy());
      });
      up.on("error", () => {
        if (!connected) attempt(k + 1);
        else client.destroy();
      });
    };
    attempt(0);
  });
  server.on("connection", (s: Socket) => {
    sockets.add(s);
    s.on("close", () => sockets.delete(s));
  });

  await new Promise<void>((r) => server.listen(0, "127.0.0.1", () => r()));
  const port = (server.address() as { port: number }).port;
  return {
    url: `http://127.0.0.1:${port}`,
    wsUrl: `ws://127.0.0.1:${port}/ws`,
    log,
    get down() {
      return state.down;
    },
    set down(v: boolean) {
      state.down = v;
    },
    close: () =>
      new Promise<void>((r) => {
        for (const s of sockets) s.destroy();
        server.close(() => r());
      }),
  };
}

/** Everything to `first`, then the other backend (failover): a client "on" gateway `first`. */
export const prefer =
  (first: number, count = 2): Route =>
  () =>
    [first, ...Array.from({ length: count }, (_, i) => i).filter((i) => i !== first)];

/**
 * SSE streams to `stream` and POSTs to `send` (each failing over to the other): a client whose
 * commands always land on another gateway than its session's while both are up.
 */
export const splitSse =
  (stream: number, send: number): Route =>
  (req) =>
    (req.url ?? "").startsWith("/sse/send") ? [send, stream] : [stream, send];
