"""Helpers every benchmark shares: interleaved timing, a Markdown table, the run's environment, JSON output."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch


@dataclass
class Timing:
    """Seconds per call of one case: wall clock, and CPU time of the whole process over the same calls.

    On a shared machine the wall clock includes time other processes held the cores; the CPU time
    leaves that out (it still counts threads spinning while they wait for each other, and shared
    caches still slow it), so the two together tell a slow implementation from a busy machine.
    """

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    @property
    def median_ms(self) -> float:
        return 1e3 * statistics.median(self.wall)

    @property
    def min_ms(self) -> float:
        return 1e3 * min(self.wall)

    @property
    def cpu_median_ms(self) -> float:
        return 1e3 * statistics.median(self.cpu)


def time_interleaved(
    cases: Mapping[str, Callable[[], object]], repeats: int, warmup: int = 1, sync: Callable[[], None] | None = None
) -> dict[str, Timing]:
    """Time each case `repeats` times, the cases taking turns, after `warmup` untimed calls each.

    Alternating the cases within each repetition (and reversing the order every other one)
    spreads drifts in clock speed, cache state and background load evenly over all of them,
    which timing one case after the other does not. `sync` (e.g. torch.cuda.synchronize) is
    called before and after every timed call so that asynchronous devices are measured in full.
    """
    sync = sync or (lambda: None)
    names = list(cases)
    for _ in range(warmup):
        for name in names:
            cases[name]()
    sync()
    timings = {name: Timing() for name in names}
    for rep in range(repeats):
        for name in names if rep % 2 == 0 else names[::-1]:
            sync()
            wall, cpu = time.perf_counter(), time.process_time()
            cases[name]()
            sync()
            timings[name].wall.append(time.perf_counter() - wall)
            timings[name].cpu.append(time.process_time() - cpu)
    return timings


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table that pastes into the README as is; columns of numbers are right-aligned.

    Cells are shown as str() shows them (format numbers before, e.g. f"{x:.2f}"); None shows as '-'.
    """
    cells = [["-" if v is None else str(v) for v in row] for row in rows]
    numeric = [all(_looks_numeric(row[i]) for row in cells) for i in range(len(headers))]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        return (
            "| "
            + " | ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True))
            + " |"
        )

    rule = (
        "|"
        + "|".join("-" * (w + 1) + ":" if num else "-" * (w + 2) for w, num in zip(widths, numeric, strict=True))
        + "|"
    )
    return "\n".join([line(headers), rule] + [line(row) for row in cells])


def _looks_numeric(text: str) -> bool:
    if text == "-":
        return True
    try:
        float(text.replace(",", "").rstrip("x%"))
    except ValueError:
        return False
    return True


def ratio(value: float | None, baseline: float | None, digits: int = 3) -> float | None:
    if value is None or not baseline:
        return None
    return round(value / baseline, digits)


