"""The agent's Prometheus metrics (``GET /metrics`` on its HTTP port), read from its state at scrape time.

One registry per agent (tests run several in one process): counters for what happens (hooks, failed
writes), and a collector for the state, read when scraped instead of gauges set on the hooks' path.
No label takes a stream's name: a node carries up to tens of thousands of streams, and any client can
name one.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from streammanager.models import NODE_STATES

if TYPE_CHECKING:
    from node_agent.agent import Agent


class AgentMetrics:
    """An agent's registry: its counters, and the rest read from its state at each scrape."""

    def __init__(self, agent: "Agent"):
        self.registry = CollectorRegistry(auto_describe=False)
        # call: the fixed set the hook routes accept ("unknown" for a malformed hook)
        self.hooks = Counter("sm_agent_hooks", "Media server hooks answered, by call and outcome (allowed, "
                             "refused, malformed)", ["call", "outcome"], registry=self.registry)
        self.report_failures = Counter("sm_agent_report_failures", "Node record writes that failed",
                                       registry=self.registry)
        self.registry.register(_StateCollector(agent))


class _StateCollector(Collector):
    def __init__(self, agent: "Agent"):
        self._agent = agent

    def collect(self) -> Iterator[Metric]:
        agent = self._agent
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
        if agent.media is not None:
            yield _gauge("sm_agent_media_serving", "1 while nginx runs and answers", 1 if agent.media.serving else 0)
            yield CounterMetricFamily("sm_agent_media_restarts", "nginx restarts after it exited or hung",
                                      value=agent.media.restarts)
        if agent.relays is not None:
            yield _gauge("sm_agent_relays", "Relays from origins running (ffmpeg)", agent.relays.running())


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)

