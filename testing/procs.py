"""Test helpers' child processes die with the test run.

Why: the real components tests start (etcd, kube-apiserver, Envoy, ztunnel-py) run in their own sessions so
that teardown can kill each whole process group. The flip side is that when the test run itself is killed
outright (CI's ``timeout``, SIGKILL, an OOM kill), neither ``atexit`` nor a signal to the terminal's group
reaches them, and they kept running for good: whole clusters (~1 GB each) were found orphaned after such
runs, loading the machine for every later test.
"""

from __future__ import annotations

import shutil
import threading


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