def environment(device: str) -> dict[str, object]:
    """What the figures depend on, recorded beside them."""
    env: dict[str, object] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),  # above cpu_count: other work shared the machine
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def write_json(path: str | Path, payload: Mapping[str, object]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")


def publish_summary(
    summary: Mapping[str, object], table: str, summary_path: Path, where: str, json_path: str | None = None
) -> None:
    """A study's end: its summary.json, the table and where everything went on stdout, and the summary
    also at --json when given."""
    write_json(summary_path, summary)
    print(table)
    print(f"\n{where}")
    if json_path:
        write_json(json_path, summary)
        print(f"results written to {json_path}")


@contextlib.contextmanager
def torchvision_stub() -> Iterator[None]:
    """Let `import pytorchvideo.models` succeed where torchvision is not installed.

    pytorchvideo/models/head.py imports `torchvision.ops.RoIAlign` at import time for its
    detection head only; classification models (SlowFast, Slow) never call it. torchvision is not
    a dependency here (its wheels pin a torch of their own), so while the import runs we put a
    `torchvision.ops` whose RoIAlign refuses to be built, and take it out of sys.modules again
    afterwards so that nothing else in the process mistakes it for the real package.
    """
    try:
        import torchvision  # noqa: F401
    except ImportError:
        pass
    else:
        yield
        return

    class RoIAlign(torch.nn.Module):
        def __init__(self, *args, **kwargs):
            raise RuntimeError("RoIAlign needs torchvision, which is not installed (only detection heads use it)")

    ops = types.ModuleType("torchvision.ops")
    ops.RoIAlign = RoIAlign
    package = types.ModuleType("torchvision")
    package.__path__ = []
    package.ops = ops
    sys.modules.update({"torchvision": package, "torchvision.ops": ops})
    try:
        yield
    finally:
        for name in ("torchvision", "torchvision.ops"):
            sys.modules.pop(name, None)


def proc_stat(pid: str) -> list[str]:
    """Fields 3 on of /proc/<pid>/stat (after the command name, which may hold spaces)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def descends_from(pid: str, ancestor: int) -> bool:
    while pid not in ("0", "1"):
        pid = proc_stat(pid)[1]  # the parent
        if pid == str(ancestor):
            return True
    return False


class CpuSample(NamedTuple):
    at: float  # CoreUse.clock seconds
    role_cpu_s: dict[str, float]  # CPU seconds of each role's processes so far
    busy_ticks: int  # the machine's busy clock ticks so far, all cores (/proc/stat, less idle and iowait)
    total_ticks: int


class CoreUse:
    """Samples, every `interval_s`, the CPU time of this run's Ray worker processes by role and the machine's
    busy time, so a rate can be read beside the cores it actually had.

    ROLES maps a role to the process-title prefixes of its processes (Ray titles a worker after its task or
    actor: ray::MapBatches(...) for Ray Data tasks, ray::MapWorker(...) for its actor pools). Only processes that
    descend from this one count (a local Ray's raylet is its child); with `only_new`, none that were running
    when sampling started either (an earlier Ray's actors not gone yet). Linux only; elsewhere it reports
    nothing. `clock` is the time base of `between`'s arguments and of `first_seen`.
    """

    ROLES: dict[str, tuple[bytes, ...]] = {}

    def __init__(self, interval_s: float = 0.5, *, only_new: bool = False, clock: Callable[[], float] = time.time):
        self.interval_s, self.only_new, self.clock = interval_s, only_new, clock
        self.samples: list[CpuSample] = []
        self.first_seen: dict[str, float] = {}  # pid -> when its role was first seen
        self._cpu: dict[str, tuple[str, float]] = {}  # pid -> (role, CPU s)
        self._skip: set[str] = set()  # processes of other Ray instances or users, or already running
        self._tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.available = os.path.isfile("/proc/stat")

    def processes(self, role: str) -> int | None:
        """How many processes of `role` were seen."""
        return sum(1 for r, _ in self._cpu.values() if r == role) if self.available else None

    def __enter__(self) -> CoreUse:
        if self.available:
            if self.only_new:
                self._sweep()
                self._skip.update(self._cpu)
                self._cpu.clear()
                self.first_seen.clear()
                self.samples.clear()
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def between(self, t0: float, t1: float) -> dict:
        """Cores each role used (`<role>_cores`), and the machine's busy cores (everything, this run included),
        from t0 to t1 (`clock` seconds); {} without a sample on each side."""
        before = [x for x in self.samples if x.at <= t0]
        after = [x for x in self.samples if x.at >= t1]
        if not before or not after:
            return {}
        a, b = before[-1], after[0]
        out = {
            f"{role}_cores": round((b.role_cpu_s[role] - a.role_cpu_s[role]) / (b.at - a.at), 2) for role in self.ROLES
        }
        busy = (b.busy_ticks - a.busy_ticks) / max(b.total_ticks - a.total_ticks, 1)
        out["machine_busy_cores"] = round(busy * (os.cpu_count() or 1), 2)
        return out

    def _run(self) -> None:
        while True:
            self._sweep()
            if self._stop.wait(self.interval_s):
                self._sweep()
                return

    def _sweep(self) -> None:
        now = self.clock()
        for pid in os.listdir("/proc"):
            if not pid.isdigit() or pid in self._skip:
                continue
            try:
                if pid not in self._cpu:
                    # Ray names a worker process after its actor only once the actor starts on it (before:
                    # ray::IDLE), so the name is read again on every sweep until it matches.
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        head = f.read(64)
                    role = next((r for r, prefixes in self.ROLES.items() if head.startswith(prefixes)), None)
                    if role is None:
                        continue
                    if not descends_from(pid, os.getpid()):
                        self._skip.add(pid)
                        continue
                    self.first_seen[pid] = now
                else:
                    role = self._cpu[pid][0]
                fields = proc_stat(pid)
            except OSError:  # the process ended between listing and reading
                continue
            self._cpu[pid] = (role, (int(fields[11]) + int(fields[12])) / self._tick)
        roles = {role: sum(cpu for r, cpu in self._cpu.values() if r == role) for role in self.ROLES}
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
        self.samples.append(CpuSample(now, roles, sum(ticks[:8]) - ticks[3] - ticks[4], sum(ticks[:8])))
