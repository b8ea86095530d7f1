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
import socket
import threading
import time
import re
from typing import Callable, Mapping, Protocol

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
    FAILED,
    GONE,
    REQUESTED,
    STARTING,
    TERMINATING,
    InstanceRecord,
    NodeGroup,
    new_instance_id,
)
from streammanager.registry import RegistryView, ZkPaths, ensure_layout, make_client, now_ms
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

STRAY_GRACE_MS = 120_000  # an untracked instance younger than this may be a launch being recorded


class Duty(Protocol):
    """A leader-only background job: runs until ``stop`` is set (when leadership ends)."""

    name: str

    def run(self, stop: threading.Event) -> None: ...


def leader_duties(client: KazooClient, paths: ZkPaths, settings: ControllerSettings) -> list[Duty]:
    """Every leader-only job besides scaling. Add new ones here."""
    from streammanager.callbacks import CallbackDispatcher  # the durable event callbacks to the application

    return [CallbackDispatcher(client, paths, settings.event_callback or EventCallbackSettings())]


class Controller:
    def __init__(self, settings: ControllerSettings, providers: Mapping[str, CloudProvider],
                 client: KazooClient | None = None,
                 duties: Callable[[KazooClient, ZkPaths, ControllerSettings], list[Duty]] = leader_duties):
        self.settings = settings
        self.providers = dict(providers)
        self.paths = ZkPaths(settings.zk_root)
        self.client = client or make_client(settings.zk_hosts, settings.zk_timeout_s)
        self.identity = settings.controller_id or f"{socket.gethostname()}-{os.getpid()}"
        self.groups = GroupStore(self.client, self.paths)
        self.instances = InstanceStore(self.client, self.paths)
        self.view = RegistryView(self.client, self.paths)
        self._duties = duties
        self._last_evaluated: dict[str, int] = {}
        self._last_sweep = 0.0
        self._pools_reported: set[tuple[str, str, str]] = set()  # the pool series the last step set
        self._holds: dict[tuple[str, str, str], tuple[str, float]] = {}  # pool -> (kind of hold, logged at)
        self.leading = threading.Event()
        self._lost = threading.Event()

    # -- process lifecycle ---------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Campaign, lead while elected, campaign again after losing the lead; until ``stop``."""
        self.client.add_listener(self._on_state)
        self.client.start(timeout=30)
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

    def _on_state(self, state: str) -> None:
        if state in (KazooState.SUSPENDED, KazooState.LOST):
            self._lost.set()  # a leader that cannot see ZooKeeper must stop acting at once

    def _lead(self, stop: threading.Event) -> None:
        self._lost.clear()
        if not self.client.connected:
            return
        log.info("controller %s leads", self.identity)
        LEADER.set(1)
        self.leading.set()
        ended = threading.Event()
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
            for thread in threads:
                thread.join(10)
            self.instances.close()
            self.leading.clear()
            LEADER.set(0)
            # a follower reports no pools or instances: the leader does (summed over the controllers,
            # the last numbers of a former leader counted every pool twice)
            POOL_NODES.clear()
            POOL_UTILIZATION.clear()
            INSTANCES.clear()
            self._pools_reported = set()
            log.info("controller %s stopped leading", self.identity)

    # -- one step ------------------------------------------------------------------------------------
    def run_once(self, now: int) -> autoscaler.Plan:
        started = time.perf_counter()
        if time.monotonic() - self._last_sweep >= self.settings.sweep_interval_s:
            self._last_sweep = time.monotonic()
            self.sweep(now)
        groups = {g.name: g for g in self.groups.all()}
        nodes = {n.id: n for n in self.view.nodes()}
        decided = autoscaler.plan(now, groups.values(), self.instances.records(), nodes, self._last_evaluated)
        self._last_evaluated.update(decided.evaluated)
        self._carry_out(now, decided, groups)
        self._report(decided)
        RUN_SECONDS.observe(time.perf_counter() - started)
        return decided

    def _carry_out(self, now: int, decided: autoscaler.Plan, groups: dict[str, NodeGroup]) -> None:
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
        for destroy in decided.destroys:
            if self._lost.is_set():
                return
            if destroy.record.id in destroying:
                self._destroy(now, destroy.record)
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
                return  # the next leader decides again from the records; launching on would double them
            self._launch(now, groups[launch.group], launch)

    def _launch(self, now: int, group: NodeGroup, launch: autoscaler.Launch) -> None:
        instance_id = new_instance_id(group.name, launch.region, launch.role)
        record = InstanceRecord(id=instance_id, group=group.name, region=launch.region, role=launch.role,
                                provider=group.launch.provider, state=REQUESTED, created_ms=now,
                                state_since_ms=now, reason=launch.reason)
        self.instances.create(record)  # recorded before the provider is asked: never launched twice
        labels = {"group": group.name, "region": launch.region, "role": launch.role}
        try:
            provider = self.providers.get(group.launch.provider)
            if provider is None:
                raise ProviderError(f"provider {group.launch.provider} is not configured on this controller")
            capacity = group.launch.capacity[launch.role]
            script = render_boot_script(
                group.launch.boot_script or DEFAULT_BOOT_SCRIPT, package=self.settings.node_package,
                zk_hosts=self.settings.zk_hosts, zk_root=self.settings.zk_root, role=launch.role,
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
            LAUNCHES.labels(**labels, outcome="failed").inc()
            log.warning("launch of %s failed: %s", instance_id, exc, extra=_fields(record))
            self._write(record.moved(FAILED, now_ms(), f"launch failed: {exc}"[:300], failure="launch failed"))
            return
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
        try:
            send_command(self.client, self.paths, record.id, "drain")
        except KazooException as exc:
            log.warning("could not ask %s to drain: %s", record.id, exc, extra=_fields(record))

    # -- strays and lost confirmations ---------------------------------------------------------------
    def sweep(self, now: int) -> None:
        """Adopt launches whose confirmation was lost; destroy this cluster's instances no record knows."""
        records = self.instances.records()
        groups = self.groups.all()
        used = {r.provider for r in records.values()} | {g.launch.provider for g in groups}
        regions = {r.region for r in records.values()} | {region for g in groups for region in g.regions}
        for name in sorted(used & set(self.providers)):
            self.providers[name].know_regions(sorted(regions))
            try:
                found = self.providers[name].list_instances(self.settings.cluster_id)
            except Exception as exc:  # noqa: BLE001
                exc = exc if isinstance(exc, ProviderError) else _unexpected(exc)
                log.warning("could not list %s instances: %s", name, exc)
                continue
            for instance in found:
                record = records.get(instance.name)
                if record is not None and record.state == REQUESTED and not record.provider_id:
                    log.info("adopting %s: launched, confirmation lost", instance.name)
                    self._write(record.moved(STARTING, now, "launched (adopted)", provider_id=instance.id))
                elif record is None or record.state == GONE:
                    created = int(instance.extra.get("created_ms", 0)) if instance.extra else 0
                    if instance.state == "terminated" or (created and now - created < STRAY_GRACE_MS):
                        continue
                    log.warning("destroying stray instance %s (no record)", instance.name)
                    try:
                        self.providers[name].destroy(instance.id, self.settings.cluster_id)
                    except Exception as exc:  # noqa: BLE001
                        exc = exc if isinstance(exc, ProviderError) else _unexpected(exc)
                        log.warning("could not destroy stray %s: %s", instance.name, exc)

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
