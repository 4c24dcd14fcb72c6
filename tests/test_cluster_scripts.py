"""launch/cluster/*.sh: syntax, usage errors, the command submit.sh builds, and one real loopback head.

The loopback test starts a Ray head through start_head.sh in its own process group and ends exactly
that group afterwards (never `ray stop`, which would stop every Ray process of this user, including
other tests' local clusters).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "launch" / "cluster"
SCRIPTS = ["start_head.sh", "start_worker.sh", "submit.sh"]


def _run(args, env=None, timeout=30):
    return subprocess.run(["bash", *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize("name", SCRIPTS + ["slurm_example.sbatch"])
def test_syntax_and_strict_mode(name):
    path = CLUSTER / name
    r = _run(["-n", path])
    assert r.returncode == 0, r.stderr
    assert "set -euo pipefail" in path.read_text()


@pytest.mark.parametrize("name, args, message", [
    ("start_head.sh", ["extra"], "unexpected argument 'extra'"),
    ("start_worker.sh", [], "expected exactly one argument, HEAD_ADDR; got 0"),
    ("start_worker.sh", ["10.0.0.1", "10.0.0.2"], "got 2"),
    ("start_worker.sh", ["--address=x"], "HEAD_ADDR must be an IP or IP:PORT"),
    ("submit.sh", [], "missing CONFIG"),
    ("submit.sh", ["no_such_config"], "neither a YAML file nor a shipped config"),
    ("submit.sh", ["cpu_tiny", "trainer.steps"], "must look like section.key=value"),
])
def test_usage_errors(name, args, message):
    # every bad call exits 2 with the reason and the usage text, before anything touches Ray
    r = _run([CLUSTER / name, *args])
    assert r.returncode == 2
    assert message in r.stderr
    assert "MINILLM_" in r.stderr  # the usage text (environment section) follows the reason


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_exits_zero(name):
    r = _run([CLUSTER / name, "--help"])
    assert r.returncode == 0 and "Environment" in r.stderr


def test_submit_command(tmp_path):
    r = _run([CLUSTER / "submit.sh", "qwen2.5-7b_to_0.5b", "trainer.steps=5"],
             env={"MINILLM_DRY_RUN": "1", "MINILLM_HEAD": "10.1.2.3", "MINILLM_SUBMIT_ARGS": "--no-wait"})
    assert r.returncode == 0, r.stderr
    cmd = r.stdout
    assert cmd.startswith("ray job submit --address http://10.1.2.3:8265 ")
    assert '"working_dir": "."' in cmd and '"VLLM_USE_FLASHINFER_SAMPLER": "0"' in cmd
    assert "--no-wait -- minillm train --config qwen2.5-7b_to_0.5b --no-progress trainer.steps=5 " in cmd
    # the driver joins the cluster, after the user's overrides so they cannot undo it
    assert cmd.rstrip().endswith("cluster.address=auto cluster.num_cpus=null")


def test_submit_config_file_relative_to_repo():
    r = _run([CLUSTER / "submit.sh", ROOT / "launch" / "configs" / "gkd_cpu.yaml"], env={"MINILLM_DRY_RUN": "1"})
    assert r.returncode == 0, r.stderr
    assert "--config launch/configs/gkd_cpu.yaml " in r.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("ray") is None, reason="the `ray` CLI is not installed")
@pytest.mark.parametrize("auth", ["disabled", "token"])
def test_loopback_head_and_worker(tmp_path, auth):
    """The head and a worker started by the scripts form one cluster. In token mode (the scripts' default: Ray 2.60
    refuses a node or client in another mode) the head makes the token and the worker, in the same home, joins."""
    port = _free_port()
    temp_dir = tempfile.mkdtemp(prefix="mray", dir="/tmp")  # short: Ray's unix socket paths have a length limit
    env = {**os.environ, "MINILLM_RAY_PORT": str(port), "MINILLM_NUM_CPUS": "2", "MINILLM_NUM_GPUS": "0",
           "MINILLM_INCLUDE_DASHBOARD": "false", "MINILLM_RAY_TEMP_DIR": temp_dir,
           "HOME": str(tmp_path),  # the token file, if any, is this test's own
           # fixed default ports (client server 10001, dashboard agent 52365) could clash with other clusters
           "MINILLM_RAY_EXTRA": f"--ray-client-server-port={_free_port()} --dashboard-agent-listen-port={_free_port()}"}
    env.pop("RAY_AUTH_MODE", None)
    if auth == "disabled":
        env["RAY_AUTH_MODE"] = "disabled"
    status_env = {**env, "RAY_AUTH_MODE": auth}  # a client in the cluster's mode
    worker_env = {**env, "MINILLM_NUM_CPUS": "1", "MINILLM_RAY_EXTRA": f"--dashboard-agent-listen-port={_free_port()}"}
    procs = []

    def start(script, *args, env):
        # own session: `ray start` daemonises gcs_server/raylet/... into this process group, which we end below
        procs.append(subprocess.Popen(["bash", str(CLUSTER / script), *args], env=env, start_new_session=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        out, _ = procs[-1].communicate(timeout=60)
        assert procs[-1].returncode == 0, out

    def cluster_cpus(want: str) -> str:
        deadline = time.monotonic() + 40
        while True:  # `ray status` answers "No cluster status" until the autoscaler's first report
            status = subprocess.run(["ray", "status", "--address", f"127.0.0.1:{port}"], env=status_env,
                                    capture_output=True, text=True, timeout=30)
            assert status.returncode == 0, status.stderr[-2000:]
            if want in status.stdout or time.monotonic() > deadline:
                return status.stdout
            time.sleep(1)

    try:
        start("start_head.sh", env=env)
        if auth == "token":
            assert (tmp_path / ".ray" / "auth_token").is_file()
        assert "2.0 CPU" in cluster_cpus("2.0 CPU")  # MINILLM_NUM_CPUS reached `ray start`
        start("start_worker.sh", f"127.0.0.1:{port}", env=worker_env)
        assert "3.0 CPU" in cluster_cpus("3.0 CPU")
    finally:
        for proc in procs:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                time.sleep(2)
        shutil.rmtree(temp_dir, ignore_errors=True)
