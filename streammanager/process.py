"""Child processes that are always stopped: argument lists (never a shell), output into our logs,
death with the parent (PR_SET_PDEATHSIG), and stop = signal, deadline, SIGKILL."""
from __future__ import annotations

import ctypes
import logging
import os
import queue
import select
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from typing import Callable, Sequence

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
try:  # looked up here, once: loading a library in the child, between fork and exec, takes the dynamic
    # loader's lock, which another thread of the parent may have held at the fork (the child then hangs)
    _prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
except (OSError, AttributeError):
    _prctl = None


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class _Spawner:
    """Starts children from a thread that lives as long as the process.

    The kernel sends a child its parent-death signal when the *thread* that forked it ends, not the
    process. A node agent's relays are started by its relay supervisor's thread, and a restarted nginx
    by the thread that watches nginx: at the agent's stop those threads return first, and their
    children were SIGKILLed before they were asked to stop (an edge's relays and a restarted nginx
    never got their SIGINT or SIGTERM). So every child is forked by the main thread, or by this one
    thread (one per process: a forked process starts its own)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid = 0
        self._jobs: queue.SimpleQueue | None = None

    def popen(self, *args, **kwargs) -> subprocess.Popen:
        if threading.current_thread() is threading.main_thread():
            return subprocess.Popen(*args, **kwargs)
        done: Future = Future()
        self._queue().put((done, args, kwargs))
        return done.result()

    def _queue(self) -> queue.SimpleQueue:
        with self._lock:
            if self._pid != os.getpid():  # first use, or a forked child: its parent's thread is not here
                self._pid, self._jobs = os.getpid(), queue.SimpleQueue()
                threading.Thread(target=self._run, args=(self._jobs,), name="child-spawner", daemon=True).start()
            return self._jobs

    @staticmethod
    def _run(jobs: queue.SimpleQueue) -> None:
        while True:
            done, args, kwargs = jobs.get()
            try:
                done.set_result(subprocess.Popen(*args, **kwargs))
            except BaseException as exc:  # the caller raises it
                done.set_exception(exc)


_spawner = _Spawner()


class SignalStop(threading.Event):
    """An event set by the given signals (or by ``set()`` from any thread).

    CPython runs signal handlers in the main thread only, but the kernel hands a process-directed
    signal to any thread that does not block it. When that is another thread (kazoo's, a relay
    supervisor's), a main thread blocked in ``Event.wait()`` is not woken and the handler waits with it:
    a node agent ignored SIGTERM until it was killed, in about one stop out of two with a relay
    running. So the main thread waits on the signal module's wakeup pipe, which the C-level handler
    writes in whichever thread took the signal; other threads wait on the event as usual."""

    def __init__(self, signals: Sequence[int]):
        super().__init__()
        self._wake_read, self._wake_write = os.pipe()
        for fd in (self._wake_read, self._wake_write):
            os.set_blocking(fd, False)
            os.set_inheritable(fd, False)
        signal.set_wakeup_fd(self._wake_write, warn_on_full_buffer=False)
        for sig in signals:
            signal.signal(sig, lambda *_: self.set())

    def set(self) -> None:
        super().set()
        try:
            os.write(self._wake_write, b"\0")  # wakes a main thread waiting in select()
        except (BlockingIOError, OSError):
            pass  # the pipe is full (a wake-up is pending anyway) or closed

    def wait(self, timeout: float | None = None) -> bool:
        if threading.current_thread() is not threading.main_thread():
            return super().wait(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.is_set():
            remaining = WAKE_CHECK_S if deadline is None else min(WAKE_CHECK_S, deadline - time.monotonic())
            if remaining <= 0:
                break
            # Back in the interpreter after select() returns, the pending Python handler runs (it sets
            # the event); the short cap covers a wake-up drained before that handler had run.
            select.select([self._wake_read], [], [], remaining)
            try:
                while os.read(self._wake_read, 512):
                    pass
            except BlockingIOError:
                pass
        return self.is_set()


WAKE_CHECK_S = 1.0


def stop_event_on_signals(signals=(signal.SIGTERM, signal.SIGINT)) -> SignalStop:
    """An event set by SIGTERM or Ctrl-C, for a foreground command's main thread to wait on (call it
    from the main thread: only it may install signal handlers)."""
    return SignalStop(signals)


class Supervised:
    """One child process whose output lines are logged under ``log_name``."""

    def __init__(self, name: str, argv: Sequence[str], *, log_name: str | None = None,
                 env: dict[str, str] | None = None, cwd: str | None = None,
                 stop_signal: int = signal.SIGTERM, passthrough: bool = False,
                 redact: Callable[[str], str] | None = None):
        self.name = name
        # passthrough: the child writes log lines in our own format already (the registry feed):
        # copied to our stderr as they are, not wrapped as the message of another record
        self._passthrough = passthrough
        self._redact = redact  # applied to every output line before it is logged (secrets in URLs)
        self.argv = list(argv)
        self._log = logging.getLogger(log_name or f"streammanager.child.{name}")
        self._env = env
        self._cwd = cwd
        self._stop_signal = stop_signal
        self._popen: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None

    def start(self) -> None:
        self._popen = _spawner.popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=self._env, cwd=self._cwd, preexec_fn=_die_with_parent, start_new_session=True,
        )
        self._reader = threading.Thread(target=self._pump, name=f"{self.name}-output", daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        assert self._popen is not None and self._popen.stdout is not None
        for raw in self._popen.stdout:
            line = raw.decode(errors="replace").rstrip()
            if line and self._redact is not None:
                line = self._redact(line)
            if line and self._passthrough:
                sys.stderr.write(line + "\n")
                sys.stderr.flush()
            elif line:
                self._log.info("%s", line, extra={"pid": self._popen.pid})

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen else None

    @property
    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def poll(self) -> int | None:
        return self._popen.poll() if self._popen else None

    @property
    def returncode(self) -> int | None:
        return self._popen.returncode if self._popen else None

    def wait(self, timeout_s: float | None = None) -> int:
        assert self._popen is not None
        return self._popen.wait(timeout_s)

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """Signal, wait up to ``timeout_s``, then SIGKILL. Returns the exit code."""
        if self._popen is None:
            return None
        if self._popen.poll() is None:
            try:
                self._popen.send_signal(self._stop_signal)
                self._popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %s) ignored stop signal for %.0f s: killing it", self.name,
                            self._popen.pid, timeout_s)
                self.kill()
            except ProcessLookupError:
                pass
        self.kill_group()
        if self._reader is not None:
            self._reader.join(2.0)
        return self._popen.returncode

    def kill_group(self) -> None:
        """SIGKILL whatever is left in the child's process group (it leads its own session)."""
        if self._popen is None:
            return
        try:
            os.killpg(self._popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def kill(self) -> None:
        if self._popen is not None and self._popen.poll() is None:
            try:
                self._popen.kill()
            except ProcessLookupError:
                pass
            self._popen.wait()
