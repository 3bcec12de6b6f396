#!/usr/bin/env python3
"""Node memory per idle listener: N WebSockets against N server-sent-event streams.

    ulimit -n 20000; python3 bench/sse_memory.py FANFARE_BIN [listeners]

For each kind, a fresh node (loopback, free port); `listeners` connections each subscribe to
one of 100 tracks (WebSocket: `subscribe`; stream: GET /v1/tracks/{t}/events) and stay idle;
the node's RSS (VmRSS) before and after gives KiB per listener. Nodes are stopped by pid.
"""
import asyncio, json, os, signal, subprocess, sys, tempfile

import websockets

from loopback import free_port, wait_port

BIN = sys.argv[1]
N = int(sys.argv[2]) if len(sys.argv) > 2 else 5000


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


async def websocket(addr, i):
    ws = await websockets.connect(f"ws://{addr}/v1/ws?user=u{i}", open_timeout=30)
    await ws.recv()
    await ws.send(json.dumps({"type": "subscribe", "track": f"t{i % 100}"}))
    await ws.recv()
    return ws


async def stream(addr, i):
    host, port = addr.split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"GET /v1/tracks/t{i % 100}/events?user=u{i} HTTP/1.1\r\nHost: {addr}\r\n\r\n".encode())
    await writer.drain()
    while not (await reader.readline()).startswith(b"data: "):
        pass
    return writer


async def measure(kind, open_one):
    port = free_port()
    tmp = tempfile.mkdtemp()
    node = subprocess.Popen([BIN, "--listen", f"127.0.0.1:{port}", "--data-dir", tmp, "--log", "warn",
                             "--max-connections-per-ip", "100000", "--max-connections-per-user", "100000",
                             "--heartbeat-timeout", "600000"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        await wait_port(port)
        addr = f"127.0.0.1:{port}"
        warm = [await open_one(addr, 1_000_000 + i) for i in range(20)]
        await asyncio.sleep(1)
        before = rss_kib(node.pid)
        held = []
        for start in range(0, N, 500):
            held += await asyncio.gather(*[open_one(addr, i) for i in range(start, min(start + 500, N))])
        await asyncio.sleep(2)
        after = rss_kib(node.pid)
        print(f"{kind}: {N} idle listeners, node RSS {before / 1024:.1f} → {after / 1024:.1f} MiB, "
              f"{(after - before) / N:.2f} KiB per listener")
        del held, warm
    finally:
        node.send_signal(signal.SIGTERM)
        node.wait(15)
        subprocess.run(["rm", "-rf", tmp])


async def main():
    await measure("websocket", websocket)
    await measure("event stream", stream)


asyncio.run(main())
