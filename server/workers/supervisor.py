"""The parent of `omni2 serve --workers N`: binds the port, places connections, runs the
processes, restarts them.

Placement: the supervisor accepts every connection itself and hands it to one gateway over
that gateway's control socket (server/workers/placement.py). Policy, on purpose: fill, then
spill. Gateway 1 takes connections until it holds `gateway_share` (`--gateway-share`, 32 by
default), then gateway 2, and so on; once every gateway holds that many, the least loaded one
takes the next (ties: the lowest number). `--gateway-share 0` spreads evenly (always the least
loaded). Filling first is cheaper: a gateway's listening cost is mostly per pass, not per
session, so sessions packed into fewer gateways cost less CPU each; the share bounds what one
event loop (and one crash) carries. A gateway is given nothing until it reports that it serves,
and nothing once its control socket closes (it died or is restarting); while no gateway serves,
connections wait in the port's backlog. (Before, the gateways inherited the listening socket
and the kernel's wake-up order chose: one gateway could take 80 connections of 80 on a lightly
loaded host, and nobody decided.)

Restarts: a gateway that exits is started again at once (backoff only if it keeps dying); its
clients saw their connections end (1011 on a Python-level failure; a SIGKILL leaves the kernel
to reset them: the clients see 1006) and the engine freed their slots when the gateway fell
silent. An engine that exits is started again with exponential backoff; meanwhile every
gateway closes its sessions with 1011 and answers /health/ready 503. SIGTERM / SIGINT stop
every child (SIGTERM, then SIGKILL after a grace period) and leave none behind.
"""
from __future__ import annotations

import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import dataclasses
from dataclasses import dataclass
from typing import Optional

from ..client_secrets import new_key
from ..settings import ServerSettings
from .handoff import EXIT_MODEL_FAILED, SETTINGS_ENV, SUPERVISOR_ENV, settings_to_env
from .placement import GatewayLink, control_pair, place

log = logging.getLogger("omni2.server")

ENGINE_BACKOFF_S = (1.0, 30.0)      # first and longest wait before restarting the engine
GATEWAY_BACKOFF_S = (0.2, 10.0)
STABLE_S = 60.0                     # a process up this long resets its backoff
STOP_GRACE_S = 10.0                 # SIGTERM, then SIGKILL after this long
POLL_S = 0.1
ACCEPT_BATCH = 64                   # connections accepted per wake-up at most


