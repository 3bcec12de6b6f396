// Headless Chromium against the real node: two pages on the same track, a click on one updates
// the other within 1 s; the node is killed and restarted and both pages reconnect by
// themselves and show the right count. Writes a screenshot as a test artifact.
//
//   node tests/browser/demo.test.mjs PATH_TO_FANFARE [ARTIFACT_DIR]

import { mkdtempSync, mkdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";
import { startNode as startNodeBinary } from "../js/start-node.mjs";

const binary = process.argv[2];
const artifacts = process.argv[3] ?? join(process.cwd(), "target", "browser-artifacts");
if (!binary) {
  console.error("usage: demo.test.mjs PATH_TO_FANFARE [ARTIFACT_DIR]");
  process.exit(2);
}
const dataDir = mkdtempSync(join(tmpdir(), "fanfare-browser-"));
let node = null;
let browser = null;

function startNode(listen) {
  return startNodeBinary(binary, ["--listen", listen, "--data-dir", dataDir]);
}

async function killNode() {
  const exited = new Promise((resolve) => node.child.once("exit", resolve));
  node.child.kill("SIGKILL");
  await exited;
}

const countOf = (page, track) => page.locator(`[data-count="${track}"]`);
const stateOf = (page) => page.evaluate(() => document.body.dataset.state);

async function waitFor(what, check, timeoutMs) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (await check()) return;
    if (Date.now() > deadline) throw new Error(`timed out: ${what}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

async function main() {
  node = await startNode("127.0.0.1:0");
  const base = `http://${node.addr}`;
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
      "--disable-sync", "--no-first-run", "--disable-quic"],
  });
  const context = await browser.newContext();
  const ana = await context.newPage();
  const bob = await context.newPage();
  await ana.goto(`${base}/?user=ana`);
  await bob.goto(`${base}/?user=bob`);
  for (const page of [ana, bob]) {
    await waitFor("pages connected", async () => (await stateOf(page)) === "connected", 10000);
  }

  // Listening now: both pages count the two of them on every track.
  for (const page of [ana, bob]) {
    await waitFor("both pages show 2 listening now", async () =>
      (await page.locator(`[data-listeners="demo:track-1"]`).textContent()) === "2 listening now", 5000);
  }
  console.log("ok  both pages show 2 listening now");

  // A click on one page updates the other within 1 s.
  const track = "demo:track-2";
  // A user clicks on the page in front: a page in the background gets one animation frame a
  // second, and the click's actionability checks wait for two of them.
  await ana.bringToFront();
  const clicked = Date.now();
  await ana.locator(`button[data-track="${track}"]`).click();
  await waitFor("bob sees ana's like within 1 s", async () => (await countOf(bob, track).textContent()) === "1", 1000);
  console.log(`ok  click on one page shown on the other in ${Date.now() - clicked} ms`);
  await waitFor("ana's ack latency shown", async () => (await ana.locator("#latency").textContent()).includes("ms"), 2000);
  const feed = await bob.locator("#feed").textContent();
  if (!feed.includes("ana liked")) throw new Error(`live feed missing the like: ${feed}`);

  // Kill the node and bring it back on the same address: pages reconnect on their own.
  const addr = node.addr;
  await killNode();
  await waitFor("pages notice the outage", async () => (await stateOf(ana)) === "reconnecting", 10000);
  node = await startNode(addr);
  for (const page of [ana, bob]) {
    await waitFor("pages reconnect by themselves", async () => (await stateOf(page)) === "connected", 20000);
    await waitFor("right count after restart", async () => (await countOf(page, track).textContent()) === "1", 5000);
  }
  console.log("ok  both pages reconnected after a restart and show the stored count");

  // And they are live again.
  await bob.bringToFront();
  await bob.locator(`button[data-track="${track}"]`).click();
  await waitFor("ana sees bob's like", async () => (await countOf(ana, track).textContent()) === "2", 2000);
  console.log("ok  updates flow again after the restart");

  mkdirSync(artifacts, { recursive: true });
  const shot = join(artifacts, "demo.png");
  await ana.screenshot({ path: shot, fullPage: true });
  console.log(`ok  screenshot: ${shot}`);
}

try {
  await main();
  console.log("browser test: passed");
} catch (err) {
  console.error(`browser test: FAILED: ${err.stack ?? err}`);
  process.exitCode = 1;
} finally {
  await browser?.close().catch(() => {});
  node?.child.kill("SIGKILL");
  rmSync(dataDir, { recursive: true, force: true });
}
