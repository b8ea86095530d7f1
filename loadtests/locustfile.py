"""Locust scenario: broadcasters, subscribers and an admin against a local cluster.

Broadcasters ask where to publish, then "publish" by calling the chosen origin agent's nginx hook,
hold the stream for a while and unpublish; subscribers pick a live stream, ask where to play and
"play" through the chosen edge agent's hook; an admin polls the node and stream lists. Run through
``make loadtest`` (loadtests/run_locust.py), which starts the cluster on loopback and stops it.
"""
from __future__ import annotations

import itertools
import os
import random

from locust import HttpUser, between, task

P = "/streammanager/api/2.0"
TOKEN = os.environ.get("SM_ACCESS_TOKEN", "")
REGIONS = os.environ.get("LOADTEST_REGIONS", "us-east-1,eu-west-1").split(",")
_ids = itertools.count(1)


class ClusterUser(HttpUser):
    abstract = True
    agents: dict[str, str] = {}  # serverAddress -> agent URL, shared by all users

    def on_start(self):
        if not ClusterUser.agents:
            nodes = self.client.get(f"{P}/admin/node", params={"accessToken": TOKEN}, name="admin node list").json()
            ClusterUser.agents = {n["serverAddress"]: n["agentUrl"] for n in nodes}

    def hook(self, server_address: str, form: dict, name: str):
        agent = ClusterUser.agents.get(server_address)
        if agent is None:
            return None
        return self.client.post(f"{agent}/hooks/nginx", data=form, name=name)


class Broadcaster(ClusterUser):
    weight = 1
    wait_time = between(1, 3)

    @task
    def broadcast(self):
        name = f"show{next(_ids)}"
        with self.client.get(f"{P}/event/live/{name}", params={"action": "broadcast",
                             "region": random.choice(REGIONS)}, name="broadcast lookup",
                             catch_response=True) as answer:
            if answer.status_code != 200:
                answer.failure(answer.text)
                return
            origin = answer.json()["serverAddress"]
        form = {"app": "live", "name": name, "clientid": f"pub-{name}", "addr": "127.0.0.1",
                "flashver": "FMLE/3.0", "type": "live"}
        self.hook(origin, {**form, "call": "publish"}, "publish hook")
        self.wait()
        self.wait()
        self.hook(origin, {**form, "call": "publish_done"}, "publish_done hook")


class Subscriber(ClusterUser):
    weight = 5
    wait_time = between(0.5, 2)

    @task
    def watch(self):
        live = self.client.get(f"{P}/event/list", name="stream list").json()
        if not live:
            return
        stream = random.choice(live)
        with self.client.get(f"{P}/event/live/{stream['name']}", params={"action": "subscribe",
                             "region": random.choice(REGIONS)}, name="subscribe lookup",
                             catch_response=True) as answer:
            if answer.status_code == 404:
                answer.success()  # ended between the list and the lookup
                return
            if answer.status_code != 200:
                answer.failure(answer.text)
                return
            edge = answer.json()["serverAddress"]
        form = {"app": "live", "name": stream["name"], "clientid": f"v{next(_ids)}", "addr": "127.0.0.1",
                "flashver": "LNX 9,0,124,2"}
        with self.client.post(f"{ClusterUser.agents.get(edge, '')}/hooks/nginx", data={**form, "call": "play"},
                              name="play hook", catch_response=True) as played:
            if played.status_code == 404:
                played.success()  # the stream ended meanwhile
        self.wait()
        self.hook(edge, {**form, "call": "play_done"}, "play_done hook")


class Admin(ClusterUser):
    weight = 1
    fixed_count = 1
    wait_time = between(2, 4)

    @task(3)
    def stats(self):
        self.client.get(f"{P}/event/list/stats", name="stream stats list")

    @task(1)
    def nodes(self):
        self.client.get(f"{P}/admin/node", params={"accessToken": TOKEN}, name="admin node list")
