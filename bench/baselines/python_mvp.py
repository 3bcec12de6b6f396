#!/usr/bin/env python3
"""The seed's MVP node, as a benchmark peer: Python asyncio `websockets`, an in-memory
registry (track -> set of sockets), and "iterate and send" for every like. Speaks the
protocol-v1 subset the load generator uses: welcome, subscribe/subscribed, like/ack and a
`likes` update per like (no windows, no durability, no once-only rule).

Usage: python_mvp.py PORT
"""
import asyncio
import json
import sys
from collections import defaultdict

import websockets

registry = defaultdict(set)
counts = defaultdict(int)


async def handler(ws):
    user = "anon"
    path = ws.request.path if hasattr(ws, "request") else "/"
    if "user=" in path:
        user = path.split("user=", 1)[1].split("&", 1)[0]
    await ws.send(json.dumps({"type": "welcome", "user": user, "heartbeat_ms": 30000}))
    mine = set()
    try:
        async for text in ws:
            frame = json.loads(text)
            kind, track = frame.get("type"), frame.get("track")
            if kind == "subscribe":
                registry[track].add(ws)
                mine.add(track)
                await ws.send(json.dumps({"type": "subscribed", "track": track, "count": counts[track]}))
            elif kind in ("like", "unlike"):
                counts[track] += 1 if kind == "like" else -1
                await ws.send(json.dumps({"type": "ack", "id": frame["id"], "track": track,
                                          "count": counts[track], "duplicate": False}))
                update = json.dumps({"type": "likes", "track": track, "count": counts[track], "delta": 1,
                                     "recent": [{"user": user, "id": frame["id"], "action": kind}]})
                for other in list(registry[track]):
                    if other is not ws:
                        try:
                            await other.send(update)
                        except websockets.ConnectionClosed:
                            pass
            elif kind == "ping":
                await ws.send('{"type":"pong"}')
    finally:
        for track in mine:
            registry[track].discard(ws)


async def main():
    port = int(sys.argv[1])
    async with websockets.serve(handler, "127.0.0.1", port, max_size=4096, ping_interval=None):
        print(f"python-mvp listening on http://127.0.0.1:{port}", flush=True)
        await asyncio.Future()


asyncio.run(main())
