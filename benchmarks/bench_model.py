"""Model benchmark: parameters and GFLOPs of the reference presets beside the published figures,
the train-step time of SlowFast 8x8 R50 against pytorchvideo's implementation of it, and bf16 autocast
against fp32 (forward and train step) for slowfast_tiny and slowfast_8x8_r50.

    python benchmarks/bench_model.py                      # CPU, all three tables
    python benchmarks/bench_model.py --quick              # smoke test
    python benchmarks/bench_model.py --tables precision --threads 2 --steps 3   # bf16 vs fp32 only
    python benchmarks/bench_model.py --device cuda --batch 16 --json out/bench_model.json

On 2 cores the sizes and reference tables take about 3 minutes. On a CPU without bf16 in hardware (AVX2
only) bf16 steps ran 5-13x slower than fp32 and the precision table took 30 minutes at --steps 2 on a loaded
machine; there `train.mixed_precision` keeps fp32 (slowfast.train.optim.cpu_bf16) and the table shows why.

`python -m pipelines bench model [options]` runs the same `main`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:  # run as a script or loaded by path: make `benchmarks` and `slowfast` importable
    sys.path.insert(0, _ROOT)

from benchmarks._common import (
    environment,
    format_table,
    ratio,
    time_interleaved,
    torchvision_stub,  # noqa: E402
    write_json,
)
from slowfast.model import build, count_flops, count_params, example_inputs  # noqa: E402
from slowfast.model.flops import gflops  # noqa: E402
from slowfast.train import memory_format  # noqa: E402
from slowfast.train.optim import describe_precision  # noqa: E402

# preset: (params, GFLOPs at 256x256) of the reference implementation, from DESIGN.md; GFLOPs as
# fvcore counts them (convolutions, linear layers, eval-mode batch norm). Slow-only: pytorchvideo
# slow_r50, whose published GFLOPs leave batch norm out (see ZOO_CONV_FC_GFLOPS).
REFERENCE = {
    "slowfast_4x16_r50": (34_480_216, 36.3),
    "slowfast_8x8_r50": (34_566_488, 66.1),
    "slowfast_8x8_r101": (62_826_968, 126.4),
    "slow_8x8_r50": (32_454_096, None),
}
# pytorchvideo's model zoo (docs/source/model_zoo.md) where it counted convolutions and linear
# layers only. Its 36.69 (4x16 R50) and 127.20 (8x8 R101) add batch norm in training mode
# (fvcore: 5 FLOPs per element), a third convention, so they are left out.
ZOO_CONV_FC_GFLOPS = {"slowfast_8x8_r50": 65.71, "slow_8x8_r50": 54.52}

TIMED_PRESET = "slowfast_8x8_r50"
# (preset, crop, batch) timed in bf16 and fp32: the CPU demo's model, crop and batch (configs/demo.yaml), and
# the reference preset at half the paper's crop.
PRECISION_CASES = (("slowfast_tiny", 56, 16), ("slowfast_8x8_r50", 112, 2))
TABLES = ("sizes", "reference", "precision")
# The reference table's results keep the JSON key they had before --tables existed.
JSON_KEYS = {"sizes": "sizes", "reference": "train_step", "precision": "precision"}


def _fmt(value: float | None, digits: int) -> str | None:
    return None if value is None else f"{value:.{digits}f}"


def size_table() -> tuple[str, list[dict]]:
    rows, results = [], []
    for preset, (ref_params, ref_gflops) in REFERENCE.items():
        with torch.device("meta"):
            params = count_params(build(preset, num_classes=400))
        total, conv_fc = gflops(preset, size=256), gflops(preset, size=256, batch_norm=False)
        zoo = ZOO_CONV_FC_GFLOPS.get(preset)
        results.append(
            {
                "preset": preset,
                "params": params,
                "reference_params": ref_params,
                "gflops": round(total, 3),
                "reference_gflops": ref_gflops,
                "gflops_conv_fc": round(conv_fc, 3),
                "zoo_gflops_conv_fc": zoo,
            }
        )
        rows.append(
            [
                preset,
                f"{params:,}",
                f"{ref_params:,}",
                _fmt(ratio(params, ref_params), 3),
                f"{total:.2f}",
                _fmt(ref_gflops, 1),
                _fmt(ratio(total, ref_gflops), 3),
                f"{conv_fc:.2f}",
                _fmt(zoo, 2),
                _fmt(ratio(conv_fc, zoo), 3),
            ]
        )
    headers = [
        "preset",
        "params",
        "reference",
        "ratio",
        "GFLOPs",
        "reference",
        "ratio",
        "GFLOPs conv+fc",
        "model zoo",
        "ratio",
    ]
    note = (
        "GFLOPs at 256x256, batch 1, one multiply-add = one FLOP: convolutions, linear layers and eval-mode\n"
        "batch norm (2 per element), as fvcore counts them. 'conv+fc' leaves batch norm out, as pytorchvideo's\n"
        "model zoo did for slowfast_r50 and slow_r50; reference params and GFLOPs: DESIGN.md."
    )
    return format_table(headers, rows) + "\n" + note, results


def reference_slowfast_r50(num_classes: int, size: int = 224) -> nn.Module:
    """pytorchvideo's SlowFast 8x8 R50; its head pools with a fixed window, sized here for `size`."""
    with torchvision_stub():
        from pytorchvideo.models.hub import slowfast_r50
    side = size
    for _ in range(5):  # stem conv, stem pool, res3, res4, res5 each halve, rounding up
        side = (side + 1) // 2
    return slowfast_r50(
        pretrained=False, model_num_class=num_classes, head_pool_kernel_sizes=((8, side, side), (32, side, side))
    )


