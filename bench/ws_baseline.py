"""B_ws's server: the `websockets` library alone, holding idle connections and broadcasting a
frame to all of them when any client sends `broadcast <seq>`. Same event loop (uvloop), same
compression defaults and pinning as Clarion's uvicorn.

Usage: python -m bench.ws_baseline PORT
"""

from __future__ import annotations

import asyncio
import json
import sys

import websockets
from websockets.asyncio.server import ServerConnection, broadcast, serve

CLIENTS: set[ServerConnection] = set()


async def handler(connection: ServerConnection) -> None:
    CLIENTS.add(connection)
    try:
        async for message in connection:
            if isinstance(message, str) and message.startswith("broadcast "):
                seq = int(message.split()[1])
                frame = json.dumps({"type": "notification", "data": {"seq": seq}})
                broadcast(CLIENTS, frame)
    except websockets.ConnectionClosed:
        pass
    finally:
        CLIENTS.discard(connection)


async def main(port: int) -> None:
    async with serve(handler, "127.0.0.1", port, backlog=2048) as server:
        print(f"listening on 127.0.0.1:{port}", flush=True)
        await server.serve_forever()


if __name__ == "__main__":
    try:
        import uvloop
    except ImportError:
        asyncio.run(main(int(sys.argv[1])))
    else:
        uvloop.run(main(int(sys.argv[1])))