def default_workers(device: str, cores: Optional[int] = None) -> int:
    """Gateway processes for `--workers auto`.

    On a CPU the model's decode step wants every core; gateway processes would take cores
    from it and add a hop, and the GIL of one process is far from full at the sessions a
    CPU can decode (issue 15: ~50 `vad` sessions per process): in-process (0). On a GPU the
    engine process keeps two cores (step loop, vocoder and prep threads) and each other core
    gets a gateway, up to 16."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if str(device).split(":")[0] != "cuda":
        return 0
    return max(1, min(16, cores - 2))


@dataclass
class Child:
    role: str                       # "engine" | "gateway"
    worker: int
    proc: Optional[subprocess.Popen] = None
    started: float = 0.0
    restart_at: float = 0.0
    backoff: float = 0.0
    restarts: int = 0
    link: Optional[GatewayLink] = None   # a gateway's control socket (placement.py)


class Supervisor:
    def __init__(self, settings: ServerSettings, workers: int) -> None:
        if not settings.client_secret_key:   # one key for all gateways: a secret minted by one opens sessions on all
            settings = dataclasses.replace(settings, client_secret_key=new_key())
        self.settings = settings
        self.workers = workers
        self._dir = tempfile.mkdtemp(prefix="omni2-")
        self.endpoint = f"ipc://{self._dir}/engine"
        self.sock: Optional[socket.socket] = None
        self.engine = Child("engine", 0)
        self.gateways = [Child("gateway", i + 1) for i in range(workers)]
        self.stopping = False
        self.model_failed = False
        self._env = {**os.environ, SETTINGS_ENV: settings_to_env(settings), SUPERVISOR_ENV: str(os.getpid())}

    def bind(self) -> None:
        sock = socket.create_server((self.settings.host, self.settings.port), backlog=2048)
        sock.setblocking(False)
        self.sock = sock

    # ---- processes -----------------------------------------------------------------------------
    def _start(self, child: Child) -> None:
        cmd = [sys.executable, "-m", "omni2.server.workers", child.role, "--endpoint", self.endpoint]
        fds: tuple = ()
        theirs = None
        if child.role == "gateway":
            ours, theirs = control_pair()
            child.link = GatewayLink(ours)
            cmd += ["--fd", str(theirs.fileno()), "--worker", str(child.worker)]
            fds = (theirs.fileno(),)
        try:
            child.proc = subprocess.Popen(cmd, env=self._env, pass_fds=fds)
        finally:
            if theirs is not None:
                theirs.close()
        child.started = time.monotonic()
        log.info("%s %d started (pid %d)", child.role, child.worker, child.proc.pid)

    def _check(self, child: Child, first_s: float, most_s: float) -> None:
        now = time.monotonic()
        if child.proc is None:
            if now >= child.restart_at:
                self._start(child)
            return
        code = child.proc.poll()
        if code is None:
            return
        if child.role == "engine" and code == EXIT_MODEL_FAILED:
            log.error("the engine could not load --model %s: stopping", self.settings.model)
            self.model_failed = self.stopping = True
            return
        if child.link is not None:
            child.link.close()
            child.link = None
        lived = now - child.started
        child.backoff = first_s if lived > STABLE_S or not child.backoff else min(most_s, child.backoff * 2)
        child.restart_at = now + (child.backoff if child.role == "engine" or child.restarts else 0.0)
        child.restarts += 1
        child.proc = None
        what = f"signal {-code}" if code < 0 else f"exit code {code}"
        log.error("%s %d (lived %.1f s) ended with %s: restarting in %.1f s", child.role, child.worker,
                  lived, what, child.restart_at - now)

    def children(self) -> list[Child]:
        return [self.engine, *self.gateways]

    def pids(self) -> list[int]:
        return [c.proc.pid for c in self.children() if c.proc is not None]

    def run(self) -> int:
        def stop(signum, frame) -> None:
            self.stopping = True

        previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            if self.sock is None:
                self.bind()
            self._start(self.engine)
            for g in self.gateways:
                self._start(g)
            log.info("omni2 serving on http://%s:%d with %d gateway worker(s) and one engine process",
                     self.settings.host, self.settings.port, self.workers)
            while not self.stopping:
                self._check(self.engine, *ENGINE_BACKOFF_S)
                for g in self.gateways:
                    if not self.stopping:
                        self._check(g, *GATEWAY_BACKOFF_S)
                self._serve(POLL_S)
        finally:
            self.shutdown()
            for s, handler in previous.items():
                signal.signal(s, handler)
        return 1 if self.model_failed else 0

    # ---- placement -----------------------------------------------------------------------------
    def loads(self) -> dict[int, int]:
        """Connections per gateway that serves now (placement.GatewayLink.load)."""
        return {g.worker: g.link.load for g in self.gateways if g.link is not None and g.link.ready}

    def _serve(self, timeout: float) -> None:
        """Wait up to `timeout` for gateway reports and new connections; place each connection."""
        links = {g.link.sock.fileno(): g for g in self.gateways if g.link is not None}
        watch = list(links)
        if any(g.link.ready for g in links.values()):
            watch.append(self.sock.fileno())
        try:
            readable, _, _ = select.select(watch, [], [], timeout)
        except InterruptedError:
            return
        for fd in readable:
            g = links.get(fd)
            if g is not None and g.link is not None and not g.link.read():
                g.link.close()      # it has gone; _check restarts it
                g.link = None
        if self.sock.fileno() in readable:
            self._accept()

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. out of descriptors: leave the rest in the backlog
                log.warning("accept failed: %s", exc)
                return
            with conn:
                self._hand(conn)

    def _hand(self, conn: socket.socket) -> None:
        loads = self.loads()
        while loads:
            worker = place(loads, self.settings.gateway_share)
            link = self.gateways[worker - 1].link
            if link is not None and link.hand(conn):
                return
            loads.pop(worker)       # its socket is full or gone: the next by the same policy
        log.warning("no gateway could take a connection: closed")

    def shutdown(self) -> None:
        """Every child gets SIGTERM (gateways first: they close their sessions while the
        engine still answers), then SIGKILL after STOP_GRACE_S; then the port and the ipc
        directory go."""
        for group in (self.gateways, [self.engine]):
            for child in group:
                if child.proc is not None and child.proc.poll() is None:
                    child.proc.send_signal(signal.SIGTERM)
            self._wait(group, STOP_GRACE_S)
        for child in self.children():
            if child.proc is not None and child.proc.poll() is None:
                log.warning("%s %d did not stop in time: killing it", child.role, child.worker)
                child.proc.kill()
                child.proc.wait(5)
        for g in self.gateways:
            if g.link is not None:
                g.link.close()
                g.link = None
        if self.sock is not None:
            self.sock.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    @staticmethod
    def _wait(children: list[Child], seconds: float) -> None:
        deadline = time.monotonic() + seconds
        for child in children:
            if child.proc is None:
                continue
            try:
                child.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass


def serve_workers(settings: ServerSettings, workers: int) -> int:
    """`omni2 serve --workers N` (N >= 1): returns the exit code."""
    supervisor = Supervisor(settings, workers)
    try:
        supervisor.bind()
    except OSError as exc:
        print(f"omni2 serve: cannot listen on {settings.host}:{settings.port}: {exc.strerror}", file=sys.stderr)
        shutil.rmtree(supervisor._dir, ignore_errors=True)
        return 1
    code = supervisor.run()
    if supervisor.model_failed:
        print(f"omni2 serve: cannot serve --model {settings.model} (see the engine's log above)", file=sys.stderr)
    return code
