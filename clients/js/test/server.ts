// Starts a real `roomcast standalone` for the tests and mints HS256 tokens for it.
import { spawn, type ChildProcess } from "node:child_process";
import { createHmac, randomBytes } from "node:crypto";
import { existsSync } from "node:fs";
import { createServer } from "node:net";
import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const repoRoot = resolve(dirname(fileURLToPath(import.meta.url)), "../../..");

/** The gateway binary: ROOMCAST_BIN, else the workspace's debug build. */
export const gatewayBin = process.env.ROOMCAST_BIN ?? resolve(repoRoot, "target/debug/roomcast");

export function freePort(): Promise<number> {
  return new Promise((res, rej) => {
    const srv = createServer();
    srv.unref();
    srv.on("error", rej);
    srv.listen(0, "127.0.0.1", () => {
      const port = (srv.address() as { port: number }).port;
      srv.close(() => res(port));
    });
  });
}

const b64url = (b: Buffer | string) => Buffer.from(b).toString("base64url");

export function mintToken(
  secret: string,
  claims: { sub: string; exp?: number; rooms?: string[]; publish?: string[] },
): string {
  const header = b64url(JSON.stringify({ alg: "HS256", typ: "JWT" }));
  const body = b64url(JSON.stringify({ exp: Math.floor(Date.now() / 1000) + 3600, ...claims }));
  const sig = createHmac("sha256", secret).update(`${header}.${body}`).digest("base64url");
  return `${header}.${body}.${sig}`;
}

export interface TestServer {
  url: string;
  secret: string;
  token(claims: { sub: string; exp?: number; rooms?: string[]; publish?: string[] }): string;
  stop(): Promise<void>;
}

export async function startServer(env: Record<string, string> = {}): Promise<TestServer> {
  if (!existsSync(gatewayBin)) {
    throw new Error(
      `${gatewayBin} not found: build it first (cargo build -p roomcast) or set ROOMCAST_BIN`,
    );
  }
  const secret = randomBytes(24).toString("hex");
  const port = await freePort();
  const apiPort = await freePort();
  const child: ChildProcess = spawn(gatewayBin, ["standalone"], {
    env: {
      ...process.env,
      GATEWAY_ADDR: `127.0.0.1:${port}`,
      ROOM_SERVICE_ADDR: `127.0.0.1:${apiPort}`,
      JWT_SECRET: secret,
      RUST_LOG: process.env.RUST_LOG ?? "warn",
      ...env,
    },
    stdio: ["ignore", "ignore", "pipe"],
  });
  let stderr = "";
  child.stderr?.on("data", (d: Buffer) => {
    stderr += d.toString();
  });
  let exited = false;
  child.on("exit", () => {
    exited = true;
  });
  const deadline = Date.now() + 15_000;
  for (;;) {
    if (exited) throw new Error(`roomcast standalone exited early:\n${stderr}`);
    try {
      const r = await fetch(`http://127.0.0.1:${port}/readyz`);
      if (r.ok) break;
    } catch {
      // not listening yet
    }
    if (Date.now() > deadline) {
      child.kill("SIGKILL");
      throw new Error(`roomcast standalone not ready after 15 s:\n${stderr}`);
    }
    await new Promise((r) => setTimeout(r, 50));
  }
  return {
    url: `ws://127.0.0.1:${port}/ws`,
    secret,
    token: (claims) => mintToken(secret, claims),
    stop: () =>
      new Promise<void>((res) => {
        if (exited) return res();
        child.once("exit", () => res());
        child.kill("SIGKILL");
      }),
  };
}

/** Resolves when `cond()` holds, polling; rejects after `ms`. */
export async function waitFor(cond: () => boolean, ms = 5000, what = "condition"): Promise<void> {
  const deadline = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

/**
 * Whether the gateway at `httpUrl` serves the SSE fallback (one without it answers 404). When
 * it does not, the caller skips its SSE tests, and says so loudly.
 */
export async function sseServed(httpUrl: string, token: string): Promise<boolean> {
  const res = await fetch(`${httpUrl}/sse?token=${token}`, { signal: AbortSignal.timeout(5000) });
  await res.body?.cancel();
  if (res.status !== 404) return true;
  const note = "SKIPPED: the gateway answers 404 on /sse (no SSE fallback on the server yet)";
  console.error(`\n${"!".repeat(90)}\n!! ${note}\n${"!".repeat(90)}\n`);
  return false;
}
