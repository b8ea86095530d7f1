"""The controller: one leader (kazoo ``Election``) keeps every node group at the right size.

The leader's loop is :meth:`Controller.run_once`: gather the inputs (groups, instance records, the
registry's node records), let :func:`streammanager.autoscaler.plan` decide, then carry out the plan
with the cloud providers. Every instance is recorded (state ``requested``) before the provider is
asked for it, so a new leader sees launches that were in flight and never launches twice; instances
the providers hold for this cluster but no record knows are adopted (a launch whose confirmation was
lost) or destroyed (strays) by a periodic sweep.

While it leads, the controller also runs the leader-only duties of :func:`leader_duties` (e.g. the
outbound callback dispatcher), each in its own thread, stopped when leadership ends.
"""
from __future__ import annotations

import logging
import os
import queue
import socket
import re
import threading
import time
from concurrent.futures import Future, wait
from functools import partial
from typing import Callable, Iterable, Mapping, Protocol

from kazoo.client import KazooClient, KazooState
from kazoo.exceptions import KazooException, NoNodeError
from prometheus_client import Counter, Gauge, Histogram

from streammanager import autoscaler
from streammanager.cloud.base import (
    DEFAULT_BOOT_SCRIPT,
    CloudProvider,
    LaunchRequest,
    ProviderError,
    render_boot_script,
)
from streammanager.config import ControllerSettings
from streammanager.coordinator_config import EventCallbackSettings
from streammanager.groups import (
    DRAINING,
    FAILED,
    GONE,
    INSERVICE,
    REQUESTED,
    STARTING,
    TERMINATING,
    InstanceRecord,
    NodeGroup,
    new_instance_id,
)
from streammanager.registry import RegistryView, ZkPaths, connect, ensure_layout, make_client, now_ms
from streammanager.scaling_store import Conflict, GroupStore, InstanceStore

log = logging.getLogger(__name__)

HOLD_LOG_EVERY_S = 60.0
_HOLD_NUMBERS = re.compile(r"\d+(?:\.\d+)?")

LEADER = Gauge("sm_controller_leader", "1 while this controller leads")
LAUNCHES = Counter("sm_controller_launches_total", "Instances launched", ["group", "region", "role", "outcome"])
DESTROYS = Counter("sm_controller_destroys_total", "Instances destroyed", ["outcome"])
RUN_SECONDS = Histogram("sm_controller_run_once_seconds", "Time of one decision step plus its actions",
                        buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30))
POOL_NODES = Gauge("sm_pool_nodes", "Active instances of a pool", ["group", "region", "role"])
POOL_UTILIZATION = Gauge("sm_pool_utilization", "Share of a pool's capacity in use", ["group", "region", "role"])
INSTANCES = Gauge("sm_instances", "Instance records by lifecycle state", ["state"])

DRAIN_ASK_AGAIN_S = 5.0  # a draining instance whose node still takes work is asked to drain again this often
STRAY_GRACE_MS = 120_000  # an untracked instance younger than this may be a launch being recorded
VANISHED_AFTER_S = 60.0  # a booting instance missing from its cloud's listing after this long is gone


class Duty(Protocol):
    """A leader-only background job: runs until ``stop`` is set (when leadership ends)."""

    name: str

    def run(self, stop: threading.Event) -> None: ...


def leader_duties(client: KazooClient, paths: ZkPaths, settings: ControllerSettings) -> list[Duty]:
    """Every leader-only job besides scaling. Add new ones here."""
    from streammanager.callbacks import CallbackDispatcher  # the durable event callbacks to the application

    return [CallbackDispatcher(client, paths, settings.event_callback or EventCallbackSettings())]


CONNECT_TIMEOUT_S = 30.0  # a controller that cannot reach ZooKeeper at start says so and exits


class ControllerError(RuntimeError):
    """The controller cannot run (ZooKeeper unreachable at start): its message is for the operator."""


ACTION_WAIT_S = 5.0  # a step waits this long for its cloud calls; slower ones carry on without holding it


