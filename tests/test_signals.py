"""A foreground command stops on SIGTERM whichever of its threads the kernel hands the signal to."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The signal goes to a helper thread, as the kernel may choose for a process-directed SIGTERM (it did,
# for node agents running relays); the main thread waits on the stop event as the commands do.
SCRIPT = textwrap.dedent("""
    import signal, sys, threading, time
    sys.path.insert(0, sys.argv[1])
    from streammanager.process import stop_event_on_signals

    stop = stop_event_on_signals()
    helper_ready = threading.Event()

    def helper():
        helper_ready.set()
        time.sleep(0.2)
        signal.pthread_kill(threading.get_ident(), signal.SIGTERM)  # delivered to this thread only
        time.sleep(30)

    threading.Thread(target=helper, daemon=True).start()
    helper_ready.wait()
    {wait}
    print("stopped", flush=True)
""")


def run(wait: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCRIPT.format(wait=wait), str(ROOT)], capture_output=True,
                          text=True, timeout=20)


def test_main_thread_wakes_when_another_thread_takes_sigterm():
    result = run("stop.wait()")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "stopped"


def test_wait_with_timeout_in_main_thread_reports_the_signal():
    result = run("assert stop.wait(15), 'the signal was not seen'")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "stopped"


def test_set_from_another_thread_wakes_the_main_thread():
    script = textwrap.dedent("""
        import sys, threading
        sys.path.insert(0, sys.argv[1])
        from streammanager.process import stop_event_on_signals
        stop = stop_event_on_signals()
        threading.Timer(0.2, stop.set).start()
        print(stop.wait(15), flush=True)
    """)
    result = subprocess.run([sys.executable, "-c", script, str(ROOT)], capture_output=True, text=True, timeout=20)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"


def test_wait_times_out_without_a_signal():
    script = textwrap.dedent("""
        import sys
        sys.path.insert(0, sys.argv[1])
        from streammanager.process import stop_event_on_signals
        stop = stop_event_on_signals()
        print(stop.wait(0.3), stop.is_set(), flush=True)
    """)
    result = subprocess.run([sys.executable, "-c", script, str(ROOT)], capture_output=True, text=True, timeout=20)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False False"
