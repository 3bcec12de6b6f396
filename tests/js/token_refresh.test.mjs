// The bundled JS client (host/static/client.js) with --auth jwt, under Node's WebSocket: a
// client given `getToken` refreshes before its token expires and stays connected past the
// first token's `exp`; a client without it is closed with 4001 `token expired`.
//
//   node --experimental-websocket tests/js/token_refresh.test.mjs PATH_TO_FANFARE

import { createHmac } from "node:crypto";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { FanfareClient } from "../../host/static/client.js";
import { startNode } from "./start-node.mjs";

const SECRET = "a-test-secret-that-is-at-least-32-bytes-long";
const binary = process.argv[2];
if (!binary) {
  console.error("usage: token_refresh.test.mjs PATH_TO_FANFARE");
  process.exit(2);
}

function token(sub, lifetimeS) {
  const b64 = (value) => Buffer.from(JSON.stringify(value)).toString("base64url");
  const body = `${b64({ alg: "HS256", typ: "JWT" })}.${b64({ sub, exp: Math.floor(Date.now() / 1000) + lifetimeS })}`;
  return `${body}.${createHmac("sha256", SECRET).update(body).digest("base64url")}`;
}

function startJwtNode(dataDir) {
  const args = ["--listen", "127.0.0.1:0", "--data-dir", dataDir, "--auth", "jwt", "--jwt-secret", SECRET, "--jwt-leeway", "0"];
  return startNode(binary, args);
}

function states(client) {
  const seen = [];
  client.addEventListener("state", (e) => seen.push(e.detail));
  return seen;
}

const dataDir = mkdtempSync(join(tmpdir(), "fanfare-js-"));
let node = null;
let failed = false;
try {
  node = await startJwtNode(dataDir);
  const url = `ws://${node.addr}/v1/ws`;
  let handedOut = 0;
  const refreshing = new FanfareClient(url, {
    token: token("ana", 3),
    getToken: async () => {
      handedOut += 1;
      return token("ana", 600);
    },
  });
  const plain = new FanfareClient(url, { token: token("bo", 3) });
  const refreshingStates = states(refreshing);
  const plainStates = states(plain);
  refreshing.connect();
  plain.connect();
  await refreshing.subscribe("js:refresh");
  await plain.subscribe("js:refresh");
  await new Promise((resolve) => setTimeout(resolve, 5000));

  const ack = await refreshing.like("js:refresh");
  if (handedOut < 1) throw new Error("getToken was never called");
  if (refreshingStates.some((s) => s.state === "reconnecting")) {
    throw new Error(`the refreshing client was disconnected: ${JSON.stringify(refreshingStates)}`);
  }
  if (ack.count !== 1) throw new Error(`ack ${JSON.stringify(ack)}`);
  const closed = plainStates.find((s) => s.state === "reconnecting");
  if (!closed || closed.code !== 4001) {
    throw new Error(`the client without getToken was not closed with 4001: ${JSON.stringify(plainStates)}`);
  }
  refreshing.close();
  plain.close();
  console.log("token refresh: ok (getToken called", handedOut, "time(s); the other client closed with 4001)");
} catch (err) {
  failed = true;
  console.error("token refresh test failed:", err);
} finally {
  node?.child.kill("SIGKILL");
  rmSync(dataDir, { recursive: true, force: true });
}
process.exit(failed ? 1 : 0);