class _ProviderThread:
    """One provider's calls, one at a time, on a daemon thread. Not a ThreadPoolExecutor: the interpreter
    joins those at exit, so a controller told to stop (SIGTERM) stayed up as long as a hung cloud call did
    (a whole driver timeout, or for good), and then made that call although it no longer led."""

    def __init__(self, name: str):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._work, name=name, daemon=True).start()

    def submit(self, call: Callable[..., None], *args) -> Future:
        future: Future = Future()
        self._queue.put((future, call, args))
        return future

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            future, call, args = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(call(*args))
            except BaseException as exc:  # noqa: BLE001 - handed to the future, as an executor does
                future.set_exception(exc)

    def stop(self) -> None:
        """Cancel the calls not begun; the one under way (if any) ends the thread when it returns."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[0].cancel()
        self._queue.put(None)


class CloudActions:
    """The leader's calls to the cloud providers, each provider's on a thread of its own.

    A cloud call may take as long as its timeout (30 s) and a step makes several: run one after another
    on the decision loop, one slow or hung endpoint held every group of every provider (a local pool's
    dead node was not replaced for minutes behind three EC2 launches). Here each provider's calls queue
    on its own thread (one at a time: a libcloud driver is not shared between threads); a step waits
    up to ``ACTION_WAIT_S`` for its calls, then goes on, and an action still under way is not issued
    again (``key``: one per instance and action). A call that has not begun when the leader loses
    ZooKeeper is not made: the next leader decides again from the records.
    """

    def __init__(self, lost: threading.Event):
        self._lost = lost
        self._lock = threading.Lock()
        self._threads: dict[str, _ProviderThread] = {}
        self._running: dict[str, Future] = {}
        self._slow: frozenset[str] = frozenset()  # what the last wait left under way (logged when it changes)

    def submit(self, key: str, provider: str, call: Callable[..., None], *args) -> Future | None:
        """Queue ``call(*args)`` on ``provider``'s thread, unless the action ``key`` is under way already."""
        with self._lock:
            if key in self._running:
                return None
            thread = self._threads.get(provider)
            if thread is None:
                thread = self._threads[provider] = _ProviderThread(f"cloud-{provider}")
            future = thread.submit(self._run, key, call, args)
            self._running[key] = future
        future.add_done_callback(partial(self._done, key))
        return future

    def _run(self, key: str, call: Callable[..., None], args: tuple) -> None:
        if self._lost.is_set():
            log.info("not carrying out %s: this controller lost ZooKeeper (the next leader decides again)", key)
            return
        call(*args)

    def _done(self, key: str, future: Future) -> None:
        with self._lock:
            if self._running.get(key) is future:
                del self._running[key]
        if not future.cancelled() and future.exception() is not None:
            log.error("cloud action %s failed", key, exc_info=future.exception())

    def under_way(self, key: str) -> bool:
        with self._lock:
            return key in self._running

    def wait(self, futures: list[Future | None], timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for ``futures``; say which actions a slow cloud still holds."""
        futures = [f for f in futures if f is not None]
        if futures:
            wait(futures, timeout=timeout_s)
        with self._lock:
            slow = frozenset(self._running)
        if slow != self._slow and slow:
            log.warning("%d cloud call(s) still under way after %.0f s (%s): later steps go on without them",
                        len(slow), timeout_s, ", ".join(sorted(slow)[:5]))
        self._slow = slow

    def close(self) -> None:
        """Drop the calls not begun (leadership ended); calls under way finish on their own."""
        with self._lock:
            threads, self._threads, self._running = self._threads, {}, {}
        for thread in threads.values():
            thread.stop()


class CloudBackoff:
    """Provider regions that did not answer a launch: no new launch there until the back-off ends.

    A cloud API that cannot be reached (connection refused, a connect timeout, a name that does not
    resolve) failed every launch of a step at once, and those failures spent the failure budget in a
    second: a few seconds of outage paused the region's scaling for the whole failure window (10
    minutes), below its minimum. Such a launch did nothing and was not wrong, so it does not count
    against the budget; instead launches there wait 5 s, doubling up to 5 minutes while the cloud stays
    away, and go on at once after a launch that reached it.
    """

    FIRST_S = 5.0
    MAX_S = 300.0

    def __init__(self):
        self._lock = threading.Lock()
        self._held: dict[tuple[str, str], tuple[float, float]] = {}  # (provider, region) -> (until, delay)

    def failed(self, provider: str, region: str) -> float:
        with self._lock:
            _, delay = self._held.get((provider, region), (0.0, self.FIRST_S / 2))
            delay = min(2 * delay, self.MAX_S)
            self._held[(provider, region)] = (time.monotonic() + delay, delay)
            return delay

    def answered(self, provider: str, region: str) -> None:
        with self._lock:
            self._held.pop((provider, region), None)

    def holds(self, provider: str, region: str) -> bool:
        with self._lock:
            held = self._held.get((provider, region))
        return held is not None and time.monotonic() < held[0]


class Controller:
    def __init__(self, settings: ControllerSettings, providers: Mapping[str, CloudProvider],
                 client: KazooClient | None = None,
                 duties: Callable[[KazooClient, ZkPaths, ControllerSettings], list[Duty]] = leader_duties):
        self.settings = settings
        self.providers = dict(providers)
        self.paths = ZkPaths(settings.zk_root)
        self.client = client or make_client(settings.zk_hosts, settings.zk_timeout_s, settings.zk_auth)
        self.identity = settings.controller_id or f"{socket.gethostname()}-{os.getpid()}"
        self.groups = GroupStore(self.client, self.paths)
        self.instances = InstanceStore(self.client, self.paths)
        self.view = RegistryView(self.client, self.paths)
        self._duties = duties
        self._last_evaluated: dict[str, int] = {}
        self._last_sweep = 0.0
        self._pools_reported: set[tuple[str, str, str]] = set()  # the pool series the last step set
        self._holds: dict[tuple[str, str, str], tuple[str, float]] = {}  # pool -> (kind of hold, logged at)
        self._drain_asked: dict[str, float] = {}  # instance id -> when its agent was last asked to drain
        self._absent_since: dict[str, int] = {}  # in-service or draining instance id -> when its node left
        self.leading = threading.Event()
        self._lost = threading.Event()
        self._term_ended: threading.Event | None = None  # the leader-only duties of the term under way stop on it
        self._actions = CloudActions(self._lost)
        self._unreachable = CloudBackoff()

    # -- process lifecycle ---------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Campaign, lead while elected, campaign again after losing the lead; until ``stop``."""
        self.client.add_listener(self._on_state)
        if not self._connect(stop):
            return
        ensure_layout(self.client, self.paths)
        self.view.start()
        self.view.wait_initialized(30)
        election = self.client.Election(self.paths.election, self.identity)
        canceller = threading.Thread(target=lambda: (stop.wait(), election.cancel()), daemon=True)
        canceller.start()
        log.info("controller %s campaigning (cluster %s)", self.identity, self.settings.cluster_id)
        try:
            while not stop.is_set():
                try:
                    election.run(self._lead, stop)
                except KazooException as exc:
                    log.warning("election interrupted: %s", exc)
                    stop.wait(1.0)
        finally:
            self.view.close()
            self.client.stop()
            self.client.close()
            for provider in self.providers.values():
                provider.close()

    def _connect(self, stop: threading.Event) -> bool:
        """Connect within CONNECT_TIMEOUT_S; False if told to stop first. kazoo's ``start(timeout)``
        raised its KazooTimeoutError as a traceback, and held a SIGTERM for its whole timeout."""
        try:
            return connect(self.client, CONNECT_TIMEOUT_S, stop)
        except self.client.handler.timeout_exception:
            raise ControllerError(f"cannot connect to ZooKeeper at {self.settings.zk_hosts} (SM_ZK_HOSTS) "
                                  f"within {CONNECT_TIMEOUT_S:.0f} s: is it running and reachable?") from None

    def _on_state(self, state: str) -> None:
        if state in (KazooState.SUSPENDED, KazooState.LOST):
            self._lost.set()  # a leader that cannot see ZooKeeper must stop acting at once
            term_ended = self._term_ended
            if term_ended is not None:
                # its duties too (the event callbacks): they stopped only at the clean-up in _lead, after the
                # leading thread's ZooKeeper call returned, at the end of the outage; meanwhile another
                # controller led, and both delivered the queued events (each one twice)
                term_ended.set()
            if self.leading.is_set():
                # and stop saying it leads at once: the leading thread may be held in a ZooKeeper call
                # for the whole outage, and its own clean-up (below, in _lead) comes only after it;
                # meanwhile another controller may lead, and both counted every pool
                self._clear_leader_metrics()

    def _clear_leader_metrics(self) -> None:
        LEADER.set(0)
        # a follower reports no pools or instances: the leader does (summed over the controllers,
        # the last numbers of a former leader counted every pool twice)
        POOL_NODES.clear()
        POOL_UTILIZATION.clear()
        INSTANCES.clear()

    def _lead(self, stop: threading.Event) -> None:
        self._lost.clear()
        if not self.client.connected:
            return
        log.info("controller %s leads", self.identity)
        self._absent_since = {}  # what a former term saw missing is not known to be missing still
        LEADER.set(1)
        self.leading.set()
        ended = threading.Event()
        self._term_ended = ended
        if self._lost.is_set():  # lost between the check above and now: no duty starts in this term
            ended.set()
        threads = []
        try:
            self.instances.start()
            self._last_sweep = 0.0
            for duty in self._duties(self.client, self.paths, self.settings):
                thread = threading.Thread(target=duty.run, args=(ended,), name=f"duty-{duty.name}", daemon=True)
                thread.start()
                threads.append(thread)
            while not stop.is_set() and not self._lost.is_set():
                try:
                    self.run_once(now_ms())
                except KazooException as exc:
                    log.warning("decision step interrupted by ZooKeeper: %s", exc)
                except Exception:
                    log.exception("decision step failed")
                stop.wait(self.settings.tick_s)
        finally:
            ended.set()
            self._actions.close()
            for thread in threads:
                thread.join(10)
            self.instances.close()
            self.leading.clear()
            self._clear_leader_metrics()
            self._pools_reported = set()
            log.info("controller %s stopped leading", self.identity)

    # -- one step ------------------------------------------------------------------------------------
    def _track_absent(self, now: int, records: Mapping[str, InstanceRecord], nodes: Mapping[str, object],
                      unreadable: Iterable[str]) -> None:
        """Since when each in-service instance's node has been missing from the registry: it is taken for
        dead only after ``absence_grace_s`` (its agent may be registering on a new session)."""
        unreadable = set(unreadable)
        # draining too: a draining node still serves (it ends when empty), and its agent registers again
        # after an outage like an in-service one's
        missing = {i for i, r in records.items()
                   if r.state in (INSERVICE, DRAINING) and i not in nodes and i not in unreadable}
        for instance_id in missing - self._absent_since.keys():
            self._absent_since[instance_id] = now
            log.warning("node %s left the registry: %s if it does not register again within %.0f s", instance_id,
                        "replaced" if records[instance_id].state == INSERVICE else "terminated",
                        self.settings.absence_grace_s)
        for instance_id in self._absent_since.keys() - missing:
            since = self._absent_since.pop(instance_id)
            if instance_id in nodes:
                log.info("node %s registered again after %.1f s away", instance_id, (now - since) / 1000)

    def run_once(self, now: int) -> autoscaler.Plan:
        started = time.perf_counter()
        calls: list[Future | None] = []
        if time.monotonic() - self._last_sweep >= self.settings.sweep_interval_s:
            self._last_sweep = time.monotonic()
            calls += self.sweep(now)
        groups = {g.name: g for g in self.groups.all()}
        nodes = {n.id: n for n in self.view.nodes()}
        records, unreadable = self.instances.records(), self.view.unreadable()
        self._track_absent(now, records, nodes, unreadable)
        decided = autoscaler.plan(now, groups.values(), records, nodes, self._last_evaluated,
                                  unreadable=unreadable, absent_since=self._absent_since,
                                  absence_grace_ms=round(self.settings.absence_grace_s * 1000))
        self._last_evaluated.update(decided.evaluated)
        calls += self._carry_out(now, decided, groups)
        self._actions.wait(calls, ACTION_WAIT_S)
        self._report(decided)
        RUN_SECONDS.observe(time.perf_counter() - started)
        return decided

    def _carry_out(self, now: int, decided: autoscaler.Plan, groups: dict[str, NodeGroup]) -> list[Future | None]:
        """Write the plan's lifecycle changes, and queue its cloud calls (returned, to wait for)."""
        calls: list[Future | None] = []
        destroying = {d.record.id for d in decided.destroys}
        for move in decided.moves:
            try:
                self.instances.write(move.record)
            except Conflict as exc:
                log.info("skipped a lifecycle change: %s", exc)
                destroying.discard(move.record.id)
                continue
            log.info("instance %s -> %s: %s", move.record.id, move.record.state, move.record.reason,
                     extra=_fields(move.record))
            if move.drain:
                self._send_drain(move.record)
        asked_again = set()
        for record in decided.drains:  # draining in its record, not in its node's: told again, not only once
            asked_again.add(record.id)
            if time.monotonic() - self._drain_asked.get(record.id, float("-inf")) >= DRAIN_ASK_AGAIN_S:
                log.warning("instance %s is draining but its node is not: asking its agent again", record.id,
                            extra=_fields(record))
                self._send_drain(record)
        self._drain_asked = {k: v for k, v in self._drain_asked.items()
                             if k in asked_again or time.monotonic() - v < DRAIN_ASK_AGAIN_S}
        for destroy in decided.destroys:
            if self._lost.is_set():
                return calls
            if destroy.record.id in destroying:
                calls.append(self._actions.submit(f"destroy {destroy.record.id}", destroy.record.provider,
                                                  self._destroy, now, destroy.record))
        for forget in decided.forgets:
            self.instances.forget(forget.instance_id)
            try:  # commands nobody will read any more
                self.client.delete(self.paths.node_commands(forget.instance_id), recursive=True)
            except NoNodeError:
                pass
        for launch in decided.launches:
            if self._lost.is_set():  # deposed while carrying out the plan (a cloud call can take 30 s):
                log.warning("stopped carrying out the plan: ZooKeeper connection lost, %d launch(es) left to "
                            "the next leader", len(decided.launches) - decided.launches.index(launch))
                return calls  # the next leader decides again from the records; launching on would double them
            group = groups[launch.group]
            if self._unreachable.holds(group.launch.provider, launch.region):
                continue  # the cloud did not answer the last launch: no new one before its back-off ends
            calls.append(self._launch(now, group, launch))
        return calls

    def _launch(self, now: int, group: NodeGroup, launch: autoscaler.Launch) -> Future | None:
        instance_id = new_instance_id(group.name, launch.region, launch.role)
        record = InstanceRecord(id=instance_id, group=group.name, region=launch.region, role=launch.role,
                                provider=group.launch.provider, state=REQUESTED, created_ms=now,
                                state_since_ms=now, reason=launch.reason)
        self.instances.create(record)  # recorded before the provider is asked: never launched twice
        return self._actions.submit(f"launch {instance_id}", group.launch.provider, self._ask_launch, group,
                                    launch, record)

    def _ask_launch(self, group: NodeGroup, launch: autoscaler.Launch, record: InstanceRecord) -> None:
        """On the provider's thread: ask the cloud for the recorded instance."""
        instance_id = record.id
        current = self.instances.get(instance_id)
        if current is not None and current.state != REQUESTED:
            log.info("not launching %s: it is %s now (waited behind a slow cloud)", instance_id, current.state,
                     extra=_fields(record))
            return
        labels = {"group": group.name, "region": launch.region, "role": launch.role}
        try:
            provider = self.providers.get(group.launch.provider)
            if provider is None:
                raise ProviderError(f"provider {group.launch.provider} is not configured on this controller")
            capacity = group.launch.capacity[launch.role]
            script = render_boot_script(
                group.launch.boot_script or DEFAULT_BOOT_SCRIPT, package=self.settings.node_package,
                zk_hosts=self.settings.zk_hosts, zk_root=self.settings.zk_root, zk_auth=self.settings.zk_auth or "",
                role=launch.role,
                region=launch.region, group=group.name, capacity=capacity, media=group.launch.media,
                node_id=instance_id, cluster_id=self.settings.cluster_id)
            instance = provider.launch(LaunchRequest(
                cluster_id=self.settings.cluster_id, group=group.name, region=launch.region, role=launch.role,
                name=instance_id, image=group.launch.image, size=group.launch.size, boot_script=script,
                capacity=capacity, media=group.launch.media,
                placement=group.launch.placement.get(launch.region, {})))
        except Exception as exc:  # noqa: BLE001 - whatever a driver raises fails this launch, not the step
            exc = exc if isinstance(exc, (ProviderError, KeyError, ValueError)) else _unexpected(exc)
            if getattr(exc, "unconfirmed", False):  # it may exist: left requested, the sweep adopts it if so,
                LAUNCHES.labels(**labels, outcome="unconfirmed").inc()  # else it fails when unconfirmed too long
                log.warning("launch of %s unconfirmed (the sweep adopts it if the cloud made it): %s", instance_id,
                            exc, extra=_fields(record))
                self._write(record.moved(REQUESTED, record.state_since_ms, f"launch unconfirmed: {exc}"[:300]))
                return
            if getattr(exc, "unreachable", False):  # nothing reached the cloud: an outage, not a bad launch
                LAUNCHES.labels(**labels, outcome="unreachable").inc()
                delay = self._unreachable.failed(group.launch.provider, launch.region)
                log.warning("launch of %s did not reach the cloud (%s): no launch to %s in %s for %.0f s; not "
                            "counted against the failure budget", instance_id, exc, group.launch.provider,
                            launch.region, delay, extra=_fields(record))
                self._write(record.moved(FAILED, now_ms(), f"cloud unreachable: {exc}"[:300]))
                return
            LAUNCHES.labels(**labels, outcome="failed").inc()
            log.warning("launch of %s failed: %s", instance_id, exc, extra=_fields(record))
            self._write(record.moved(FAILED, now_ms(), f"launch failed: {exc}"[:300], failure="launch failed"))
            return
        self._unreachable.answered(group.launch.provider, launch.region)
        LAUNCHES.labels(**labels, outcome="ok").inc()
        log.info("launched %s (%s): %s", instance_id, instance.id, launch.reason, extra=_fields(record))
        self._write(record.moved(STARTING, now_ms(), launch.reason, provider_id=instance.id))

    def _destroy(self, now: int, record: InstanceRecord) -> None:
        provider = self.providers.get(record.provider)
        try:
            if provider is None:
                raise ProviderError(f"provider {record.provider} is not configured on this controller")
            provider.destroy(record.provider_id, self.settings.cluster_id)
        except Exception as exc:  # noqa: BLE001 - retried like a refusal; the step's other actions go on
            exc = exc if isinstance(exc, ProviderError) else _unexpected(exc)
            DESTROYS.labels("failed").inc()
            log.warning("destroying %s failed (retrying): %s", record.id, exc, extra=_fields(record))
            self._write(record.moved(record.state, now_ms(), f"{autoscaler.DESTROY_FAILED}: {exc}"[:300]))
            return
        DESTROYS.labels("ok").inc()
        log.info("destroyed %s", record.id, extra=_fields(record))
        self._write(record.moved(GONE, now_ms(), record.reason))

    def _write(self, record: InstanceRecord) -> None:
        try:
            self.instances.write(record)
        except Conflict as exc:
            log.warning("lost a lifecycle change: %s", exc)

    def _send_drain(self, record: InstanceRecord) -> None:
        try:
            from streammanager.commands import send_command
        except ImportError:  # pragma: no cover - the command channel ships with the agent
            log.error("no command channel: cannot ask %s to drain", record.id)
            return
        self._drain_asked[record.id] = time.monotonic()
        try:
            send_command(self.client, self.paths, record.id, "drain")
        except KazooException as exc:
            log.warning("could not ask %s to drain: %s", record.id, exc, extra=_fields(record))

    # -- strays and lost confirmations ---------------------------------------------------------------
    def sweep(self, now: int) -> list[Future | None]:
        """Adopt launches whose confirmation was lost; destroy this cluster's instances no record knows.
        Each provider's listing is queued on its own thread; returns the queued calls."""
        records = self.instances.records()
        groups = self.groups.all()
        used = {r.provider for r in records.values()} | {g.launch.provider for g in groups}
        regions = sorted({r.region for r in records.values()} | {region for g in groups for region in g.regions})
        return [self._actions.submit(f"sweep {name}", name, self._sweep_provider, name, regions, now)
                for name in sorted(used & set(self.providers))]

    def _sweep_provider(self, name: str, regions: list[str], now: int) -> None:
        provider = self.providers[name]
        provider.know_regions(regions)
        try:
            listing = provider.listing(self.settings.cluster_id)
        except Exception as exc:  # noqa: BLE001
            exc = exc if isinstance(exc, ProviderError) else _unexpected(exc)
            log.warning("could not list %s instances: %s", name, exc)
            return
        for region, why in listing.unlisted.items():  # the other regions are swept
            log.warning("could not list %s instances in %s: %s", name, region, why, extra={"region": region})
        found = listing.instances
        records = self.instances.records()  # as they are now: the call may have waited behind others
        self._fail_vanished(name, {i.id for i in found if i.state != "terminated"}, records,
                            unlisted=listing.unlisted.keys())
        for instance in found:
            record = records.get(instance.name)
            if record is not None and record.state == REQUESTED and not record.provider_id:
                if self._actions.under_way(f"launch {instance.name}"):
                    continue  # its launch call has not returned yet: it will record the instance
                log.info("adopting %s: launched, confirmation lost", instance.name)
                self._write(record.moved(STARTING, now, "launched (adopted)", provider_id=instance.id))
            elif record is None or record.state == GONE:
                created = int(instance.extra.get("created_ms", 0)) if instance.extra else 0
                if instance.state == "terminated" or (created and now - created < STRAY_GRACE_MS):
                    continue
                log.warning("destroying stray instance %s (no record)", instance.name)
                try:
                    provider.destroy(instance.id, self.settings.cluster_id)
                except Exception as exc:  # noqa: BLE001
                    exc = exc if isinstance(exc, ProviderError) else _unexpected(exc)
                    log.warning("could not destroy stray %s: %s", instance.name, exc)

    def _fail_vanished(self, provider: str, listed: set[str], records: Mapping[str, InstanceRecord],
                       unlisted: Iterable[str] = ()) -> None:
        """A booting instance the cloud no longer lists was terminated behind the controller's back (an
        operator, a spot reclaim): it was waited for until its boot timeout (5 minutes by default) before
        it was replaced. Listings can lag a launch (EC2's are eventually consistent): only instances
        booting for ``VANISHED_AFTER_S`` count."""
        now = now_ms()
        unlisted = set(unlisted)  # regions whose listing failed: what is not listed there may still run
        for record in records.values():
            if (record.provider == provider and record.state == STARTING and record.provider_id
                    and record.region not in unlisted
                    and record.provider_id not in listed and now - record.state_since_ms >= VANISHED_AFTER_S * 1000):
                log.warning("instance %s (%s) is gone from the cloud while booting: replacing it", record.id,
                            record.provider_id, extra=_fields(record))
                self._write(record.moved(FAILED, now, "its instance is gone from the cloud (terminated elsewhere?)",
                                         failure="instance vanished"))

    # -- reporting -----------------------------------------------------------------------------------
    def _report(self, decided: autoscaler.Plan) -> None:
        reported = set()
        for pool in decided.pools:
            POOL_NODES.labels(pool.group, pool.region, pool.role).set(pool.active)
            POOL_UTILIZATION.labels(pool.group, pool.region, pool.role).set(round(pool.utilization, 4))
            reported.add((pool.group, pool.region, pool.role))
        # a deleted group, or a region or role taken out of one, leaves the metrics: its series went on
        # showing its last numbers for the life of the process
        for labels in self._pools_reported - reported:
            for gauge in (POOL_NODES, POOL_UTILIZATION):
                try:
                    gauge.remove(*labels)
                except KeyError:
                    pass
        self._pools_reported = reported
        counts: dict[str, int] = {}
        for record in self.instances.records().values():
            counts[record.state] = counts.get(record.state, 0) + 1
        for state in ("requested", "starting", "inservice", "draining", "terminating", "gone", "failed"):
            INSTANCES.labels(state).set(counts.get(state, 0))
        # A pool held for the same kind of reason (its numbers aside) is logged again once a minute, not
        # at every step: a pool held at its max logged the same line every evaluation interval.
        now = time.monotonic()
        for hold in decided.holds:
            pool = (hold.group, hold.region, hold.role)
            kind = _HOLD_NUMBERS.sub("#", hold.reason)
            logged = self._holds.get(pool)
            if logged is None or logged[0] != kind or now - logged[1] >= HOLD_LOG_EVERY_S:
                log.info("holding %s/%s/%s: %s", *pool, hold.reason,
                         extra={"group": pool[0], "region": pool[1], "role": pool[2]})
                self._holds[pool] = (kind, now)
        known = {(p.group, p.region, p.role) for p in decided.pools}
        self._holds = {pool: logged for pool, logged in self._holds.items() if pool in known}

    def destroy_all(self) -> int:
        """Destroy every instance of this cluster at every configured provider (the demo's and tests'
        clean-up). Returns how many were destroyed."""
        count = 0
        for provider in self.providers.values():
            for instance in provider.list_instances(self.settings.cluster_id):
                if provider.destroy(instance.id, self.settings.cluster_id):
                    count += 1
        return count


def _unexpected(exc: BaseException) -> ProviderError:
    """A provider call that raised something other than ProviderError (a driver's parsing bug, an answer
    it did not expect): logged with its traceback once, handled as the cloud refusing the call."""
    log.error("unexpected error from a cloud provider", exc_info=exc)
    return ProviderError(f"unexpected {type(exc).__name__}: {exc}"[:300])


def _fields(record: InstanceRecord) -> dict:
    return {"node_id": record.id, "group": record.group, "region": record.region, "role": record.role}


__all__ = ["Controller", "Duty", "leader_duties", "TERMINATING"]
