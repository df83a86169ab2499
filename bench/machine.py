"""What machine a benchmark ran on: recorded in every result JSON, because only ratios from one run compare."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch

import minisnip


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
    """The git commit of the checkout that runs (with "+changes" when the tree has uncommitted edits), or None
    outside a git checkout: a result records which code produced it."""
    import subprocess
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+changes" if dirty else "")


def load_note(machine: dict, wall_seconds: float | None = None) -> str | None:
    """One line for a results table: the 1-minute load average at start and end (and the wall time)."""
    if machine.get("loadavg_1m_start") is None:
        return None
    note = f"1-minute load average: {machine['loadavg_1m_start']:.1f} at start, {machine['loadavg_1m_end']:.1f} at end"
    return note + (f"; wall time {wall_seconds / 60:.1f} min." if wall_seconds is not None else ".")


def result_paths(out: str, stem: str) -> tuple[Path, Path]:
    """The JSON and markdown paths of a result: `out` names the .json file itself, or a folder for <stem>.json."""
    p = Path(out)
    if p.suffix == ".json":
        return p, p.with_suffix(".md")
    return p / f"{stem}.json", p / f"{stem}.md"


def write_result(result: dict, json_path: Path, md_path: Path, table: str) -> None:
    """Write a benchmark's result as JSON and its markdown table, and print the table."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    md_path.write_text(table, encoding="utf-8")
    print("\n" + table)
    print(f"wrote {json_path} and {md_path}", flush=True)
