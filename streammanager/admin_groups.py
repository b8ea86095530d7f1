"""Admin routes for node groups and their nodes (Red5 Pro's route names, accessToken as in 2.0).

``/admin/nodegroup`` (create, list), ``/admin/nodegroup/<name>`` (read, update, delete),
``/admin/nodegroup/<name>/node`` (the group's nodes with their lifecycle state),
``/admin/node/<id>/sunset`` and Red5's ``/admin/node/sunset`` (drain), ``DELETE /admin/node/<id>``.
The controller does the scaling; these routes only store intent in ZooKeeper.
"""
from __future__ import annotations

import logging

from flask import Blueprint, jsonify, request
from kazoo.exceptions import KazooException

from streammanager.api import API_PREFIX, node_json, require_admin, services
from streammanager.errors import ApiError, BadRequest, NotFound, ServiceUnavailable
from streammanager.groups import GroupError, InstanceRecord, NodeGroup, validate_group_name
from streammanager.models import NodeRecord, RecordError, validate_name
from streammanager.registry import now_ms
from streammanager.scaling_store import Conflict, GroupStore, read_instances, request_removal

log = logging.getLogger(__name__)

admin_groups = Blueprint("admin_groups", __name__, url_prefix=API_PREFIX)

MAX_SUNSET_ADDRESSES = 1000


def _groups() -> GroupStore:
    svc = services()
    return GroupStore(svc.client, svc.paths)


def _zk(call, *args):
    """A ZooKeeper call from an admin route: unreachable ZooKeeper is a 503, not a 500."""
    svc = services()
    if not svc.client.connected:
        # kazoo queues a call while it reconnects: the route hung as long as the outage, and a change the
        # client had given up on was made when ZooKeeper came back
        raise ServiceUnavailable("the registry (ZooKeeper) is unreachable: nothing was read or changed, try again")
    try:
        return call(*args)
    except (KazooException, svc.client.handler.timeout_exception) as exc:
        raise ServiceUnavailable(f"the registry is unreachable: {exc.__class__.__name__}") from None


def _body():
    try:
        doc = request.get_json(silent=True)
    except RecursionError:  # silent=True covers ValueError only; a deeply nested body raises this
        raise BadRequest("the body is nested too deeply") from None
    if doc is None:
        raise BadRequest("the body must be JSON (Content-Type: application/json)")
    return doc


def _group_name(name: str) -> str:
    try:
        return validate_group_name(name)
    except GroupError as exc:
        raise BadRequest(exc.args[0]) from None


def _parsed(doc, name: str | None = None) -> NodeGroup:
    try:
        return NodeGroup.from_api(doc, name)
    except RecordError as exc:
        raise BadRequest(str(exc)) from None


@admin_groups.post("/admin/nodegroup")
def create_group(version: str):
    require_admin()
    group = _parsed(_body())
    if not _zk(_groups().create, group):
        raise BadRequest(f"node group {group.name!r} exists: PUT /admin/nodegroup/{group.name} updates it")
    log.info("node group %s created", group.name, extra={"group": group.name, "action": "create"})
    return jsonify(group.to_api()), 201


@admin_groups.get("/admin/nodegroup")
def list_groups(version: str):
    require_admin()
    return jsonify([g.to_api() for g in _zk(_groups().all)])


@admin_groups.get("/admin/nodegroup/<name>")
def get_group(version: str, name: str):
    require_admin()
    group = _zk(_groups().get, _group_name(name))
    if group is None:
        raise NotFound(f"no node group {name!r}")
    return jsonify(group.to_api())


@admin_groups.put("/admin/nodegroup/<name>")
def update_group(version: str, name: str):
    require_admin()
    group = _parsed(_body(), _group_name(name))
    if not _zk(_groups().update, group):
        raise NotFound(f"no node group {name!r}: POST /admin/nodegroup creates it")
    log.info("node group %s updated", group.name, extra={"group": group.name, "action": "update"})
    return jsonify(group.to_api())


@admin_groups.delete("/admin/nodegroup/<name>")
def delete_group(version: str, name: str):
    """The controller drains and terminates the group's instances once the group is gone."""
    require_admin()
    store = _groups()
    group = _zk(store.get, _group_name(name))
    if group is None or not _zk(store.delete, group.name):
        raise NotFound(f"no node group {name!r}")
    log.info("node group %s deleted", group.name, extra={"group": group.name, "action": "delete"})
    return jsonify({**group.to_api(), "deleted": True})


