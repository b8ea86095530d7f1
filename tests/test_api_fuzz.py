"""Random malformed lookups never get a 500 or an error in another shape than the documented one."""
import random

import json

from tests.conftest import asgi_get
from tests.test_api import cluster  # noqa: F401  (the fixture)

P = "/streammanager/api/2.0"
PIECES = ["live", "a", "%2F", "%00", "%FF", "x" * 300, "%E2%82%AC", "..", ".", "%20", "a%2Fb", "?", "%25", "\u00e9",
          "ap-northeast-1", "us-east-1", "nowhere-9", "", "true", "1", "yes", "TRUE", "0", "false", "%0A"]


def random_url(rng: random.Random) -> str:
    scope, name = rng.choice(PIECES + ["live"] * 5), rng.choice(PIECES + ["s1"] * 5)
    params = [f"{key}={rng.choice(PIECES + ['broadcast', 'subscribe'] * 4)}"
              for key in ("action", "region", "strict", "accessToken") if rng.random() < 0.7]
    if rng.random() < 0.2:
        params.append("action=" + rng.choice(PIECES))  # a repeated parameter
    prefix = "/streammanager/api/1.0" if rng.random() < 0.05 else P
    if rng.random() < 0.1:
        return f"{prefix}/event/{scope}/{name}/stats"
    return f"{prefix}/event/{scope}/{name}?{'&'.join(params)}"


def documented_error(headers: dict, body: bytes) -> bool:
    if headers.get("content-type") != "application/json":
        return False
    try:
        return set(json.loads(body)) == {"errorMessage", "timestamp"}
    except ValueError:
        return False


def test_malformed_lookups_get_documented_errors_never_a_500(front, cluster):  # noqa: F811
    """Through the server's front, as gunicorn serves it (lookups on the loop, the rest through Flask)."""
    assert cluster["us_origin"].publish("s1").status_code == 200
    rng = random.Random(3)
    statuses, bad = {}, []
    for _ in range(3000):
        url = random_url(rng)
        status, headers, body = asgi_get(front, url)
        statuses[status] = statuses.get(status, 0) + 1
        if status >= 500 or (status >= 400 and not documented_error(headers, body)):
            bad.append((url, status, body[:200]))
    assert not bad, bad[:10]
    assert statuses.get(200) and statuses.get(400) and statuses.get(404)  # every kind of answer was reached


def test_lookup_query_parsing_agrees_with_the_standard_library():
    """The front's query parsing (a plain split when there is nothing to decode) reads every query as
    ``parse_qsl`` does, the first value of a repeated name winning, as Flask's ``request.args.get``."""
    from urllib.parse import parse_qsl

    from streammanager.api import query_args

    rng = random.Random(11)
    alphabet = ["action", "region", "strict", "=", "=", "&", "&", "&&", "%", "%2", "%41", "+", ";", "a", "subscribe",
                "eu-west-1", "\u00e9", " ", "%zz", "=="]
    for _ in range(5000):
        query = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 12)))
        expected: dict[str, str] = {}
        for name, value in parse_qsl(query, keep_blank_values=True):
            expected.setdefault(name, value)
        assert query_args(query) == expected, query
