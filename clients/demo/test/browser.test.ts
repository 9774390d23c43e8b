// The demo page in headless Chromium (Debian's /usr/bin/chromium driven by playwright-core)
// against a real cluster with two gateways, each page reaching the gateways through a test
// proxy that stands in for the load balancer. Saves a screenshot to target/artifacts/demo.png.
import { mkdirSync, readdirSync, rmSync } from "node:fs";
import { resolve } from "node:path";
import { chromium, type Browser, type Page } from "playwright-core";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { startCluster, type TestCluster } from "../../js/test/cluster.js";
import { prefer, splitSse, startProxy, type TestProxy } from "../../js/test/proxy.js";
import { sseServed } from "../../js/test/server.js";

const chromiumPath = process.env.CHROMIUM_PATH ?? "/usr/bin/chromium";
const artifacts = resolve(import.meta.dirname, "../../../target/artifacts");
const WAIT = 15_000;

let cluster: TestCluster;
let browser: Browser;
let viaA: TestProxy; // gateway 0 first
let viaB: TestProxy; // gateway 1 first
let viaS: TestProxy; // SSE stream on gateway 0, POSTs on gateway 1
const pages: Record<string, Page> = {};
const errors: string[] = [];
const room = `chat-${process.pid}`;

beforeAll(async () => {
  mkdirSync(artifacts, { recursive: true });
  for (const f of readdirSync(artifacts)) if (f.startsWith("demo-failed-")) rmSync(resolve(artifacts, f));
  cluster = await startCluster({ gateways: 2 });
  const backends = cluster.gateways.map((g) => g.addr);
  viaA = await startProxy(backends, prefer(0));
  viaB = await startProxy(backends, prefer(1));
  viaS = await startProxy(backends, splitSse(0, 1));
  browser = await chromium.launch({
    executablePath: chromiumPath,
    // as root (CI) Chromium needs --no-sandbox; /dev/shm may be small in containers
    args: ["--no-sandbox", "--disable-dev-shm-usage"],
    timeout: 30_000,
  });
});

afterEach(async (ctx) => {
  // a failed test leaves a picture of every page for the CI artifacts
  if (ctx.task.result?.state !== "fail") return;
  mkdirSync(artifacts, { recursive: true });
  for (const [name, page] of Object.entries(pages)) {
    await page.screenshot({ path: resolve(artifacts, `demo-failed-${name}.png`) }).catch(() => {});
  }
});

afterAll(async () => {
  await browser?.close();
  for (const p of [viaA, viaB, viaS]) await p?.close();
  await cluster?.stop();
  if (errors.length) console.error(`page errors:\n${errors.join("\n")}`);
});

async function open(name: string, proxy: TestProxy, query = ""): Promise<Page> {
  const page = await browser.newPage({ viewport: { width: 1100, height: 640 } });
  page.setDefaultTimeout(WAIT);
  page.on("pageerror", (e) => errors.push(`${name}: ${e.message}`));
  await page.goto(`${proxy.url}/?token=${cluster.token({ sub: name })}${query}`);
  pages[name] = page;
  return page;
}

const byId = (page: Page, id: string) => page.getByTestId(id);
const text = async (page: Page, id: string) => (await byId(page, id).textContent())?.trim() ?? "";

async function waitText(page: Page, id: string, pattern: RegExp): Promise<string> {
  await byId(page, id).filter({ hasText: pattern }).first().waitFor({ timeout: WAIT });
  return text(page, id);
}

/** Waits for a message with this text in the page's current room; returns how many there are. */
async function seen(page: Page, body: string): Promise<number> {
  const m = byId(page, "message").filter({ hasText: body });
  await m.first().waitFor({ timeout: WAIT });
  return m.count();
}

async function joinRoom(page: Page, name: string): Promise<void> {
  await byId(page, "room-input").fill(name);
  await byId(page, "join-button").click();
  await waitText(page, "room-title", new RegExp(`^${name}$`));
  await byId(page, "notice").filter({ hasText: `joined ${name}` }).waitFor();
}

async function say(page: Page, body: string): Promise<void> {
  await byId(page, "message-input").fill(body);
  await byId(page, "send-button").click();
  // acknowledged: the server's offset is shown
  await page.locator("[data-testid=message][data-offset]").filter({ hasText: body }).waitFor();
}

