"""``make loadtest``: start a local cluster on loopback, run the locust scenario headless for a bounded
time, stop everything. Extra arguments go to locust (e.g. ``--users 100 --run-time 60s``)."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from streammanager.localcluster import LocalCluster, default_layout  # noqa: E402
from streammanager.zookeeper import free_port  # noqa: E402

REGIONS = ["us-east-1", "eu-west-1"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--users", type=int, default=60)
    parser.add_argument("--spawn-rate", type=float, default=20)
    parser.add_argument("--run-time", default="30s")
    args, extra = parser.parse_known_args()
    work = Path(tempfile.mkdtemp(prefix="sm-loadtest-"))
    cluster = LocalCluster(work_dir=work, nodes=default_layout(REGIONS, base_port=free_port() % 20000 + 20000),
                           api_port=free_port(), zk_port=free_port(), access_token="loadtest-token")
    try:
        cluster.start(progress=lambda line: print(line, flush=True))
        env = {**os.environ, "SM_ACCESS_TOKEN": cluster.access_token, "LOADTEST_REGIONS": ",".join(REGIONS)}
        return subprocess.call([sys.executable, "-m", "locust", "-f", str(Path(__file__).parent / "locustfile.py"),
                                "--headless", "--users", str(args.users), "--spawn-rate", str(args.spawn_rate),
                                "--run-time", args.run_time, "--stop-timeout", "5", "--only-summary",
                                "--host", cluster.api_url, *extra], env=env, timeout=3600)
    finally:
        cluster.stop()


if __name__ == "__main__":
    sys.exit(main())
