// The built React example (examples/react-chat/dist, built by `npm run build` there, as
// scripts/test.sh does before these tests) in headless Chromium against roomcast standalone:
// a type-checked bundle can still fail at run time (two copies of React, say), this cannot.
import { existsSync, readFileSync } from "node:fs";
import { createServer, type Server } from "node:http";
import { extname, resolve } from "node:path";
import { chromium, type Browser, type Page } from "playwright-core";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { startServer, type TestServer } from "../../js/test/server.js";

const dist = resolve(import.meta.dirname, "../../../examples/react-chat/dist");
const chromiumPath = process.env.CHROMIUM_PATH ?? "/usr/bin/chromium";
const types: Record<string, string> = { ".html": "text/html", ".js": "text/javascript", ".css": "text/css" };

let gateway: TestServer;
let site: Server;
let siteUrl: string;
let browser: Browser;
const errors: string[] = [];

beforeAll(async () => {
  if (!existsSync(resolve(dist, "index.html"))) {
    throw new Error(`${dist} missing: run \`npm ci && npm run build\` in examples/react-chat first`);
  }
  gateway = await startServer();
  site = createServer((req, res) => {
    const path = (req.url ?? "/").split("?")[0]!;
    if (path === "/favicon.ico") {
      res.writeHead(204).end();
      return;
    }
    const file = resolve(dist, `.${path === "/" ? "/index.html" : path}`);
    if (!file.startsWith(dist) || !existsSync(file)) {
      res.writeHead(404).end();
      return;
    }
    res.writeHead(200, { "Content-Type": types[extname(file)] ?? "application/octet-stream" });
    res.end(readFileSync(file));
  });
  await new Promise<void>((r) => site.listen(0, "127.0.0.1", () => r()));
  siteUrl = `http://127.0.0.1:${(site.address() as { port: number }).port}`;
  browser = await chromium.launch({ executablePath: chromiumPath, args: ["--no-sandbox", "--disable-dev-shm-usage"] });
});

afterAll(async () => {
  await browser?.close();
  await new Promise((r) => (site ? site.close(r) : r(undefined)));
  await gateway?.stop();
});

async function open(user: string): Promise<Page> {
  const page = await browser.newPage();
  page.setDefaultTimeout(15_000);
  page.on("pageerror", (e) => errors.push(`${user}: ${e.message}`));
  page.on("console", (m) => m.type() === "error" && errors.push(`${user}: ${m.text()}`));
  const q = new URLSearchParams({ token: gateway.token({ sub: user }), gateway: gateway.url });
  await page.goto(`${siteUrl}/?${q}`);
  await page.locator(".state.connected").waitFor();
  return page;
}

describe("examples/react-chat", () => {
  it("two tabs chat in the lobby and see each other as members", async () => {
    const ann = await open("ann");
    const ben = await open("ben");
    for (const p of [ann, ben]) await p.getByRole("heading", { name: /^lobby\s*$/ }).waitFor();
    await ann.getByRole("listitem").filter({ hasText: /^ben$/ }).waitFor();
    await ann.getByRole("textbox", { name: "message" }).fill("hi from ann");
    await ann.getByRole("button", { name: "Send" }).click();
    // the sender's own message is in its list once acknowledged, and reaches the other tab
    await ann.locator(".messages li").filter({ hasText: "hi from ann" }).waitFor();
    await ben.locator(".messages li").filter({ hasText: "hi from ann" }).waitFor();
    await ben.getByRole("textbox", { name: "message" }).fill("hello ann");
    await ben.getByRole("button", { name: "Send" }).click();
    await ann.locator(".messages li").filter({ hasText: "hello ann" }).waitFor();
    expect(await ann.locator(".messages li").allTextContents()).toEqual(["ann hi from ann", "ben hello ann"]);
    expect(errors).toEqual([]);
  });
});
