"""The media server under the agent: nginx with the RTMP module, configured and supervised by us.

The agent writes its own nginx.conf (RTMP on the node's address, /stat and /control on 127.0.0.1,
every hook pointing at the agent, one nginx process so that /stat sees every client and nothing
outlives the agent, all paths under the work directory), runs nginx in the foreground as a child,
restarts it with backoff when it dies, and stops it with the agent.
"""
from __future__ import annotations

import logging
import resource
import shutil
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import requests

from node_agent.artifacts import HLS_FRAGMENT_S, HLS_PLAYLIST_S, MediaLayout
from streammanager.process import Supervised

log = logging.getLogger(__name__)

RTMP_MODULE = Path("/usr/lib/nginx/modules/ngx_rtmp_module.so")
PROBE_INTERVAL_S = 1.0  # a running nginx is asked for /ping this often
PROBE_TIMEOUT_S = 2.0
HUNG_AFTER_PROBES = 3  # unanswered pings in a row: the process lives but serves nothing (stopped, stuck): killed
WORKER_CONNECTIONS = 4096


class MediaError(RuntimeError):
    pass


def check_installed() -> None:
    if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
        raise MediaError("nginx is not installed: apt-get install nginx libnginx-mod-rtmp (or 'make setup')")
    if not RTMP_MODULE.exists():
        raise MediaError(f"the nginx RTMP module is missing ({RTMP_MODULE}): apt-get install libnginx-mod-rtmp")


def _ms(seconds: float) -> int:
    """nginx takes whole numbers in its time settings: 1.5 s is written 1500ms."""
    return max(1, round(seconds * 1000))


@dataclass(frozen=True)
class NginxConfig:
    work_dir: Path
    host: str  # RTMP listen address (the node's serverAddress)
    rtmp_port: int
    stat_port: int  # HTTP on 127.0.0.1: /stat and /control
    hook_url: str  # the agent's /hooks/nginx
    applications: tuple[str, ...] = ("live",)
    idle_streams: bool = True  # edges hold players until the relay publishes; origins end relays at once
    media_root: Path | None = None  # origins: live HLS and recordings there (node_agent.artifacts)
    hls_fragment_s: float = HLS_FRAGMENT_S
    hls_playlist_s: float = HLS_PLAYLIST_S

    def _media_lines(self, app: str) -> str:
        if self.media_root is None:
            return "            record off;"
        layout = MediaLayout(self.media_root)
        return f"""            hls on;
            hls_path {layout.hls_dir(app)};
            hls_nested on;
            hls_fragment {_ms(self.hls_fragment_s)}ms;
            hls_playlist_length {_ms(self.hls_playlist_s)}ms;
            record all;
            record_path {layout.record_dir(app)};
            record_unique on;
            on_record_done {self.hook_url};"""

    def render(self) -> str:
        w = self.work_dir
        apps = "\n".join(f"""        application {app} {{
            live on;
{self._media_lines(app)}
            idle_streams {"on" if self.idle_streams else "off"};
            drop_idle_publisher 10s;
            on_publish {self.hook_url};
            on_play {self.hook_url};
            on_publish_done {self.hook_url};
            on_play_done {self.hook_url};
            on_done {self.hook_url};
        }}""" for app in self.applications)
        return f"""# written by node-agent: changes are overwritten at start
daemon off;
# One process: /stat sees every client, and it dies with the agent (a master's worker would be
# orphaned when the master is SIGKILLed).
master_process off;
worker_processes 1;
pid {w}/nginx.pid;
error_log stderr warn;
load_module {RTMP_MODULE};

events {{
    worker_connections {WORKER_CONNECTIONS};
}}

rtmp {{
    server {{
        listen {self.host}:{self.rtmp_port};
        chunk_size 4096;
        notify_method post;
        ping 10s;
        ping_timeout 5s;
{apps}
    }}
}}

http {{
    access_log off;
    client_body_temp_path {w}/tmp/client_body;
    proxy_temp_path {w}/tmp/proxy;
    fastcgi_temp_path {w}/tmp/fastcgi;
    uwsgi_temp_path {w}/tmp/uwsgi;
    scgi_temp_path {w}/tmp/scgi;
    server {{
        listen 127.0.0.1:{self.stat_port};
        location = /ping {{ return 200 "ok"; }}
        location /stat {{ rtmp_stat all; }}
        location /control {{ rtmp_control all; }}
    }}
}}
"""


