"""A Ray cluster of several nodes on 127.0.0.1, each its own raylet started with `ray start` on ports of its own,
as Ray tests multi-node behaviour on one machine: a head that runs no tasks (0 CPUs, the job drivers), plus nodes
with `--labels` roles. Token authentication is on, as Ray 2.60 sets it up for local clusters; the token travels by
environment, so nothing is written to ~/.ray.

A node is killed as a machine dies: SIGKILL to its process group (the raylet, its agents and its workers).
Jobs go in with `ray job submit` (their drivers run on the head); Ray's state API (`ray list`) says where each
task and actor ran. They go in without a working dir: the nodes of one machine share the session's
runtime_resources folder, so one node's runtime-env agent would unpack or delete the job's code under another's
running job (seen: a job's driver losing pipelines/train.py mid-run). The code reaches every node as it does on a
cluster whose image has the project installed: the venv's (editable) install. tests/test_job_submit.py submits
with the working dir, as the README does, to a single node.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from conftest import REPO, free_port

RAY = str(Path(sys.executable).parent / "ray")
# Read by the GCS: a dead node is declared dead after about 3 s (defaults: 3 s x 5) so that Ray Train sees the
# loss of its workers quickly.
FAST_HEALTH_CHECKS = {
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
    "RAY_health_check_timeout_ms": "1000",
}
# What train workers ask for beside the train-node label (train.resources_per_worker): Ray 2.60's elastic
# scaling counts the workers that fit from the resources asked for, ignoring labels, and these CPU-only train
# nodes sit beside CPU data nodes (on a real cluster the GPUs tell them apart).
TRAIN_SLOT = {"train_slot": 1}


class LocalCluster:
    """`ray start --head` plus `add_node`s; `stop` ends them all (only these: `ray stop` would end every Ray on
    the machine, the test session's own included)."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        tmp.mkdir(parents=True, exist_ok=True)
        self.env = {
            **os.environ,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(16),
            **FAST_HEALTH_CHECKS,
        }
        self.env.pop("RAY_ADDRESS", None)
        # As after `source .venv/bin/activate`: a job's `python` is the one the nodes run on.
        self.env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{self.env.get('PATH', '')}"
        self.port, dashboard = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard = f"http://127.0.0.1:{dashboard}"
        self.nodes: dict[str, subprocess.Popen] = {}
        self._start(
            "head",
            [
                "--head",
                f"--port={self.port}",
                "--num-cpus=0",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dashboard}",
            ],
        )
        self._wait_for_dashboard()

    def add_nodes(self, *nodes: tuple[str, int, str | None]) -> None:
        """(name, CPUs, role or None) each: a node with the labels test-node=NAME and node-role=ROLE (a train
        node also declares the resource train_slot: 1, see TRAIN_SLOT), started in turn; returns once Ray lists
        them all alive."""
        for name, cpus, role in nodes:  # one at a time: raylets starting together on 2 cores time out
            labels = f"test-node={name}" + (f",node-role={role}" if role else "")
            extra = [f"--resources={json.dumps(TRAIN_SLOT)}"] if role == "train" else []
            self._start(name, [f"--address={self.address}", f"--num-cpus={cpus}", f"--labels={labels}", *extra])
            deadline = time.time() + 180
            while name not in self.node_ids():
                assert self.nodes[name].poll() is None, self.log(name)[-3000:]
                assert time.time() < deadline, f"node {name} did not join: {self.log(name)[-3000:]}"
                time.sleep(1)

    def kill(self, name: str) -> None:
        """The node's machine dies: SIGKILL to its raylet, agents and workers at once."""
        proc = self.nodes.pop(name)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # it had ended by itself (a failed start)
            pass
        proc.wait()

    def stop(self) -> None:
        """Every node gone at once (the test is over: nothing to drain)."""
        for name in list(self.nodes):
            self.kill(name)

    # --- what Ray says -------------------------------------------------------------------------------------

    def state(self, kind: str, *filters: str) -> list[dict]:
        """`ray list KIND --detail` as dicts (nodes, tasks, actors...)."""
        args = [RAY, "list", kind, "--address", self.dashboard, "--format", "json", "--detail", "--limit", "10000"]
        for f in filters:
            args += ["--filter", f]
        for _ in range(10):  # a node that is just joining can make one query fail
            done = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=120)
            if done.returncode == 0 and "[" in done.stdout:
                return json.loads(done.stdout[done.stdout.index("[") :])
            time.sleep(2)
        raise AssertionError(f"ray list {kind}: {done.stdout[-2000:]}{done.stderr[-2000:]}")

    def node_ids(self, alive: bool = True) -> dict[str, str]:
        """{node name: Ray node id} of the nodes added (and alive, by default)."""
        return {
            n["labels"]["test-node"]: n["node_id"]
            for n in self.state("nodes")
            if "test-node" in n.get("labels", {}) and (n["state"] == "ALIVE" or not alive)
        }

    # --- jobs ----------------------------------------------------------------------------------------------

    def submit(self, *command: str) -> str:
        """`ray job submit` of `command` (no working dir: see the module's docstring), not waiting; returns the
        submission id."""
        submission = f"test-{secrets.token_hex(4)}"
        args = [
            RAY,
            "job",
            "submit",
            "--address",
            self.dashboard,
            "--submission-id",
            submission,
            "--no-wait",
            "--",
            *command,
        ]
        # The dashboard answers before the head's job agent is up ("No available agent ... try again later").
        for _ in range(30):
            done = subprocess.run(args, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=300)
            if done.returncode == 0 or "No available agent" not in done.stderr + done.stdout:
                break
            time.sleep(2)
        assert done.returncode == 0, done.stdout + done.stderr
        return submission

    def ended(self, submission: str) -> str | None:
        """SUCCEEDED | FAILED | STOPPED once the job has ended, else None."""
        done = subprocess.run(
            [RAY, "job", "status", "--address", self.dashboard, submission],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        out = re.sub(r"\x1b\[[0-9;]*m", "", done.stdout + done.stderr)
        # "Job '<id>' succeeded" / "failed" / "was stopped", or "Status for job ...: RUNNING".
        for word, said in (("SUCCEEDED", "succeeded"), ("FAILED", "failed"), ("STOPPED", "was stopped")):
            if f"Job '{submission}' {said}" in out:
                return word
        return None

    def wait(self, submission: str, timeout: float = 900) -> tuple[str, str]:
        """(SUCCEEDED | FAILED | STOPPED, the job's log) once the job ends."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            status = self.ended(submission)
            if status:
                return status, self.logs(submission)
            time.sleep(3)
        raise AssertionError(f"job {submission} not finished after {timeout}s:\n{self.logs(submission)[-4000:]}")

    def logs(self, submission: str) -> str:
        return subprocess.run(
            [RAY, "job", "logs", "--address", self.dashboard, submission],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout

    # --- internals -----------------------------------------------------------------------------------------

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def _start(self, name: str, args: list[str]) -> None:
        # Every port a node opens is a free one: the test session's own local Ray holds Ray's defaults (the
        # dashboard agent's 52365 among them), and a second agent on the same port never comes up.
        ports = [
            f"--{flag}={free_port()}"
            for flag in (
                "dashboard-agent-listen-port",
                "dashboard-agent-grpc-port",
                "runtime-env-agent-port",
                "metrics-export-port",
            )
        ]
        self.nodes[name] = subprocess.Popen(
            [RAY, "start", "--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats", *args, *ports],
            env=self.env,
            cwd=self.tmp,
            stdout=open(self.tmp / f"{name}.log", "wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # its own process group: killed as one machine

    def _wait_for_dashboard(self, timeout: float = 180) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.nodes["head"].poll() is None, self.log("head")[-3000:]
            try:
                with urllib.request.urlopen(f"{self.dashboard}/api/version", timeout=2):
                    return
            except OSError as exc:  # refused while starting; 401 once up with token auth
                if getattr(exc, "code", None) in (401, 403):
                    return
                time.sleep(1)
        raise AssertionError(f"the dashboard at {self.dashboard} did not come up: {self.log('head')[-3000:]}")


def where(records: list[dict], name_pattern: str) -> set[str]:
    """The node ids that the tasks or actors whose name matches `name_pattern` ran on."""
    out = set()
    for r in records:
        name = r.get("name") or r.get("class_name") or ""
        if re.search(name_pattern, name) and r.get("node_id"):
            out.add(r["node_id"])
    return out