def _managed_json(record: InstanceRecord, node: NodeRecord | None) -> dict:
    doc = node_json(node) if node is not None else {
        "id": record.id, "group": record.group, "role": record.role, "region": record.region,
        "serverAddress": None, "agentUrl": None}
    doc.update({"state": record.state, "nodeState": node.state if node is not None else None,
                "managed": True, "provider": record.provider, "providerId": record.provider_id or None,
                "createdMs": record.created_ms, "stateSinceMs": record.state_since_ms,
                "reason": record.reason})
    if record.drain_deadline_ms:
        doc["drainDeadlineMs"] = record.drain_deadline_ms
    if record.failure:
        doc["failure"] = record.failure
    return doc


def _unmanaged_json(node: NodeRecord) -> dict:
    return {**node_json(node), "nodeState": node.state, "managed": False}


@admin_groups.get("/admin/nodegroup/<name>/node")
def group_nodes(version: str, name: str):
    """The group's instances (lifecycle state) and any node registered in the group by hand."""
    require_admin()
    name = _group_name(name)
    svc = services()
    records = {k: r for k, (r, _) in _zk(read_instances, svc.client, svc.paths).items() if r.group == name}
    # a deleted group's instances drain and go after it: they are listed until then (not a 404)
    if not records and _zk(_groups().get, name) is None:
        raise NotFound(f"no node group {name!r}")
    nodes = {n.id: n for n in svc.view.nodes() if n.group == name or n.id in records}
    listed = [_managed_json(r, nodes.get(r.id)) for r in records.values()]
    listed += [_unmanaged_json(n) for n in nodes.values() if n.id not in records]
    return jsonify(sorted(listed, key=lambda d: d["id"]))


def _drain(node: NodeRecord) -> dict:
    from streammanager.commands import send_command

    svc = services()
    _zk(send_command, svc.client, svc.paths, node.id, "drain")
    log.info("node %s sunset by an operator", node.id, extra={"node_id": node.id, "action": "sunset"})
    return {"id": node.id, "serverAddress": node.host, "region": node.region, "role": node.role,
            "state": "draining"}


def _node_id(node_id: str) -> str:
    try:
        return validate_name("node", node_id)
    except RecordError as exc:
        raise BadRequest(str(exc)) from None


@admin_groups.post("/admin/node/<node_id>/sunset")
def sunset_node(version: str, node_id: str):
    require_admin()
    node = services().view.node(_node_id(node_id))
    if node is None:
        raise NotFound(f"no node {node_id!r} is registered")
    return jsonify(_drain(node))


@admin_groups.post("/admin/node/sunset")
def sunset_by_address(version: str):
    """Red5 Pro's form: a JSON list of server addresses; every node at one of them drains."""
    require_admin()
    addresses = _body()
    if not isinstance(addresses, list) or not addresses or len(addresses) > MAX_SUNSET_ADDRESSES \
            or not all(isinstance(a, str) and a for a in addresses):
        raise BadRequest(f"the body must be a JSON list of 1 to {MAX_SUNSET_ADDRESSES} server addresses")
    by_host: dict[str, list[NodeRecord]] = {}
    for node in services().view.nodes():
        by_host.setdefault(node.host, []).append(node)
    unknown = [a for a in addresses if a not in by_host]
    if unknown:
        raise NotFound(f"no node at {', '.join(a[:60] for a in unknown[:5])}")
    return jsonify([_drain(node) for a in dict.fromkeys(addresses) for node in by_host[a]])


@admin_groups.delete("/admin/node/<node_id>")
def delete_node(version: str, node_id: str):
    """Terminate an instance the controller launched, now (no drain: sunset first for that)."""
    require_admin()
    svc = services()
    node_id = _node_id(node_id)
    try:
        record = _zk(request_removal, svc.client, svc.paths, node_id, now_ms())
    except Conflict as exc:
        raise ApiError(str(exc)) from None
    if record is None:
        if svc.view.node(node_id) is not None:
            raise BadRequest(f"node {node_id!r} was not launched by the controller: stop its agent instead "
                             "(or sunset it)")
        raise NotFound(f"no node {node_id!r}")
    log.info("node %s removed by an operator", node_id, extra={"node_id": node_id, "action": "delete"})
    return jsonify({"id": record.id, "group": record.group, "region": record.region, "role": record.role,
                    "state": record.state})
