"""The cluster leaves nothing behind: a run that fails, and one interrupted with Ctrl-C
(SIGINT, as a terminal sends it), end with no namespace, link or process of theirs left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cluster.harness import require_cluster
from tests.cluster.net import forwarders, links, namespaces
from tests.conftest import ROOT, wait_until

pytestmark = pytest.mark.cluster


def _probe(tmp_path: Path, mode: str) -> subprocess.Popen[bytes]:
    require_cluster()
    env = {
        **os.environ,
        "CLUSTER_PROBE": mode,
        "CLUSTER_PROBE_PIDS": str(tmp_path / "pid"),
    }
    env.pop("PYTEST_CURRENT_TEST", None)
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--basetemp",
            str(tmp_path / "probe"),
            str(ROOT / "tests" / "cluster" / "probe_cleanup.py"),
        ],
        cwd=ROOT,
        env=env,
        stdout=(tmp_path / f"{mode}.log").open("wb"),
        stderr=subprocess.STDOUT,
    )


def _nothing_left(tmp_path: Path) -> None:
    pid = int((tmp_path / "pid").read_text())
    assert (namespaces(), links(), forwarders()) == ([], [], [])
    assert not Path(f"/proc/{pid}").exists(), f"process {pid} of the cluster survived"


def test_a_failed_run_cleans_up(tmp_path: Path) -> None:
    probe = _probe(tmp_path, "fail")
    assert probe.wait(120) == 1, (tmp_path / "fail.log").read_text()
    assert "the probe fails on purpose" in (tmp_path / "fail.log").read_text()
    _nothing_left(tmp_path)


def test_an_interrupted_run_cleans_up(tmp_path: Path) -> None:
    probe = _probe(tmp_path, "wait")
    wait_until(
        lambda: (tmp_path / "pid").exists() or probe.poll() is not None,
        timeout=120,
        interval=0.1,
        message="the probe's cluster to run",
    )
    assert probe.poll() is None, (tmp_path / "wait.log").read_text()
    assert namespaces() and links()
    probe.send_signal(signal.SIGINT)
    assert probe.wait(120) == 2, (tmp_path / "wait.log").read_text()  # pytest: interrupted
    _nothing_left(tmp_path)
