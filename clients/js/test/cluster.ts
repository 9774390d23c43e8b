// Starts a real cluster with `target/debug/roomcast-cluster` (redis-server, auth-service,
// room-service, gateways on free ports) for the tests, and kills single gateways with SIGKILL.
import { spawn, type ChildProcess } from "node:child_process";
import { randomBytes } from "node:crypto";
import { existsSync, mkdtempSync, readdirSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { mintToken } from "./server.js";

const repoRoot = resolve(import.meta.dirname, "../../..");

/** ROOMCAST_CLUSTER_BIN, else the workspace's debug build. */
export const clusterBin = process.env.ROOMCAST_CLUSTER_BIN ?? resolve(repoRoot, "target/debug/roomcast-cluster");

export interface Gateway {
  /** `ws://127.0.0.1:P/ws` */
  wsUrl: string;
  /** `http://127.0.0.1:P` */
  httpUrl: string;
  /** `127.0.0.1:P` */
  addr: string;
  pid: number;
}

export interface TestCluster {
  gateways: Gateway[];
  secret: string;
  logDir: string;
  token(claims: { sub: string; exp?: number; rooms?: string[]; publish?: string[] }): string;
  /** SIGKILL for gateway `i` (no drain, no close frames: its connections just drop). */
  kill9(i: number): void;
  stop(): Promise<void>;
}

export interface ClusterOptions {
  gateways?: number;
  roomServices?: number;
  /** `KEY=VALUE` settings for every gateway. */
  gatewayEnv?: Record<string, string | number>;
}

/** Child processes of `pid` (from /proc: the cluster command's direct children). */
function childrenOf(pid: number): number[] {
  const out: number[] = [];
  for (const entry of readdirSync("/proc")) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const stat = readFileSync(`/proc/${entry}/stat`, "utf8");
      // the command may contain spaces and parentheses: fields follow the last ')'
      const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
      if (Number(fields[1]) === pid) out.push(Number(entry));
    } catch {
      // gone meanwhile
    }
  }
  return out;
}

function envOf(pid: number): Map<string, string> {
  const env = new Map<string, string>();
  for (const kv of readFileSync(`/proc/${pid}/environ`, "utf8").split("\0")) {
    const i = kv.indexOf("=");
    if (i > 0) env.set(kv.slice(0, i), kv.slice(i + 1));
  }
  return env;
}

export async function startCluster(opts: ClusterOptions = {}): Promise<TestCluster> {
  if (!existsSync(clusterBin)) {
    throw new Error(`${clusterBin} not found: build it first (cargo build --workspace) or set ROOMCAST_CLUSTER_BIN`);
  }
  const secret = randomBytes(24).toString("hex");
  const logDir = mkdtempSync(join(tmpdir(), "roomcast-sdk-cluster-"));
  const args = [
    "--gateways",
    String(opts.gateways ?? 2),
    "--room-services",
    String(opts.roomServices ?? 1),
    "--secret",
    secret,
    "--log-dir",
    logDir,
  ];
  for (const [k, v] of Object.entries(opts.gatewayEnv ?? {})) args.push("--gateway-env", `${k}=${v}`);
  const child: ChildProcess = spawn(clusterBin, args, {
    env: { ...process.env, RUST_LOG: process.env.RUST_LOG ?? "warn" },
    stdio: ["ignore", "pipe", "pipe"],
  });
  let output = "";
  let exited = false;
  child.stdout?.on("data", (d: Buffer) => (output += d.toString()));
  child.stderr?.on("data", (d: Buffer) => (output += d.toString()));
  child.on("exit", () => (exited = true));

  const deadline = Date.now() + 30_000;
  while (!output.includes("Ctrl-C or SIGTERM stops everything")) {
    if (exited) throw new Error(`roomcast-cluster exited during start-up:\n${output}`);
    if (Date.now() > deadline) {
      child.kill("SIGTERM");
      throw new Error(`roomcast-cluster not up after 30 s:\n${output}`);
    }
    await new Promise((r) => setTimeout(r, 50));
  }
  const urls = [...output.matchAll(/gateway \d+:\s+(ws:\/\/(\S+)\/ws)\s+\(http (\S+)\/healthz/g)];
  const children = childrenOf(child.pid!);
  const gateways: Gateway[] = urls.map(([, wsUrl, addr, httpUrl]) => {
    const pid = children.find((p) => {
      try {
        return envOf(p).get("GATEWAY_ADDR") === addr;
      } catch {
        return false;
      }
    });
    if (pid === undefined) throw new Error(`no gateway process listening on ${addr}:\n${output}`);
    return { wsUrl: wsUrl!, addr: addr!, httpUrl: httpUrl!, pid };
  });
  const killed = new Set<number>();
  return {
    gateways,
    secret,
    logDir,
    token: (claims) => mintToken(secret, claims),
    kill9: (i) => {
      const g = gateways[i]!;
      killed.add(g.pid);
      process.kill(g.pid, "SIGKILL");
    },
    stop: async () => {
      if (exited) return;
      const done = new Promise<void>((r) => child.once("exit", () => r()));
      child.kill("SIGTERM");
      const timeout = new Promise<"timeout">((r) => setTimeout(() => r("timeout"), 10_000).unref());
      if ((await Promise.race([done, timeout])) === "timeout") {
        // leave nothing running: the cluster's children first, then the command
        for (const p of childrenOf(child.pid!)) {
          try {
            process.kill(p, "SIGKILL");
          } catch {
            // already gone
          }
        }
        child.kill("SIGKILL");
        await done;
      }
    },
  };
}
