"""``GET /dashboard``: the cluster at a glance for an operator's browser, from this worker's registry view.

One server-rendered page, no JavaScript: health (ZooKeeper, the view's age), every node by region with
its load, and the busiest live streams. It refreshes itself every few seconds. It shows node addresses,
so it takes the admin token like the admin API (``?accessToken=`` or ``Authorization: Bearer``). Names
come from agents' records: Jinja's autoescaping keeps them text.
"""
from __future__ import annotations

import heapq
import time
from dataclasses import dataclass

from flask import Blueprint, Response, current_app, render_template, request

from streammanager.api import require_admin, services
from streammanager.errors import BadRequest
from streammanager.models import NodeRecord

dashboard = Blueprint("dashboard", __name__)

TOP_STREAMS = 100
RANKED_UP_TO = 20_000  # ranking live streams reads all of them: at 100 000, about a second of a worker
DEFAULT_REFRESH_S = 5


@dataclass(frozen=True)
class NodeRow:
    node: NodeRecord
    load_pct: float
    report_age_s: float

    @classmethod
    def of(cls, node: NodeRecord, now_ms: int) -> "NodeRow":
        load = 100.0 * node.used / node.capacity if node.capacity else 100.0
        return cls(node, min(load, 100.0), max(0.0, (now_ms - node.updated_ms) / 1000))


@dashboard.get("/dashboard")
def show():
    require_admin()
    refresh = request.args.get("refresh", str(DEFAULT_REFRESH_S))
    if not (refresh.isascii() and refresh.isdigit()) or not 0 <= int(refresh) <= 3600:  # "²" is a digit
        raise BadRequest("refresh must be a number of seconds from 0 (off) to 3600")
    svc = services()
    if int(refresh) == DEFAULT_REFRESH_S:  # what open dashboards reload: one page a second for them all
        page = svc.listings.get("dashboard", svc.view, lambda: _page(svc, DEFAULT_REFRESH_S))
    else:
        page = _page(svc, int(refresh))
    return Response(page, mimetype="text/html", headers={"Cache-Control": "no-store",
                                                         "Referrer-Policy": "no-referrer"})


def _page(svc, refresh: int) -> str:
    view = svc.view
    now = int(time.time() * 1000)
    regions: dict[str, list[NodeRow]] = {}
    for node in sorted(view.nodes(), key=lambda n: (n.region, n.role != "origin", n.id)):
        regions.setdefault(node.region, []).append(NodeRow.of(node, now))
    stream_count = view.stream_count()
    busiest = []
    if stream_count <= RANKED_UP_TO:
        busiest = heapq.nsmallest(TOP_STREAMS, view.live_streams(), key=lambda s: (-s.subscribers, str(s.key)))
    return render_template(
        _page_template(), view=view, regions=regions, streams=busiest, stream_count=stream_count, now=now,
        ranked_up_to=RANKED_UP_TO,
        root=svc.settings.zk_root, refresh=refresh, age_s=view.age_ms() / 1000,
        generated=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(now / 1000)))


def _page_template():
    """The page's template, compiled once per app: ``render_template_string`` compiled it again on every
    view (tens of milliseconds of a worker's CPU, holding the GIL from its lookups, at every refresh of
    every open dashboard). A template from a string has no file name: Flask autoescapes it."""
    template = current_app.extensions.get("dashboard_page")
    if template is None:
        template = current_app.extensions["dashboard_page"] = current_app.jinja_env.from_string(PAGE)
    return template


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
{% if refresh %}<meta http-equiv="refresh" content="{{ refresh }}">{% endif %}
<title>streammanager {{ root }}</title>
<style>
 body { font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }
 h1 { font-size: 1.3em; } h2 { font-size: 1.1em; margin-top: 1.5em; }
 table { border-collapse: collapse; margin: .5em 0; } th, td { padding: .25em .7em; text-align: left; }
 th { background: #eee; } tr:nth-child(even) td { background: #fafafa; } td.n { text-align: right; }
 .ok { color: #176f2c; } .bad { color: #b3261e; font-weight: bold; } .muted { color: #777; }
 .bar { width: 120px; height: .8em; background: #e4e4e4; display: inline-block; vertical-align: middle; }
 .bar span { display: block; height: 100%; background: #3b7dd8; } .bar span.hot { background: #d9822b; }
</style></head><body>
<h1>streammanager <span class="muted">{{ root }}</span></h1>
<p>
 ZooKeeper: {% if view.connected %}<span class="ok">connected</span>{% else %}<span class="bad">disconnected,
 answering from a view {{ "%.0f"|format(age_s) }} s old</span>{% endif %}
 &middot; {{ view.node_count() }} node{{ "s" if view.node_count() != 1 }} &middot; {{ stream_count }} live
 stream{{ "s" if stream_count != 1 }}
 &middot; <span class="muted">{{ generated }}{% if refresh %}, refreshes every {{ refresh }} s{% endif %}</span>
 &middot; <a href="/metrics">metrics</a> &middot; <a href="/healthz">health</a>
</p>
{% if not view.initialized %}<p class="bad">The registry view is not loaded yet.</p>{% endif %}
{% for region, rows in regions.items() %}
<h2>{{ region }} <span class="muted">{{ rows|length }} node{{ "s" if rows|length != 1 }}</span></h2>
<table>
 <tr><th>node</th><th>role</th><th>group</th><th>state</th><th>address</th><th>load</th>
  <th>publishers</th><th>subscribers</th><th>streams</th><th>last report</th></tr>
 {% for row in rows %}{% set n = row.node %}
 <tr><td>{{ n.id }}</td><td>{{ n.role }}</td><td>{{ n.group }}</td>
  <td{% if n.state != "inservice" %} class="bad"{% endif %}>{{ n.state }}</td>
  <td>{{ n.host }}{% if n.rtmp_port != 1935 %}:{{ n.rtmp_port }}{% endif %}</td>
  <td><span class="bar"><span{% if row.load_pct >= 80 %} class="hot"{% endif %}
   style="width: {{ "%.0f"|format(row.load_pct) }}%"></span></span>
   {{ n.used }}/{{ n.capacity }}</td>
  <td class="n">{{ n.publishers }}</td><td class="n">{{ n.subscribers }}</td>
  <td class="n">{{ n.streams|length }}</td><td class="n">{{ "%.0f"|format(row.report_age_s) }} s ago</td></tr>
 {% endfor %}
</table>
{% else %}<p class="muted">No node has registered.</p>
{% endfor %}
<h2>Live streams <span class="muted">{% if streams and stream_count > streams|length %}the {{ streams|length }}
 busiest of {{ stream_count }}{% else %}{{ stream_count }}{% endif %}</span></h2>
{% if streams %}
<table>
 <tr><th>stream</th><th>origin</th><th>region</th><th>subscribers</th><th>live for</th></tr>
 {% for s in streams %}
 <tr><td>{{ s.key.scope_path }}/{{ s.key.name }}</td><td>{{ s.origin.id }}</td><td>{{ s.origin.region }}</td>
  <td class="n">{{ s.subscribers }}</td>
  <td class="n">{% if s.start_ms %}{{ "%.0f"|format((now - s.start_ms) / 1000) }} s{% endif %}</td></tr>
 {% endfor %}
</table>
{% elif stream_count > ranked_up_to %}<p class="muted">Too many live streams to rank here (more than
 {{ ranked_up_to }}): <code>GET /streammanager/api/2.0/event/list/stats</code> lists them all.</p>
{% else %}<p class="muted">No stream is live.</p>{% endif %}
</body></html>
"""
