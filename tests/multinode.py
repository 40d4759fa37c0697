"""A Ray cluster of several nodes on 127.0.0.1, each its own raylet started with `ray start` on ports of its own,
as Ray tests multi-node behaviour on one machine: a head that runs no tasks (0 CPUs, the job drivers), plus nodes
with `--labels` roles. Token authentication is on, as Ray 2.60 sets it up for local clusters; the token travels by
environment, so nothing is written to ~/.ray.

A node is killed as a machine dies: SIGKILL to its process group (the raylet, its agents and its workers).
Jobs go in with `ray job submit` (their drivers run on the head); the dashboard's REST API, the one `ray job
status`, `ray job logs` and `ray list` ask, says how a job is doing and where each task and actor ran. They go in
without a working dir: the nodes of one machine share the session's runtime_resources folder, so one node's
runtime-env agent would unpack or delete the job's code under another's running job (seen: a job's driver losing
pipelines/train.py mid-run). The code reaches every node as it does on a cluster whose image has the project
installed: the venv's (editable) install. tests/test_job_submit.py starts a head that does the work itself
(head_cpus=2, one node) and submits with the working dir, as the README does.
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
import urllib.error
import urllib.parse
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
# Read by Ray Train's controller: how long it waits for its workers' placement group before it tries again with
# the workers that fit then (default 60 s). After a node's loss its first try can still count the lost node's
# resources (its view lags the GCS by a few seconds) and ask for a group that cannot be placed; on this cluster
# a group that can be placed is placed in well under a second.
QUICK_TRAIN_RETRIES = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "10"}
# What train workers ask for beside the train-node label (train.resources_per_worker): Ray 2.60's elastic
# scaling counts the workers that fit from the resources asked for, ignoring labels, and these CPU-only train
# nodes sit beside CPU data nodes (on a real cluster the GPUs tell them apart).
TRAIN_SLOT = {"train_slot": 1}


class LocalCluster:
    """`ray start --head` plus `add_node`s; `stop` ends them all (only these: `ray stop` would end every Ray on
    the machine, the test session's own included). head_cpus: 0 for a cluster of nodes (the head runs the job
    drivers only), more for a head that also does the work (one node, as in the README)."""

    def __init__(self, tmp: Path, head_cpus: int = 0):
        self.tmp = tmp
        tmp.mkdir(parents=True, exist_ok=True)
        self.env = {
            **os.environ,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(16),
            **FAST_HEALTH_CHECKS,
            **QUICK_TRAIN_RETRIES,
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
                f"--num-cpus={head_cpus}",
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
            # The head's log monitor reads the session's log folder, which every node of this machine shares: one
            # per node would send each line of a worker's output to the driver once per node (Ray's advice: one
            # log monitor per host).
            args = [f"--address={self.address}", f"--num-cpus={cpus}", f"--labels={labels}", *extra]
            args.append("--include-log-monitor=false")
            for tries_left in (1, 0):
                self._start(name, args)
                if self._joined(name):
                    break
                # `ray start` waits 30 s for its raylet to register, which a loaded machine can miss: once more,
                # after what it started is gone (a raylet registering late would be a second node of that name).
                log = self.log(name)
                self.kill(name)
                assert tries_left and "timed out during startup" in log, f"node {name} did not start: {log[-3000:]}"
                self._wait_dead()

    def kill(self, name: str) -> None:
        """The node's machine dies: SIGKILL to its raylet, agents and workers at once."""
        proc = self.nodes.pop(name)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # it had ended by itself (a failed start)
            pass
        proc.wait()

    def remove_nodes(self, timeout: float = 60) -> None:
        """Every node but the head killed, and declared dead by Ray: the next scenario starts from the head alone
        (a node killed a moment ago still counts as alive for a few seconds)."""
        for name in [n for n in self.nodes if n != "head"]:
            self.kill(name)
        self._wait_dead(timeout)

    def stop(self) -> None:
        """Every node gone at once (the test is over: nothing to drain)."""
        for name in list(self.nodes):
            self.kill(name)

    # --- what Ray says -------------------------------------------------------------------------------------

    def state(self, kind: str, *filters: str) -> list[dict]:
        """What `ray list KIND --detail` lists (nodes, tasks, actors...), asked of the State API that command asks:
        the dead nodes and the tasks and actors that ran on them included. FILTERS as `ray list --filter` takes
        them: "state=ALIVE", "job_id!=01000000"."""
        query = {"limit": 10000, "timeout": 24, "detail": "True", "exclude_driver": "True"}
        for f in filters:
            key, predicate, value = re.fullmatch(r"([^!=]+)(!=|=)(.*)", f).groups()
            for field, part in (("filter_keys", key), ("filter_predicates", predicate), ("filter_values", value)):
                query.setdefault(field, []).append(part)
        for _ in range(10):  # a node that is just joining can make one query fail
            try:
                answer = self.api(f"/api/v0/{kind}", query)
            except urllib.error.HTTPError as exc:
                answer = {"result": False, "msg": f"HTTP {exc.code}: {exc.read()[-2000:]!r}"}
            if answer["result"]:
                return answer["data"]["result"]["result"]
            time.sleep(1)
        raise AssertionError(f"the State API's {kind}: {answer['msg']}")

    def node_ids(self, alive: bool = True) -> dict[str, str]:
        """{node name: Ray node id} of the nodes added (and alive, by default)."""
        return {
            n["labels"]["test-node"]: n["node_id"]
            for n in self.state("nodes")
            if "test-node" in n.get("labels", {}) and (n["state"] == "ALIVE" or not alive)
        }

    # --- jobs ----------------------------------------------------------------------------------------------

    def submit(self, *command: str, options: tuple[str, ...] = ()) -> str:
        """`ray job submit OPTIONS -- COMMAND`, not waiting; returns the submission id. No options: no working
        dir (see the module's docstring)."""
        submission = f"test-{secrets.token_hex(4)}"
        args = [
            RAY,
            "job",
            "submit",
            "--address",
            self.dashboard,
            *options,
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
        """SUCCEEDED | FAILED | STOPPED once the job has ended, else None (what `ray job status` says)."""
        status = self.job(submission)["status"]
        return status if status in ("SUCCEEDED", "FAILED", "STOPPED") else None

    def job(self, submission: str) -> dict:
        """The Jobs API's record of the job (what `ray job status` shows): its status, its Ray job id..."""
        return self.api(f"/api/jobs/{submission}")

    def job_id(self, submission: str, timeout: float = 120) -> str:
        """The Ray job id of the submission's driver (the job_id of every task and actor it starts), once the
        driver has connected."""
        deadline = time.time() + timeout
        while not (job_id := self.job(submission).get("job_id")):
            assert time.time() < deadline and not self.ended(submission), self.logs(submission)[-4000:]
            time.sleep(0.25)
        return job_id

    def wait(self, submission: str, timeout: float = 900) -> tuple[str, str]:
        """(SUCCEEDED | FAILED | STOPPED, the job's log) once the job ends."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            status = self.ended(submission)
            if status:
                return status, self.logs(submission)
            time.sleep(0.5)
        raise AssertionError(f"job {submission} not finished after {timeout}s:\n{self.logs(submission)[-4000:]}")

    def logs(self, submission: str) -> str:
        """What `ray job logs` prints: the driver's output."""
        return self.api(f"/api/jobs/{submission}/logs")["logs"]

    def api(self, path: str, query: dict | None = None) -> dict:
        """GET of the dashboard's REST API, as Ray's CLI sends it (the token as a bearer): JSON back. The polls
        of a test go this way, not through `ray job status` or `ray list`: each of those is a Python start and
        seconds of CPU, taken from the cluster under test on a machine of 2 cores."""
        url = f"{self.dashboard}{path}" + (f"?{urllib.parse.urlencode(query, doseq=True)}" if query else "")
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"})
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.load(response)

    # --- internals -----------------------------------------------------------------------------------------

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def _wait_dead(self, timeout: float = 60) -> None:
        """Until Ray lists alive no node that this object no longer runs."""
        deadline = time.time() + timeout
        while gone := set(self.node_ids()) - set(self.nodes):
            assert time.time() < deadline, f"nodes still alive {timeout}s after their kill: {gone}"
            time.sleep(0.25)

    def _joined(self, name: str, timeout: float = 180) -> bool:
        """True once Ray lists the node alive, False if its `ray start` gave up first."""
        deadline = time.time() + timeout
        while name not in self.node_ids():
            if self.nodes[name].poll() is not None:
                return False
            assert time.time() < deadline, f"node {name} did not join in {timeout}s: {self.log(name)[-3000:]}"
            time.sleep(0.25)
        return True

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
