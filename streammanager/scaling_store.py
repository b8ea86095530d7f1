"""Node groups and instance records in ZooKeeper (``groups/<name>``, ``instances/<id>``).

Groups are written by the admin API and read by the controller. Instance records are written by the
controller leader; the admin API writes one only to ask for an instance's removal, with a
compare-and-set on the znode version, like every other write here, so two writers never lose an update.
"""
from __future__ import annotations

import logging
import threading

from kazoo.client import KazooClient
from kazoo.exceptions import BadVersionError, NodeExistsError, NoNodeError
from kazoo.recipe.cache import TreeCache, TreeEvent

from streammanager.groups import GONE, TERMINATING, InstanceRecord, NodeGroup
from streammanager.models import RecordError
from streammanager.registry import ZkPaths

log = logging.getLogger(__name__)


class Conflict(RuntimeError):
    """A compare-and-set lost against another writer; re-read and decide again."""


class GroupStore:
    def __init__(self, client: KazooClient, paths: ZkPaths):
        self.client = client
        self.paths = paths

    def create(self, group: NodeGroup) -> bool:
        """False when a group of that name exists."""
        self.client.retry(self.client.ensure_path, self.paths.groups)
        try:
            self.client.retry(self.client.create, self.paths.group(group.name), group.to_json())
        except NodeExistsError:
            return False
        return True

    def update(self, group: NodeGroup) -> bool:
        """False when there is no such group."""
        try:
            self.client.retry(self.client.set, self.paths.group(group.name), group.to_json())
        except NoNodeError:
            return False
        return True

    def delete(self, name: str) -> bool:
        try:
            self.client.retry(self.client.delete, self.paths.group(name))
        except NoNodeError:
            return False
        return True

    def get(self, name: str) -> NodeGroup | None:
        try:
            data, _ = self.client.retry(self.client.get, self.paths.group(name))
        except NoNodeError:
            return None
        return NodeGroup.from_json(data)

    def all(self) -> list[NodeGroup]:
        try:
            names = self.client.retry(self.client.get_children, self.paths.groups)
        except NoNodeError:
            return []
        groups = []
        for name in sorted(names):
            try:
                group = self.get(self.paths.decode(name))
            except RecordError as exc:
                log.error("node group %s is unreadable and ignored: %s", name, exc, extra={"group": name})
                continue
            if group is not None:
                groups.append(group)
        return groups


def read_instances(client: KazooClient, paths: ZkPaths) -> dict[str, tuple[InstanceRecord, int]]:
    """Every instance record with its znode version (direct reads: for the admin API)."""
    try:
        names = client.retry(client.get_children, paths.instances)
    except NoNodeError:
        return {}
    found = {}
    for name in names:
        try:
            data, stat = client.retry(client.get, f"{paths.instances}/{name}")
            record = InstanceRecord.from_json(data)
        except NoNodeError:
            continue
        except RecordError as exc:
            log.error("instance record %s is unreadable: %s", name, exc)
            continue
        found[record.id] = (record, stat.version)
    return found


def request_removal(client: KazooClient, paths: ZkPaths, instance_id: str, now_ms: int) -> InstanceRecord | None:
    """Ask the controller to terminate an instance now (the admin API's node delete). None when there
    is no such instance; the record unchanged when it is already on its way out."""
    path = paths.instance(instance_id)
    for _ in range(5):
        try:
            data, stat = client.retry(client.get, path)
        except NoNodeError:
            return None
        record = InstanceRecord.from_json(data)
        if record.state in (TERMINATING, GONE):
            return record
        moved = record.moved(TERMINATING, now_ms, "removed by an operator")
        try:
            client.retry(client.set, path, moved.to_json(), version=stat.version)
            return moved
        except BadVersionError:
            continue
        except NoNodeError:
            return None
    raise Conflict(f"instance {instance_id} kept changing; try again")


class InstanceStore:
    """The controller's copy of every instance record: a TreeCache keeps it current with writes made
    elsewhere (the admin API); the controller's own writes update it at once, so the next decision
    sees them without waiting for the watch."""

    def __init__(self, client: KazooClient, paths: ZkPaths):
        self.client = client
        self.paths = paths
        self._records: dict[str, tuple[InstanceRecord, int]] = {}
        self._lock = threading.Lock()
        self._cache: TreeCache | None = None
        self._loaded = threading.Event()

    def start(self, timeout_s: float = 30.0) -> None:
        self.client.retry(self.client.ensure_path, self.paths.instances)
        with self._lock:
            self._records = read_instances(self.client, self.paths)
        self._cache = TreeCache(self.client, self.paths.instances)
        self._cache.listen(self._on_event)
        self._cache.start()
        self._loaded.wait(timeout_s)

    def close(self) -> None:
        if self._cache is not None:
            self._cache.close()
            self._cache = None

    def _on_event(self, event: TreeEvent) -> None:
        if event.event_type == TreeEvent.INITIALIZED:
            self._loaded.set()
            return
        if event.event_data is None or event.event_data.path.count("/") != self.paths.instances.count("/") + 1:
            return
        name = self.paths.decode(event.event_data.path.rsplit("/", 1)[1])
        with self._lock:
            known = self._records.get(name)
            if event.event_type == TreeEvent.NODE_REMOVED:
                self._records.pop(name, None)
                return
            if event.event_type not in (TreeEvent.NODE_ADDED, TreeEvent.NODE_UPDATED):
                return
            version = event.event_data.stat.version
            if known is not None and known[1] >= version:
                return  # our own write, already applied
            try:
                self._records[name] = (InstanceRecord.from_json(event.event_data.data), version)
            except RecordError as exc:
                log.error("instance record %s is unreadable: %s", name, exc)

    def records(self) -> dict[str, InstanceRecord]:
        with self._lock:
            return {k: v[0] for k, v in self._records.items()}

    def get(self, instance_id: str) -> InstanceRecord | None:
        with self._lock:
            found = self._records.get(instance_id)
        return found[0] if found else None

    def create(self, record: InstanceRecord) -> None:
        self.client.retry(self.client.create, self.paths.instance(record.id), record.to_json())
        with self._lock:
            self._records[record.id] = (record, 0)

    def write(self, record: InstanceRecord) -> None:
        """Compare-and-set against the version we last saw; :class:`Conflict` when someone else wrote."""
        with self._lock:
            known = self._records.get(record.id)
        if known is None:
            raise Conflict(f"instance {record.id} is not known")
        try:
            stat = self.client.retry(self.client.set, self.paths.instance(record.id), record.to_json(),
                                     version=known[1])
        except BadVersionError:
            self._refresh(record.id)
            raise Conflict(f"instance {record.id} was changed by another writer") from None
        except NoNodeError:
            with self._lock:
                self._records.pop(record.id, None)
            raise Conflict(f"instance {record.id} was deleted") from None
        with self._lock:
            self._records[record.id] = (record, stat.version)

    def forget(self, instance_id: str) -> None:
        try:
            self.client.retry(self.client.delete, self.paths.instance(instance_id))
        except NoNodeError:
            pass
        with self._lock:
            self._records.pop(instance_id, None)

    def _refresh(self, instance_id: str) -> None:
        try:
            data, stat = self.client.retry(self.client.get, self.paths.instance(instance_id))
            record = InstanceRecord.from_json(data)
        except NoNodeError:
            with self._lock:
                self._records.pop(instance_id, None)
            return
        with self._lock:
            self._records[instance_id] = (record, stat.version)
