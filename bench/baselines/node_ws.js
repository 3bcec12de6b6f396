// The usual Node.js choice, as a benchmark peer: the `ws` package with rooms in a Map.
// Same protocol-v1 subset as python_mvp.py. Usage: node node_ws.js PORT
import { WebSocketServer } from "ws";

const port = Number(process.argv[2]);
const rooms = new Map(); // track -> Set<ws>
const counts = new Map();
const wss = new WebSocketServer({ host: "127.0.0.1", port, maxPayload: 4096 });

wss.on("connection", (ws, req) => {
  const user = new URL(req.url, "http://x").searchParams.get("user") ?? "anon";
  const mine = new Set();
  ws.send(JSON.stringify({ type: "welcome", user, heartbeat_ms: 30000 }));
  ws.on("message", (data) => {
    let frame;
    try { frame = JSON.parse(data); } catch { return; }
    const { type, track } = frame;
    if (type === "subscribe") {
      if (!rooms.has(track)) rooms.set(track, new Set());
      rooms.get(track).add(ws);
      mine.add(track);
      ws.send(JSON.stringify({ type: "subscribed", track, count: counts.get(track) ?? 0 }));
    } else if (type === "like" || type === "unlike") {
      const count = (counts.get(track) ?? 0) + (type === "like" ? 1 : -1);
      counts.set(track, count);
      ws.send(JSON.stringify({ type: "ack", id: frame.id, track, count, duplicate: false }));
      const update = JSON.stringify({ type: "likes", track, count, delta: 1, recent: [{ user, id: frame.id, action: type }] });
      for (const other of rooms.get(track) ?? []) if (other !== ws && other.readyState === 1) other.send(update);
    } else if (type === "ping") {
      ws.send('{"type":"pong"}');
    }
  });
  ws.on("close", () => { for (const track of mine) rooms.get(track)?.delete(ws); });
});
wss.on("listening", () => console.log(`node-ws listening on http://127.0.0.1:${port}`));
