"""Stop a child `python -m pipelines ...` at a known point, so a test's kill -9 lands there every time.

Waiting for a file to appear and then killing races the process: on a fast machine a whole burst of
commits can land between two polls. Instead the child stops itself (SIGSTOP) right after its N-th call
of one function, the test waits until it is stopped, and kills it from outside as a user's kill -9
would. Nothing in the pipeline is replaced: the function runs as it always does, then the process stops.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from benchmarks._common import proc_stat

from conftest import REPO

_VARIABLE = "SLOWFAST_TEST_STOP_AFTER"

# Imported by the child at start-up (sitecustomize). It reads and removes the variable at once, so the
# processes the child starts (Ray's raylet and workers) run without the hook.
_HOOK = f'''
import importlib, os, signal

_spec = os.environ.pop("{_VARIABLE}", None)
if _spec:
    _target, _calls = _spec.rsplit("@", 1)
    _module_name, _function = _target.split(":")
    _module = importlib.import_module(_module_name)
    _real = getattr(_module, _function)
    _left = [int(_calls)]

    def _stopping(*args, **kwargs):
        result = _real(*args, **kwargs)
        _left[0] -= 1
        if _left[0] == 0:
            os.kill(os.getpid(), signal.SIGSTOP)
        return result

    setattr(_module, _function, _stopping)
'''


def stop_after(tmp: Path, target: str, calls: int) -> dict[str, str]:
    """Environment for a child (with this repository on its path) that stops itself right after its `calls`-th
    call of `target` ("package.module:function", looked up on the module at call time)."""
    hook_dir = tmp / "stop-hook"
    hook_dir.mkdir(exist_ok=True)
    (hook_dir / "sitecustomize.py").write_text(_HOOK)
    return {**os.environ, _VARIABLE: f"{target}@{calls}", "PYTHONPATH": f"{hook_dir}{os.pathsep}{REPO}"}


def wait_stopped(proc, timeout_s: float, what: str, log: Path | None = None) -> None:
    """Wait until `proc` has stopped itself; fail with what it printed (its stdout pipe, or `log`) if it ends
    or never stops."""
    deadline = time.time() + timeout_s
    while True:
        if proc.poll() is not None:
            out = log.read_text() if log else proc.stdout.read().decode() if proc.stdout else ""
            raise AssertionError(f"the process ended before {what}:\n{out[-3000:]}")
        if proc_stat(str(proc.pid))[0] == "T":  # the state: stopped
            return
        if time.time() > deadline:
            raise AssertionError(f"the process did not stop after {what} within {timeout_s:.0f} s")
        time.sleep(0.05)
