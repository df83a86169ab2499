"""What the benchmarks share: the machine a result ran on (recorded in every result JSON, because only ratios from
one run compare), their common options, and how a result is written."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

import minisnip
from minisnip.checkpoint import write_json, write_text


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def loadavg() -> float | None:
    """The 1-minute load average (above the thread count: other processes competed for the CPU)."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def machine_info(device: str) -> dict:
    import transformers
    info = {
        "torch": torch.__version__, "transformers": transformers.__version__, "minisnip": minisnip.__version__,
        "python": platform.python_version(), "platform": platform.platform(), "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(), "mkldnn": torch.backends.mkldnn.is_available(),
        "device": device, "loadavg_1m_start": loadavg(),
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def code_version() -> str | None:
    """The git commit of the checkout that runs (with "+changes" when tracked files outside bench/results/ have
    uncommitted edits: results being written do not count), or None outside a git checkout: a result records
    which code produced it."""
    import subprocess
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)bench/results"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+changes" if dirty else "")


RESULTS = Path(__file__).resolve().parent / "results"


DEFAULT_SHAPES = ("1x128", "32x128", "8x512")


def parse_shape(text: str) -> tuple[int, int]:
    """'32x128' -> (32, 128): batch x tokens per example."""
    import argparse
    try:
        batch, seq = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r} is not BATCHxSEQ, e.g. 32x128") from None
    if batch < 1 or seq < 2:
        raise argparse.ArgumentTypeError(f"shape {text!r}: batch must be >= 1 and seq >= 2")
    return batch, seq


def benchmark_parser(doc: str, auto_device: bool = False, batch_seq: bool = True, shapes: bool = False):
    """An argument parser with what every encoder benchmark takes: --model, --device, and (batch_seq) --batch and
    --seq, or (shapes) --shapes BATCHxSEQ ... (default DEFAULT_SHAPES). doc: the script's docstring (its first
    paragraph is the description)."""
    import argparse
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="BERT folder (default: minisnip.default_model_path())")
    if auto_device:
        p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    else:
        p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    if batch_seq:
        p.add_argument("--batch", type=int, default=32)
        p.add_argument("--seq", type=int, default=128)
    if shapes:
        p.add_argument("--shapes", nargs="+", type=parse_shape, default=[parse_shape(s) for s in DEFAULT_SHAPES],
                       help=f"batch x length cases (default {' '.join(DEFAULT_SHAPES)})")
    return p


def start_run(args) -> tuple[Path, dict, float]:
    """The start of a timing benchmark's run on args.device: threads and seed set, the device checked; returns the
    model folder, the machine record and the start time."""
    import time
    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    folder = Path(args.model) if args.model else minisnip.default_model_path()
    machine = machine_info(args.device)
    torch.manual_seed(args.seed)
    return folder, machine, time.perf_counter()


def available_cpus() -> int:
    """The CPUs this process may run on (the default thread count of the timing benchmarks)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def add_timing_args(p, stem: str, rounds: int) -> None:
    """The options the interleaved timing benchmarks share: threads, warm-up, rounds, seed, --quick, --out
    (`stem`: the result's name, e.g. "limit" for limit_<device>[_quick].json). `resolve_timing_args` fills in
    the defaults after parsing."""
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: CPUs available)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up iterations per model (default 2; --quick 1)")
    p.add_argument("--rounds", type=int, default=None, help=f"interleaved rounds (default {rounds}; --quick 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="1 warm-up, 3 rounds")
    p.add_argument("--out", default=str(RESULTS),
                   help=f"output folder ({stem}_<device>[_quick].json/.md inside), or a .json path")
    p.set_defaults(default_rounds=rounds, stem=stem)


def resolve_timing_args(args) -> None:
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    args.rounds = args.rounds if args.rounds is not None else (3 if args.quick else args.default_rounds)
    if args.threads is None:
        args.threads = available_cpus()


def save_result(result: dict, args, device: str, markdown: str) -> None:
    """Write <stem>_<device>[_quick].json/.md into --out (or to the --out .json path) and print the table."""
    write_result(result, *result_paths(args.out, f"{args.stem}_{device}{'_quick' if args.quick else ''}"), markdown)


def load_note(machine: dict, wall_seconds: float | None = None) -> str | None:
    """One line for a results table: the 1-minute load average at start and end (and the wall time)."""
    if machine.get("loadavg_1m_start") is None:
        return None
    note = f"1-minute load average: {machine['loadavg_1m_start']:.1f} at start, {machine['loadavg_1m_end']:.1f} at end"
    return note + (f"; wall time {wall_seconds / 60:.1f} min." if wall_seconds is not None else ".")


def table_text(lines: list[str], machine: dict, wall_seconds: float | None = None) -> str:
    """A result's markdown: its lines, then the load-average line (`load_note`) when the load was read."""
    note = load_note(machine, wall_seconds)
    return "\n".join([*lines, note] if note else lines) + "\n"


def result_paths(out: str, stem: str) -> tuple[Path, Path]:
    """The JSON and markdown paths of a result: `out` names the .json file itself, or a folder for <stem>.json."""
    p = Path(out)
    if p.suffix == ".json":
        return p, p.with_suffix(".md")
    return p / f"{stem}.json", p / f"{stem}.md"


def write_result(result: dict, json_path: Path, md_path: Path, table: str) -> None:
    """Write a benchmark's result as JSON and its markdown table, and print the table."""
    write_json(json_path, result)  # atomic; a NaN is refused, naming its place
    write_text(md_path, table)
    print("\n" + table)
    print(f"wrote {json_path} and {md_path}", flush=True)
