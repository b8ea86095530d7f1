"""The agent's Prometheus metrics (``GET /metrics`` on its HTTP port), read from its state at scrape time.

One registry per agent (tests run several in one process), and a collector instead of gauges set on
the way: nothing is counted on the hooks' path but their outcomes. No label takes a stream's name: a
node carries up to tens of thousands of streams, and any client can name one.
"""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from streammanager.models import NODE_STATES

if TYPE_CHECKING:
    from node_agent.agent import Agent

HOOK_OUTCOMES = ("allowed", "refused", "malformed")


class HookCounts:
    """Hooks answered, by call and outcome (the calls are the fixed set the hook routes accept)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str], int] = {}

    def add(self, call: str, outcome: str) -> None:
        with self._lock:
            self._counts[(call, outcome)] = self._counts.get((call, outcome), 0) + 1

    def snapshot(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return dict(self._counts)


class AgentCollector(Collector):
    def __init__(self, agent: "Agent"):
        self._agent = agent

    def collect(self) -> Iterator[Metric]:
        agent = self._agent
        hooks = CounterMetricFamily("sm_agent_hooks", "Media server hooks answered, by call and outcome",
                                    labels=["call", "outcome"])
        for (call, outcome), count in sorted(agent.hook_counts.snapshot().items()):
            hooks.add_metric([call, outcome], count)
        yield hooks
        loads = agent.table.loads().values()
        yield _gauge("sm_agent_streams", "Streams this node carries", len(loads))
        yield _gauge("sm_agent_publishers", "Publishers on this node", sum(1 for x in loads if x.publishing))
        yield _gauge("sm_agent_subscribers", "Viewers on this node (relays to edges not counted)",
                     sum(x.subscribers for x in loads))
        yield _gauge("sm_agent_capacity", "Capacity: publishers on an origin, viewers on an edge",
                     agent.settings.capacity)
        state = GaugeMetricFamily("sm_agent_state", "The node's state (1 for the current one)", labels=["state"])
        for name in NODE_STATES:
            state.add_metric([name], 1.0 if agent.state == name else 0.0)
        yield state
        yield _gauge("sm_agent_zookeeper_connected", "1 while the agent's ZooKeeper session is connected",
                     1 if agent.client.connected else 0)
        yield _gauge("sm_agent_registered", "1 while the node record is its current ZooKeeper session's",
                     1 if agent.registered.is_set() and agent.registered_on_current_session() else 0)
        yield _gauge("sm_agent_record_bytes", "Size of the node record (ZooKeeper refuses one over jute.maxbuffer)",
                     agent.record_bytes)
        yield CounterMetricFamily("sm_agent_report_failures", "Node record writes that failed",
                                  value=agent.report_failures)
        if agent.media is not None:
            yield _gauge("sm_agent_media_serving", "1 while nginx runs and answers", 1 if agent.media.serving else 0)
            yield CounterMetricFamily("sm_agent_media_restarts", "nginx restarts after it exited or hung",
                                      value=agent.media.restarts)
        if agent.relays is not None:
            yield _gauge("sm_agent_relays", "Relays from origins running (ffmpeg)", agent.relays.running())


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def agent_registry(agent: "Agent") -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(agent))
    return registry
