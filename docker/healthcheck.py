"""Container health check: exit 0 when /health/ready says the model is loaded, else 1.

Standard library only (it runs in the image's interpreter without importing the app).

It asks the port the server really listens on, whatever set it (`omni2 serve --port 18472`,
OMNI2_PORT, the image's default): the listening TCP sockets of the `omni2 ... serve` processes,
read from /proc (the check runs in the server's container, as the same user). Only where none
is found (the server is still starting, or /proc hides it) does it fall back to OMNI2_PORT,
then 8000. OMNI2_HEALTH_PORT / OMNI2_HEALTH_HOST override what is found (a server started
under another command line, a check run from elsewhere).
"""
from __future__ import annotations

import json
import os
import socket
import sys
import urllib.error
import urllib.request

TIMEOUT_S = 4.0
PROC = "/proc"
LISTEN = "0A"                     # TCP state in /proc/net/tcp{,6}


def is_server(argv: list[str]) -> bool:
    """`omni2 serve ...` however it was launched (console script, python -m, a wrapper)."""
    return "serve" in argv and any("omni2" in a for a in argv[:argv.index("serve")])


def server_pids(proc: str = PROC) -> list[int]:
    pids = []
    for entry in os.listdir(proc):
        if entry.isdigit():
            try:
                with open(f"{proc}/{entry}/cmdline", "rb") as f:
                    argv = f.read().decode(errors="replace").split("\0")
            except OSError:                     # gone, or not ours to read
                continue
            if is_server(argv):
                pids.append(int(entry))
    return pids


def socket_inodes(pid: int, proc: str = PROC) -> set[str]:
    inodes = set()
    try:
        fds = os.listdir(f"{proc}/{pid}/fd")
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(f"{proc}/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def decode_address(hex_addr: str) -> tuple[str, int]:
    """'0100007F:1F40' -> ('127.0.0.1', 8000): /proc/net/tcp{,6} store each 32-bit word of the
    address in host (little-endian) order, the port big-endian."""
    addr, port = hex_addr.split(":")
    raw = b"".join(bytes.fromhex(addr[i:i + 8])[::-1] for i in range(0, len(addr), 8))
    family = socket.AF_INET if len(raw) == 4 else socket.AF_INET6
    return socket.inet_ntop(family, raw), int(port, 16)


def listening(inodes: set[str], proc: str = PROC) -> list[tuple[str, int]]:
    """(address, port) of the listening sockets among `inodes`, in this network namespace."""
    found = []
    for table in ("tcp", "tcp6"):
        try:
            with open(f"{proc}/net/{table}") as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if len(cols) > 9 and cols[3] == LISTEN and cols[9] in inodes:
                found.append(decode_address(cols[1]))
    return sorted(set(found))


def connect_host(address: str) -> str:
    """Where to reach a listener bound to `address` from inside the container."""
    if address == "0.0.0.0":
        return "127.0.0.1"
    if address == "::":
        return "::1"
    return address


def url(host: str, port: int | str) -> str:
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{port}/health/ready"


def ready_urls(env=os.environ, proc: str = PROC) -> list[str]:
    host = env.get("OMNI2_HEALTH_HOST")
    if env.get("OMNI2_HEALTH_PORT"):
        return [url(host or "127.0.0.1", env["OMNI2_HEALTH_PORT"])]
    inodes = set().union(*(socket_inodes(pid, proc) for pid in server_pids(proc)))
    found = listening(inodes, proc) if inodes else []
    if found:   # several workers on one port are one listener; every distinct one must be ready
        return sorted({url(host or connect_host(a), p) for a, p in found})
    return [url(host or "127.0.0.1", env.get("OMNI2_PORT", "8000"))]


def check(url: str, timeout: float = TIMEOUT_S) -> tuple[bool, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            body = json.loads(response.read() or b"{}")
            return response.status == 200 and body.get("status") == "ready", json.dumps(body)
    except urllib.error.HTTPError as exc:       # 503 while loading, with the state in the body
        return False, f"HTTP {exc.code}: {exc.read(500).decode(errors='replace')}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return False, f"{type(exc).__name__}: {exc}"


def main() -> int:
    healthy = True
    for target in ready_urls():
        ok, detail = check(target)
        healthy &= ok
        print(("ready " if ok else "not ready ") + f"{target} {detail}")
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