describe("the demo page in Chromium against a two-gateway cluster", () => {
  it("two pages on two gateways chat, with members, rooms to switch between and history", async () => {
    const alice = await open("alice", viaA);
    const bob = await open("bob", viaB);
    for (const p of [alice, bob]) {
      await waitText(p, "conn-state", /^connected$/);
      expect(await text(p, "transport")).toBe("WebSocket");
      await waitText(p, "room-title", /^lobby$/); // joined at start
    }
    const gwA = (await text(alice, "identity")).split("gateway ")[1];
    const gwB = (await text(bob, "identity")).split("gateway ")[1];
    expect(gwA).toBeTruthy();
    expect(gwA).not.toBe(gwB);

    await joinRoom(alice, room);
    await say(alice, "hello from alice"); // before bob joins: bob gets it from history
    await joinRoom(bob, room);
    expect(await seen(bob, "hello from alice")).toBe(1);
    await byId(alice, "member").filter({ hasText: "bob" }).waitFor();
    await byId(bob, "member").filter({ hasText: "alice" }).waitFor();
    expect(await byId(bob, "member").count()).toBe(2);

    await say(bob, "hi alice");
    expect(await seen(alice, "hi alice")).toBe(1);

    // switch rooms: lobby does not show the room's messages, and back
    await byId(alice, "room-tab").filter({ hasText: "lobby" }).click();
    await waitText(alice, "room-title", /^lobby$/);
    expect(await byId(alice, "message").filter({ hasText: "hi alice" }).count()).toBe(0);
    await say(bob, "while you were in the lobby");
    await byId(alice, "room-tab").filter({ hasText: room }).locator(".badge").waitFor(); // unread count
    await byId(alice, "room-tab").filter({ hasText: room }).click();
    expect(await seen(alice, "while you were in the lobby")).toBe(1);
  });

  it("a page forced to SSE (?transport=sse) chats with the WebSocket pages; its POSTs land on the other gateway", async (ctx) => {
    if (!(await sseServed(cluster.gateways[0]!.httpUrl, cluster.token({ sub: "probe" })))) {
      ctx.skip("the gateways answer 404 on /sse");
      return;
    }
    const sam = await open("sam", viaS, "&transport=sse");
    await waitText(sam, "conn-state", /^connected$/);
    expect(await text(sam, "transport")).toBe("SSE");
    await joinRoom(sam, room);
    expect(await seen(sam, "hello from alice")).toBe(1); // history on join
    await say(sam, "hello over SSE");
    expect(await seen(pages.alice!, "hello over SSE")).toBe(1);
    expect(await seen(pages.bob!, "hello over SSE")).toBe(1);
    await say(pages.alice!, "welcome sam");
    expect(await seen(sam, "welcome sam")).toBe(1);
    await byId(pages.alice!, "member").filter({ hasText: "sam" }).waitFor();

    const streams = viaS.log.filter((e) => e.path === "/sse");
    const posts = viaS.log.filter((e) => e.path === "/sse/send" && e.method === "POST");
    expect(streams.length).toBeGreaterThanOrEqual(1);
    expect(streams.every((e) => e.backend === 0)).toBe(true);
    expect(posts.length).toBeGreaterThanOrEqual(2);
    expect(posts.every((e) => e.backend === 1 && e.status === 202)).toBe(true);
  });

  it("a page whose gateway is killed shows the reconnect and recovers the missed messages", async () => {
    const alice = pages.alice!;
    const bob = pages.bob!;
    // The load balancer has no healthy backend for alice for a moment, then sends her to the
    // other gateway: bob's messages meanwhile must come back through the re-join.
    viaA.down = true;
    cluster.kill9(0);
    expect(await waitText(alice, "conn-state", /reconnecting/)).toMatch(/reconnecting/);
    // the countdown runs: "reconnecting in N s"
    await waitText(alice, "conn-state", /reconnecting in \d+\.\d s/);
    for (let i = 1; i <= 3; i++) await say(bob, `missed ${i}`);
    expect(await text(alice, "conn-state")).not.toBe("connected");
    viaA.down = false;
    // backoff grows while the proxy refuses: allow for a few seconds' wait
    await byId(alice, "conn-state").filter({ hasText: /^connected$/ }).waitFor({ timeout: 40_000 });
    expect(await waitText(alice, "recovery", /3 missed messages recovered/)).toMatch(/^3 missed messages recovered/);
    for (let i = 1; i <= 3; i++) expect(await seen(alice, `missed ${i}`)).toBe(1);
    const gwB = (await text(bob, "identity")).split("gateway ")[1];
    expect(await text(alice, "identity")).toContain(`gateway ${gwB}`);
    // While her load balancer refused, her WebSocket attempts failed and the page may have
    // fallen back to SSE; WebSocket had worked, so it probes soon and goes back to it.
    const cameBackOver = await text(alice, "transport");
    await waitText(alice, "transport", /^WebSocket$/);
    console.log(`the page came back over ${cameBackOver}; now over ${await text(alice, "transport")}`);
    expect(await text(alice, "recovery")).toMatch(/^3 missed messages recovered/);
    // and the chat goes on
    await say(alice, "back again");
    expect(await seen(bob, "back again")).toBe(1);
    const sam = pages.sam;
    if (sam) {
      // The SSE page's stream was on the killed gateway too: its EventSource failed and the
      // page came back over SSE on the other one, with every message once.
      await byId(sam, "conn-state").filter({ hasText: /^connected$/ }).waitFor({ timeout: 40_000 });
      expect(await text(sam, "transport")).toBe("SSE");
      await byId(sam, "notice").filter({ hasText: /^(re-joined|reconnected)/ }).first().waitFor();
      for (const body of ["missed 1", "missed 2", "missed 3", "back again"]) expect(await seen(sam, body)).toBe(1);
    }
    await byId(alice, "member").filter({ hasText: "bob" }).waitFor();

    mkdirSync(artifacts, { recursive: true });
    await alice.screenshot({ path: resolve(artifacts, "demo.png") });
    expect(errors).toEqual([]);
  }, 90_000);
});
