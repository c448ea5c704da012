"""Test helpers' child processes die with the test run, and get distinct free ports.

Why: the real components tests start (etcd, kube-apiserver, Envoy, ztunnel-py) run in their own sessions so
that teardown can kill each whole process group. The flip side is that when the test run itself is killed
outright (CI's ``timeout``, SIGKILL, an OOM kill), neither ``atexit`` nor a signal to the terminal's group
reaches them, and they kept running for good: whole clusters (~1 GB each) were found orphaned after such
runs, loading the machine for every later test.
"""

from __future__ import annotations

import collections
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import threading
from typing import Any

# Ports this process handed out lately: a port is only reserved once the program it is meant for binds it.
_recent_ports: collections.deque[int] = collections.deque(maxlen=1024)
_ports_lock = threading.Lock()


def die_with_parent(argv: list[str]) -> list[str]:
    """``argv`` run under ``setpriv --pdeathsig KILL`` when started from the main thread.

    The parent-death signal is tied to the *thread* that forked, so it is only requested from the main
    thread (a worker thread, e.g. ``asyncio.to_thread``'s, may end long before the child should).
    ``setpriv`` execs the program, so its pid, process group and the caller's teardown stay as they are.
    Without util-linux's ``setpriv`` the program simply runs as before.
    """
    setpriv = shutil.which("setpriv")
    if setpriv is None or threading.current_thread() is not threading.main_thread():
        return argv
    return [setpriv, "--pdeathsig", "KILL", "--", *argv]


def stop_group(proc: subprocess.Popen[Any], timeout: float, kill_timeout: float = 5.0) -> None:
    """SIGTERM ``proc``'s process group (it was started in its own session), SIGKILL the group when the
    leader has not exited within ``timeout``; a process that already exited is left alone."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(kill_timeout)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now on ``host`` that this process has not handed out lately.

    Why the memory: callers pick several ports before anything binds them (a cluster takes four, a
    ztunnel-py three), and the kernel hands a just-closed port out again now and then (measured: one
    group of four in ~2000 had a duplicate), which made the second component fail with "address in use".
    Other processes can still take the port before it is bound; that race is far rarer and the same for
    any scheme short of passing bound sockets.
    """
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        with _ports_lock:
            if port not in _recent_ports:
                _recent_ports.append(port)
                return port
