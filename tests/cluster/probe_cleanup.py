"""Run only by tests/cluster/test_cleanup.py, in a pytest of its own: builds a small cluster,
starts a long-lived process on a host, writes its pid to $CLUSTER_PROBE_PIDS, then fails
(CLUSTER_PROBE=fail) or waits to be interrupted (CLUSTER_PROBE=wait)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from tests.cluster.harness import Cluster


def test_probe(cluster: Cluster) -> None:
    cluster.up(["api1", "worker1"])
    process = cluster.run("worker1", "sleeper", ["sleep", "600"])
    Path(os.environ["CLUSTER_PROBE_PIDS"]).write_text(str(process.popen.pid))
    if os.environ["CLUSTER_PROBE"] == "fail":
        raise AssertionError("the probe fails on purpose")
    time.sleep(600)