@dataclass
class StreamStat:
    publisher: str | None = None
    clients: set[str] = field(default_factory=set)  # every client but the publisher


def raise_open_files_limit(wanted: int = 2 * WORKER_CONNECTIONS) -> int:
    """Raise this process's soft limit of open files toward ``wanted`` (within the hard limit); nginx
    inherits it. A service's soft limit is 1024 by default (systemd), and one process nginx has no
    worker whose ``worker_rlimit_nofile`` would apply: at about a thousand clients nginx failed every
    accept ("Too many open files") and new viewers hung, while the node still took lookups. Returns the
    soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return soft
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open files limit to %d: %s", target, exc)
    if soft < wanted:
        log.warning("open files limited to %d (hard limit %s): nginx holds fewer than %d clients; raise the hard "
                    "limit (systemd: LimitNOFILE=)", soft, hard, WORKER_CONNECTIONS)
    return soft


def parse_stat(xml_text: str) -> dict[str, StreamStat]:
    """``/stat`` XML -> {"app/stream": StreamStat}, keyed by the same client ids the hooks carry."""
    root = ET.fromstring(xml_text)
    streams: dict[str, StreamStat] = {}
    for app in root.iter("application"):
        app_name = app.findtext("name", "")
        for stream in app.iter("stream"):
            stat = StreamStat()
            for client in stream.findall("client"):
                cid = client.findtext("id", "")
                if client.find("publishing") is not None:
                    stat.publisher = cid
                else:
                    stat.clients.add(cid)
            streams[f"{app_name}/{stream.findtext('name', '')}"] = stat
    return streams


class NginxServer:
    """nginx as a supervised child: restarted with backoff (1 s doubling to 30 s) while we run, and
    killed (then restarted) when it stops answering on its HTTP port although its process lives (a
    SIGSTOPped or stuck nginx serves no client either). ``serving`` says whether it answers now;
    ``on_serving(bool)`` is told when that changes, ``on_exit()`` after an nginx died and before the
    next one starts (its clients went with it: no done hook will come for them)."""

    def __init__(self, config: NginxConfig, *, on_exit: Callable[[], None] | None = None,
                 on_serving: Callable[[bool], None] | None = None):
        self.config = config
        self._proc: Supervised | None = None
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None
        self._on_exit = on_exit
        self._on_serving = on_serving
        self.serving = False
        self.restarts = 0  # nginx restarted after it exited or hung

    def _set_serving(self, serving: bool) -> None:
        if serving != self.serving:
            self.serving = serving
            if self._on_serving is not None:
                self._on_serving(serving)

    def _argv(self) -> list[str]:
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        return [nginx, "-p", str(self.config.work_dir), "-c", str(self.config.work_dir / "nginx.conf"),
                "-e", "stderr"]

    def start(self, wait_s: float = 10.0) -> None:
        check_installed()
        work = self.config.work_dir
        (work / "tmp").mkdir(parents=True, exist_ok=True)
        (work / "logs").mkdir(parents=True, exist_ok=True)
        if self.config.media_root is not None:
            MediaLayout(self.config.media_root).prepare(self.config.applications)
        (work / "nginx.conf").write_text(self.config.render())
        raise_open_files_limit()
        self._spawn()
        self._wait_ready(wait_s)
        self._set_serving(True)
        self._watcher = threading.Thread(target=self._watch, name="nginx-watch", daemon=True)
        self._watcher.start()

    def _spawn(self) -> None:
        self._proc = Supervised("nginx", self._argv(), log_name="node_agent.nginx")
        self._proc.start()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def _wait_ready(self, wait_s: float) -> None:
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if self._proc is not None and not self._proc.running:
                raise MediaError(f"nginx exited with {self._proc.returncode} at start; see its log above")
            if self.stat() is not None:
                return
            time.sleep(0.05)
        raise MediaError(f"nginx did not answer on 127.0.0.1:{self.config.stat_port} within {wait_s:.0f} s")

    def _ping(self) -> bool:
        try:
            return requests.get(f"http://127.0.0.1:{self.config.stat_port}/ping", timeout=PROBE_TIMEOUT_S).ok
        except requests.RequestException:
            return False

    def _watch(self) -> None:
        backoff = 1.0
        unanswered = 0
        next_probe = time.monotonic() + PROBE_INTERVAL_S
        while not self._stopping.is_set():
            proc = self._proc
            if proc is not None and proc.running:
                if self._stopping.wait(0.5):
                    return
                if proc.running and time.monotonic() >= next_probe:
                    answered = self._ping()
                    next_probe = time.monotonic() + PROBE_INTERVAL_S
                    unanswered = 0 if answered else unanswered + 1
                    if answered:
                        self._set_serving(True)
                    elif unanswered >= HUNG_AFTER_PROBES and proc.running and not self._stopping.is_set():
                        log.error("nginx (pid %s) has not answered %d probes in a row: killing it", proc.pid,
                                  unanswered)
                        proc.kill()
                if proc.running:
                    continue
            if self._stopping.is_set():
                return
            self._set_serving(False)
            if proc is not None:
                proc.kill_group()  # anything it left behind
                if self._on_exit is not None:
                    try:
                        self._on_exit()
                    except Exception:
                        log.exception("forgetting the clients of the nginx that exited failed")
            log.warning("nginx exited (code %s): restarting in %.0f s", proc.returncode if proc else None, backoff)
            if self._stopping.wait(backoff):
                return
            try:
                self.restarts += 1
                self._spawn()
                self._wait_ready(10)
                backoff = 1.0
                unanswered = 0
                next_probe = time.monotonic() + PROBE_INTERVAL_S
                self._set_serving(True)
            except MediaError as exc:
                log.error("nginx restart failed: %s", exc)
                backoff = min(backoff * 2, 30.0)

    def stat(self) -> dict[str, StreamStat] | None:
        try:
            response = requests.get(f"http://127.0.0.1:{self.config.stat_port}/stat", timeout=2)
            if response.status_code != 200:
                return None
            return parse_stat(response.text)
        except (requests.RequestException, ET.ParseError):
            return None

    def drop_publisher(self, app: str, name: str) -> bool:
        """Disconnect the publisher of ``app/name`` (nginx-rtmp's control module); its publish_done
        hook follows. True if nginx dropped one."""
        return self._drop("publisher", app, name) > 0

    def drop_subscribers(self, app: str, name: str) -> int:
        """Disconnect every player of ``app/name``; their play_done hooks follow. How many nginx dropped."""
        return self._drop("subscriber", app, name)

    def _drop(self, kind: str, app: str, name: str) -> int:
        """nginx-rtmp's ``/control/drop/<kind>``: how many clients it dropped (0 if it did not answer)."""
        try:
            response = requests.get(f"http://127.0.0.1:{self.config.stat_port}/control/drop/{kind}",
                                    params={"app": app, "name": name}, timeout=2)
        except requests.RequestException as exc:
            log.warning("could not ask nginx to drop the %s of %s/%s: %s", kind, app, name, exc)
            return 0
        text = response.text.strip()
        return int(text) if response.status_code == 200 and text.isdigit() else 0

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stopping.set()
        if self._watcher is not None:
            self._watcher.join(2)
        if self._proc is not None:
            self._proc.stop(timeout_s)
