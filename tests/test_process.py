"""Supervised children: they die with their parent process, and only with it, whichever thread started them."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from streammanager.process import Supervised

ROOT = Path(__file__).resolve().parent.parent

# exits with 7 on SIGTERM: a child that was asked to stop, not killed
TRAPS_SIGTERM = [sys.executable, "-c", "import signal, sys, time\n"
                 "signal.signal(signal.SIGTERM, lambda *_: sys.exit(7))\n"
                 "print('ready', flush=True)\n"
                 "time.sleep(60)"]


def _wait_gone(path: Path, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while path.exists():
        assert time.monotonic() < deadline, f"{path} is still there"
        time.sleep(0.02)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_child_started_by_a_thread_that_ended_runs_on_and_is_stopped_by_its_signal():
    # A relay is started by the relay supervisor's thread; at the agent's stop that thread ends before
    # the relays are stopped. The kernel's parent-death signal follows the thread that forked a child.
    child = Supervised("trap", TRAPS_SIGTERM)
    started = {}

    def start():
        started["tid"] = threading.get_native_id()
        child.start()

    thread = threading.Thread(target=start)
    thread.start()
    thread.join()
    _wait_gone(Path(f"/proc/self/task/{started['tid']}"))  # that thread is gone from the kernel too
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            child.wait(1.0)  # still running: it was not killed with the thread
        assert child.stop(10.0) == 7  # it got SIGTERM and exited by itself
    finally:
        child.kill()


def test_a_child_started_by_a_thread_still_dies_with_its_parent_process():
    script = textwrap.dedent("""
        import sys, threading, time
        sys.path.insert(0, sys.argv[1])
        from streammanager.process import Supervised
        child = Supervised("sleeper", ["sleep", "60"])
        thread = threading.Thread(target=child.start)
        thread.start()
        thread.join()
        print(child.pid, flush=True)
        time.sleep(60)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script, str(ROOT)], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(parent.stdout.readline())
        assert _alive(pid)
        parent.kill()
        parent.wait(10)
        deadline = time.monotonic() + 10
        while _alive(pid):
            assert time.monotonic() < deadline, "the child outlived its SIGKILLed parent"
            time.sleep(0.02)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(10)


def test_a_forked_process_starts_children_from_threads_too():
    # the spawner thread of the parent does not exist in a forked child (gunicorn forks its workers)
    script = textwrap.dedent("""
        import os, sys, threading
        sys.path.insert(0, sys.argv[1])
        from streammanager.process import Supervised

        def run_true():
            child = Supervised("true", ["true"])
            thread = threading.Thread(target=child.start)
            thread.start()
            thread.join()
            return child.wait(10)

        assert run_true() == 0
        pid = os.fork()
        if pid == 0:
            os._exit(run_true())
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status), flush=True)
    """)
    result = subprocess.run([sys.executable, "-c", script, str(ROOT)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "0"
