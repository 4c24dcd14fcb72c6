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
def test_loopback_head():
    port = _free_port()
    temp_dir = tempfile.mkdtemp(prefix="mray", dir="/tmp")  # short: Ray's unix socket paths have a length limit
    env = {**os.environ, "MINILLM_RAY_PORT": str(port), "MINILLM_NUM_CPUS": "2", "MINILLM_NUM_GPUS": "0",
           "MINILLM_INCLUDE_DASHBOARD": "false", "MINILLM_RAY_TEMP_DIR": temp_dir,
           # fixed default ports (client server 10001, dashboard agent 52365) could clash with other clusters
           "MINILLM_RAY_EXTRA": f"--ray-client-server-port={_free_port()} --dashboard-agent-listen-port={_free_port()}",
           # Ray 2.60 turns token auth on for new clusters; this private loopback cluster opts out
           "RAY_AUTH_MODE": "disabled"}
    # own session: `ray start` daemonises gcs_server/raylet/... into this process group, which we end below
    proc = subprocess.Popen(["bash", str(CLUSTER / "start_head.sh")], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=45)
        assert proc.returncode == 0, out
        deadline = time.monotonic() + 30
        while True:  # `ray status` answers "No cluster status" until the autoscaler's first report
            status = subprocess.run(["ray", "status", "--address", f"127.0.0.1:{port}"], env=env,
                                    capture_output=True, text=True, timeout=30)
            assert status.returncode == 0, status.stderr[-2000:]
            if "No cluster status" not in status.stdout or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert "2.0 CPU" in status.stdout, status.stdout  # MINILLM_NUM_CPUS reached `ray start`
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            time.sleep(2)
        shutil.rmtree(temp_dir, ignore_errors=True)