def train_step(model: nn.Module, inputs: list[torch.Tensor], labels: torch.Tensor, amp: bool):
    """One SGD step (the paper's recipe: Nesterov momentum 0.9, weight decay 1e-4) as a closure; amp: bf16
    autocast whether or not `slowfast.train.autocast` would use it on this device, so that it can be timed."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, nesterov=True, weight_decay=1e-4)
    loss_fn = nn.CrossEntropyLoss()
    device_type = labels.device.type

    def step() -> None:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=amp):
            # pytorchvideo's forward writes each stage's output into the list it is given: pass a copy.
            loss = loss_fn(model(list(inputs)), labels)
        loss.backward()
        optimizer.step()

    return step


def forward(model: nn.Module, inputs: list[torch.Tensor], amp: bool):
    """One evaluation forward (eval mode, no gradients), bf16 autocast or not, as a closure."""
    device_type = inputs[0].device.type

    @torch.no_grad()
    def run() -> None:
        model.eval()
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=amp):
            model(list(inputs))

    return run


def precision_table(args) -> tuple[str, list[dict]]:
    """bf16 autocast against fp32 for each of PRECISION_CASES: the four closures of one preset take turns."""
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    fmt = memory_format(device.type)
    rows, results = [], []
    for preset, size, batch in PRECISION_CASES:
        torch.manual_seed(0)
        model = build(preset, num_classes=400).to(device, memory_format=fmt)
        inputs = [x.to(device, memory_format=fmt) for x in example_inputs(model.cfg, batch, size)]
        labels = torch.randint(0, 400, (batch,), device=device)
        cases = {
            "forward fp32": forward(model, inputs, amp=False),
            "forward bf16": forward(model, inputs, amp=True),
            "step fp32": train_step(model, inputs, labels, amp=False),
            "step bf16": train_step(model, inputs, labels, amp=True),
        }
        t = time_interleaved(
            cases, repeats=args.steps, warmup=args.warmup, sync=torch.cuda.synchronize if cuda else None
        )
        # Each repetition ran fp32 and bf16 back to back: the median of their ratios is the figure least
        # disturbed by other work on the machine.
        paired = {
            kind: statistics.median(b / f for f, b in zip(t[f"{kind} fp32"].wall, t[f"{kind} bf16"].wall, strict=True))
            for kind in ("forward", "step")
        }
        results.append(
            {
                "preset": preset,
                "size": size,
                "batch": batch,
                "median_ms": {name: round(timing.median_ms, 1) for name, timing in t.items()},
                "cpu_median_ms": {name: round(timing.cpu_median_ms, 1) for name, timing in t.items()},
                "paired_ratio_bf16_over_fp32": {kind: round(r, 3) for kind, r in paired.items()},
            }
        )
        rows.append(
            [preset, size, batch]
            + [f"{t[name].median_ms:.1f}" for name in ("forward fp32", "forward bf16")]
            + [f"{paired['forward']:.3f}"]
            + [f"{t[name].median_ms:.1f}" for name in ("step fp32", "step bf16")]
            + [f"{paired['step']:.3f}"]
        )
    title = (
        f"bf16 autocast against fp32: eval forward (no gradients) and train step (forward + backward + SGD), "
        f"400 classes, {device.type} channels_last_3d, {torch.get_num_threads()} threads; {args.steps} steps "
        f"each, alternating, after {args.warmup} warm-up"
    )
    table = format_table(
        [
            "preset",
            "crop",
            "batch",
            "fp32 forward ms",
            "bf16 forward ms",
            "bf16 / fp32",
            "fp32 step ms",
            "bf16 step ms",
            "bf16 / fp32",
        ],
        rows,
    )
    note = (
        f"ms: medians; bf16 / fp32: median of the paired ratios. train.mixed_precision here: "
        f"{describe_precision(device.type, True)}."
    )
    return title + "\n" + table + "\n" + note, results


def speed_table(args) -> tuple[str, dict]:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    fmt = memory_format(device.type)
    torch.manual_seed(0)
    ours = build(TIMED_PRESET, num_classes=400)
    reference = reference_slowfast_r50(num_classes=400, size=args.size)
    inputs = [x.to(device, memory_format=fmt) for x in example_inputs(ours.cfg, args.batch, args.size)]
    labels = torch.randint(0, 400, (args.batch,), device=device)
    sizes = {}
    for name, model in (("ours", ours), ("pytorchvideo", reference)):
        sizes[name] = {"params": count_params(model), "gflops": round(count_flops(model, inputs) / args.batch / 1e9, 3)}
        model.to(device, memory_format=fmt).train()
    if sizes["ours"] != sizes["pytorchvideo"]:
        print(f"warning: the two models differ in size: {sizes}", file=sys.stderr)
    if cuda:
        torch.backends.cudnn.benchmark = True
    load_before = os.getloadavg()[0]
    timings = time_interleaved(
        {
            "ours": train_step(ours, inputs, labels, amp=cuda),
            "pytorchvideo": train_step(reference, inputs, labels, amp=cuda),
        },
        repeats=args.steps,
        warmup=args.warmup,
        sync=torch.cuda.synchronize if cuda else None,
    )

    load = max(load_before, os.getloadavg()[0])
    a, b = timings["ours"], timings["pytorchvideo"]
    # The two steps of one repetition ran back to back, under the same load: their ratio is the
    # comparison least disturbed by other work on the machine.
    paired = statistics.median(x / y for x, y in zip(a.wall, b.wall, strict=True))
    rows = [
        ["median ms / step", a.median_ms, b.median_ms, a.median_ms / b.median_ms],
        ["fastest ms / step", a.min_ms, b.min_ms, a.min_ms / b.min_ms],
        ["median CPU ms / step", a.cpu_median_ms, b.cpu_median_ms, a.cpu_median_ms / b.cpu_median_ms],
        ["median of paired ratios", None, None, paired],
        [
            "clips / s (median)",
            args.batch / a.median_ms * 1e3,
            args.batch / b.median_ms * 1e3,
            b.median_ms / a.median_ms,
        ],
    ]
    rows = [
        [name, _fmt(x, 1 if x and x >= 10 else 3), _fmt(y, 1 if y and y >= 10 else 3), _fmt(r, 3)]
        for name, x, y, r in rows
    ]
    precision = "bf16 autocast, channels_last_3d" if cuda else "fp32, channels_last_3d"
    title = (
        f"Train step: {TIMED_PRESET}, batch {args.batch}, {args.size}x{args.size}, 400 classes, forward + "
        f"backward + SGD, {device.type} {precision}, {torch.get_num_threads()} threads; {args.steps} steps "
        f"per model, alternating, after {args.warmup} warm-up"
    )
    table = format_table(["train step", "ours", "pytorchvideo slowfast_r50", "ours / pytorchvideo"], rows)
    result = {
        "preset": TIMED_PRESET,
        "batch": args.batch,
        "size": args.size,
        "device": device.type,
        "precision": precision,
        "threads": torch.get_num_threads(),
        "steps": args.steps,
        "warmup": args.warmup,
        "models": sizes,
        "median_ms": {"ours": round(a.median_ms, 2), "pytorchvideo": round(b.median_ms, 2)},
        "ratio_ours_over_reference": ratio(a.median_ms, b.median_ms),
        "cpu_ratio_ours_over_reference": ratio(a.cpu_median_ms, b.cpu_median_ms),
        "paired_ratio_ours_over_reference": round(paired, 3),
        "load_average_max": round(load, 2),
        "step_ms": {name: [round(1e3 * t, 1) for t in timing.wall] for name, timing in timings.items()},
        "step_cpu_ms": {name: [round(1e3 * t, 1) for t in timing.cpu] for name, timing in timings.items()},
    }
    note = (
        "Goal: ours / pytorchvideo <= 1.0 in ms. CPU ms: the process's CPU time over the same steps, which "
        "leaves out\ntime other processes held the cores. Paired: each repetition's two steps, run back to back, "
        "compared."
    )
    own_threads = 1 if cuda else torch.get_num_threads()
    if load - own_threads > 0.5:  # the 1-minute load average counts this process's threads too
        note += (
            f"\nWarning: load average {load:.1f} on {os.cpu_count()} cores while {own_threads} thread(s) of "
            "this run worked: other work shared the machine."
        )
        if own_threads > 1:
            note += (
                " Wall-clock figures are unreliable: each thread waits\nfor the others at every operation. "
                "CPU ms with --threads 1 holds up best."
            )
    return title + "\n" + table + "\n" + note, result


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="bench model", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--device",
        default="cpu",
        choices=("cpu", "cuda"),
        help="cuda trains with bf16 autocast and channels_last_3d clips",
    )
    parser.add_argument("--steps", type=int, default=None, help="timed train steps per model (default 8, quick 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per model first (default 1; cuda 3)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=224, help="crop size of the timed clips")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="fewest steps: a smoke test, not a measurement")
    parser.add_argument(
        "--tables", default=",".join(TABLES), help=f"comma-separated, of {', '.join(TABLES)} (default: all)"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = 2 if args.quick else 8
    if args.warmup is None:
        args.warmup = 1 if args.quick or args.device == "cpu" else 3
    if args.steps < 1 or args.warmup < 0 or args.batch < 1 or (args.threads is not None and args.threads < 1):
        parser.error("--steps, --batch and --threads must be at least 1, --warmup at least 0")
    args.tables = [name.strip() for name in args.tables.split(",") if name.strip()]
    unknown = [name for name in args.tables if name not in TABLES]
    if unknown or not args.tables:
        parser.error(f"--tables {','.join(unknown) or '(none)'}: choose among {', '.join(TABLES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "bench model: --device cuda but CUDA is not available on this machine; run without it for CPU",
            file=sys.stderr,
        )
        return 2
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {}
    try:
        for name, make in (
            ("sizes", size_table),
            ("reference", lambda: speed_table(args)),
            ("precision", lambda: precision_table(args)),
        ):
            if name in args.tables:
                text, results[name] = make()
                print(text + "\n", flush=True)
        env = environment(args.device)
    finally:
        torch.set_num_threads(threads)  # main() may run inside the CLI's process
    if args.json:
        write_json(
            args.json,
            {"benchmark": "model", "environment": env, **{JSON_KEYS[name]: result for name, result in results.items()}},
        )
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
