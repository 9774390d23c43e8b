// The client against a real cluster (target/debug/roomcast-cluster: redis-server, auth-service,
// room-service, two gateways), over WebSocket and over SSE + POST: clients on both gateways,
// one publisher under load, one gateway killed with SIGKILL mid-run. Every client must end
// with every message exactly once, in order. Each client reaches the gateways through a test
// proxy standing in for the load balancer, which fails over when a gateway is gone.
import { afterAll, describe, expect, it } from "vitest";
import { connect, type RoomcastClient, type TransportName } from "../src/index.js";
import { startCluster, type TestCluster } from "./cluster.js";
import { prefer, splitSse, startProxy, type TestProxy } from "./proxy.js";
import { sseServed, waitFor } from "./server.js";

const cleanups: Array<() => Promise<void> | void> = [];
afterAll(async () => {
  for (const c of cleanups.reverse()) await c();
});

const TOTAL = 400;

describe.each(["websocket", "sse"] as const)("against a cluster over %s", (transport: TransportName) => {
  it(
    "every client gets every message exactly once and in order across a gateway killed with SIGKILL",
    async (ctx) => {
      const cluster = await startCluster({
        gateways: 2,
        // one publisher well over the default per-connection rate
        gatewayEnv: { PUBLISH_RATE: 2000, PUBLISH_BURST: 2000 },
      });
      cleanups.push(() => cluster.stop());
      if (transport === "sse" && !(await sseServed(cluster.gateways[0]!.httpUrl, cluster.token({ sub: "probe" })))) {
        ctx.skip("the gateways answer 404 on /sse");
        return;
      }
      const backends = cluster.gateways.map((g) => g.addr);
      // Over SSE each client's commands land on the other gateway than its stream's.
      const viaA = await startProxy(backends, transport === "sse" ? splitSse(0, 1) : prefer(0));
      const viaB = await startProxy(backends, transport === "sse" ? splitSse(1, 0) : prefer(1));
      cleanups.push(() => viaA.close(), () => viaB.close());

      const clients: RoomcastClient[] = [];
      const client = (sub: string, proxy: TestProxy) => {
        const c = connect({
          url: proxy.wsUrl,
          token: cluster.token({ sub }),
          transports: [transport],
          EventSource: null,
          commandTimeoutMs: 30_000,
          backoff: { initialMs: 300, maxMs: 1000 },
        });
        clients.push(c);
        return c;
      };
      cleanups.push(() => clients.forEach((c) => c.close()));

      const room = `load-${transport}-${process.pid}`;
      // Readers on gateway 0 (killed below) and on gateway 1; the publisher stays up on gateway 1.
      const readers = [
        ...["a0", "a1", "a2"].map((u) => ({ c: client(u, viaA), onKilled: true })),
        ...["b0", "b1", "b2"].map((u) => ({ c: client(u, viaB), onKilled: false })),
      ].map((r) => ({ ...r, got: [] as Array<{ data: number; offset: number }>, recoveries: [] as number[], drops: 0 }));
      for (const r of readers) {
        const rm = r.c.room(room);
        rm.on("message", (m) => r.got.push({ data: m.data as number, offset: m.offset }));
        rm.on("recovery", (info) => r.recoveries.push(info.recovered ? info.missed : -1));
        r.c.on("disconnected", () => r.drops++);
      }
      const publisher = client("pub", viaB);
      await Promise.all([...readers.map((r) => r.c.room(room).join()), publisher.room(room).join()]);
      expect(readers.map((r) => r.c.transport)).toEqual(Array(6).fill(transport));
      expect(new Set(readers.map((r) => r.c.connection!.gateway)).size).toBe(2);

      // Publish TOTAL messages, up to 16 in flight; kill gateway 0 after a third were stored.
      // Its readers' load balancer then has no backend until 60 more are stored (as while its
      // health checks notice), so they certainly miss messages and must recover them.
      const pubRoom = publisher.room(room);
      const acks: number[] = new Array(TOTAL);
      const inFlight = new Set<Promise<void>>();
      let stored = 0;
      let killedAt = -1;
      for (let i = 1; i <= TOTAL; i++) {
        const p: Promise<void> = pubRoom.publish(i).then(({ offset }) => {
          acks[i - 1] = offset;
          stored++;
          if (viaA.down && stored >= killedAt + 60) viaA.down = false;
          inFlight.delete(p);
        });
        inFlight.add(p);
        if (inFlight.size >= 16) await Promise.race(inFlight);
        if (killedAt < 0 && stored >= TOTAL / 3) {
          if (transport === "sse") {
            // Until now each client's POSTs went to the other gateway than its stream's, and
            // were accepted there: the commands reached the session's gateway through the broker.
            for (const [proxy, stream] of [[viaA, 0], [viaB, 1]] as const) {
              const gets = proxy.log.filter((e) => e.path === "/sse");
              const posts = proxy.log.filter((e) => e.path === "/sse/send");
              expect(gets.length).toBeGreaterThanOrEqual(1);
              expect(gets.every((e) => e.backend === stream && e.status === 200)).toBe(true);
              expect(posts.length).toBeGreaterThan(1);
              expect(posts.every((e) => e.backend !== stream && e.status === 202)).toBe(true);
            }
          }
          cluster.kill9(0);
          viaA.down = true;
          killedAt = stored;
        }
        await new Promise((r) => setTimeout(r, 2));
      }
      await Promise.all(inFlight);
      viaA.down = false;
      expect(killedAt).toBeGreaterThan(0);
      // Stored once each, in the order published (a retried publish got its first offset).
      expect(acks).toEqual(Array.from({ length: TOTAL }, (_, i) => i + 1));

      await waitFor(() => readers.every((r) => r.got.length >= TOTAL), 20_000, "every reader to get every message").catch(
        (err: Error) => {
          const status = readers.map(
            (r) => `${r.c.connection?.user ?? "?"}: ${r.c.state}, got ${r.got.length}, drops ${r.drops}, recoveries ${JSON.stringify(r.recoveries)}`,
          );
          throw new Error(`${err.message}\n${status.join("\n")}\nlogs: ${cluster.logDir}`);
        },
      );
      await new Promise((r) => setTimeout(r, 300)); // nothing more may arrive
      const expected = Array.from({ length: TOTAL }, (_, i) => ({ data: i + 1, offset: i + 1 }));
      for (const r of readers) expect(r.got).toEqual(expected);

      // The readers of the killed gateway dropped, came back on the other one and recovered
      // what was published meanwhile; the others never dropped.
      const survivor = readers.at(-1)!.c.connection!.gateway;
      for (const r of readers) {
        expect(r.c.state).toBe("connected");
        if (r.onKilled) {
          expect(r.drops).toBeGreaterThanOrEqual(1);
          expect(r.recoveries.length).toBeGreaterThanOrEqual(1);
          expect(r.recoveries.every((missed) => missed >= 0)).toBe(true); // no recovered: false
          expect(r.recoveries.reduce((a, b) => a + b, 0)).toBeGreaterThanOrEqual(60);
          expect(r.c.connection!.gateway).toBe(survivor);
        } else {
          expect(r.recoveries).toEqual([]);
        }
      }
      if (transport === "sse") {
        // after the kill, every stream and POST went to gateway 1
        const after = viaA.log.slice(viaA.log.findIndex((e, i) => i > 0 && e.path === "/sse" && e.backend === 1));
        expect(after.length).toBeGreaterThan(0);
        expect(after.every((e) => e.backend === 1)).toBe(true);
      }
    },
    90_000,
  );
});
