"""`sparrow batch --ray ADDRESS` on a local Ray cluster this test starts (`ray start --head` on 127.0.0.1): the same
records as the in-process run, and the same resume contract."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
from conftest import package_root
from test_batch_cli import records, write_jobs

pytest.importorskip("ray", reason='Ray is a test extra: pip install "ray[data]"')


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray = shutil.which("ray", path=os.path.dirname(sys.executable)) or shutil.which("ray")
    temp = tmp_path_factory.mktemp("ray")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    subprocess.run([ray, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "2",
                    "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"],
                   cwd=package_root(), env=env, check=True, capture_output=True, timeout=180)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True, timeout=120, check=False)


def test_batch_on_a_ray_cluster_gives_the_in_process_records(cluster, smollm_path, tmp_path):
    write_jobs(tmp_path / "in.jsonl", 40)
    with open(tmp_path / "in.jsonl", "a") as f:
        f.write("{broken\n")  # a bad line is an error record there too
    args = [sys.executable, "-m", "sparrow", "batch", str(tmp_path / "in.jsonl"), "-m", str(smollm_path), "--ctx",
            "256", "--parallel", "4", "--threads", "2", "-q", "--temperature", "0.8", "--seed", "3"]
    env = {**os.environ, "SPARROW_HOME": str(tmp_path / "store")}
    local, remote = tmp_path / "local.jsonl", tmp_path / "ray.jsonl"
    subprocess.run(args + ["-o", str(local)], cwd=package_root(), env=env, check=True, timeout=600)
    # half the job already done: the cluster answers only the rest
    lines = local.read_text().splitlines()
    remote.write_text("\n".join(lines[:20]) + "\n")
    subprocess.run(args + ["-o", str(remote), "--ray", cluster], cwd=package_root(), env=env, check=True,
                   timeout=600)
    want = {r["line"]: r for r in records(local)}
    got = records(remote)
    assert sorted(r["line"] for r in got) == list(range(1, 42))
    assert all(r == want[r["line"]] for r in got)
    assert "error" in want[41] and json.loads(lines[0])["line"] in want
