// Builds the demo into one self-contained HTML file (script and style inline), the page the
// gateway embeds and serves at `/`: gateway/src/index.html.
//
//   node build.mjs                 write gateway/src/index.html
//   node build.mjs --out FILE      write FILE instead
//   node build.mjs --check         fail unless gateway/src/index.html equals a fresh build
import { build } from "esbuild";
import { readFileSync, writeFileSync } from "node:fs";
import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const target = resolve(here, "../../gateway/src/index.html");
const args = process.argv.slice(2);
const outIndex = args.indexOf("--out");
const out = outIndex >= 0 ? resolve(args[outIndex + 1]) : target;

const result = await build({
  entryPoints: [resolve(here, "src/main.ts")],
  bundle: true,
  format: "iife",
  platform: "browser",
  target: ["es2020"],
  minify: true,
  legalComments: "none",
  charset: "utf8",
  write: false,
  logLevel: "warning",
});
// Inside an inline <script>, "</script" would end it early.
const script = result.outputFiles[0].text.trim().replace(/<\/script/gi, "<\\/script");
const style = readFileSync(resolve(here, "src/style.css"), "utf8").trim();
const page = readFileSync(resolve(here, "src/page.html"), "utf8");
const html = page
  .replace("/*STYLE*/", () => `\n${style}\n`)
  .replace("/*SCRIPT*/", () => `\n${script}\n`);

if (args.includes("--check")) {
  let committed = "";
  try {
    committed = readFileSync(target, "utf8");
  } catch {
    // missing: reported below
  }
  if (committed !== html) {
    console.error(
      "gateway/src/index.html is not the build of clients/demo: run `npm ci && npm run build` in clients/js " +
        "and clients/demo, then commit gateway/src/index.html.",
    );
    process.exit(1);
  }
  console.log("gateway/src/index.html matches a fresh build of clients/demo");
} else {
  writeFileSync(out, html);
  console.log(`wrote ${out} (${html.length} bytes)`);
}
