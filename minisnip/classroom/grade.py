"""Grading a student copy: every part in its own process with a time limit, a score per part, JSON for a course.

A part scores its full points when all its checks pass and 0 otherwise, with the reason: the first failing
check and its message ("not implemented: ...", a wrong shape, values off by how much), "time limit", or how
the process ended. One part hanging or crashing the interpreter does not stop the others.

The time limit counts from the moment the part's process has imported torch, the student's library and the
checks (`ready`), so a loaded machine's slow imports do not eat it; importing itself gets `import_limit`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UsageError
from .make import read_manifest

POLL_S = 0.05


@dataclass
class _Run:
    """One part's process and what it has reported so far."""

    part: str
    events: Path
    log: Path
    proc: subprocess.Popen
    started: float
    ready_at: float | None = None
    lines: list[dict] = field(default_factory=list)

    def read(self) -> None:
        try:
            text = self.events.read_text(encoding="utf-8")
        except FileNotFoundError:
            return
        lines = []
        for line in text.splitlines():
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:  # a line still being written
                break
        self.lines = lines
        if self.ready_at is None and any(e.get("event") == "ready" for e in lines):
            self.ready_at = time.monotonic()

    def done(self) -> bool:
        return any(e.get("event") == "done" for e in self.lines)

    def current_check(self) -> str | None:
        started = [e["check"] for e in self.lines if e.get("event") == "start"]
        return started[-1] if started else None

    def kill(self) -> None:
        try:
            if hasattr(os, "killpg"):
                os.killpg(self.proc.pid, signal.SIGKILL)  # the part's process group: it and anything it started
            else:
                self.proc.kill()
        except ProcessLookupError:
            pass
        self.proc.wait()


def _start(part: str, folder: Path, autograder: Path, tmp: Path, python: str) -> _Run:
    events, log = tmp / f"{part}.jsonl", tmp / f"{part}.log"
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen([python, str(autograder / "run.py"), part, "--events", str(events), "--root",
                                 str(folder)], cwd=folder, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, env=env, start_new_session=hasattr(os, "killpg"))
    return _Run(part, events, log, proc, time.monotonic())


def _log_tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    except FileNotFoundError:
        return ""
    return " | ".join(text[-lines:])


def _result(run: _Run, points: int, status: str | None, reason: str | None) -> dict:
    run.read()
    checks = [{k: e[k] for k in ("check", "passed", "message")} for e in run.lines if e.get("event") == "check"]
    done = run.done()
    error = next((e["message"] for e in run.lines if e.get("event") == "error"), None)
    if status is None:
        if error is not None:
            status, reason = "error", error
        elif not done:
            at = run.current_check()
            tail = _log_tail(run.log)
            status = "crashed"
            reason = (f"the checks stopped with exit status {run.proc.returncode}"
                      + (f" in {at}" if at else "") + (f": {tail}" if tail else ""))
        else:
            failed = [c for c in checks if not c["passed"]]
            status = "failed" if failed else "passed"
            reason = f"{failed[0]['check']}: {failed[0]['message']}" if failed else ""
    passed = status == "passed"
    return {"name": run.part, "points": points if passed else 0, "max_points": points, "status": status,
            "reason": reason, "checks": checks, "seconds": round(time.monotonic() - run.started, 2)}


def grade(folder: str | Path, autograder: str | Path | None = None, parts: list[str] | None = None,
          time_limit: float = 60.0, import_limit: float = 120.0, jobs: int | None = None,
          python: str | None = None) -> dict:
    """Grade the student copy in `folder`; returns the report (see `format_report`, and grade.json).

    autograder: the autograder folder to use (default folder/autograder; pass a pristine copy to grade
    submissions with checks and reference values the student cannot have changed). parts: a subset (default
    all). time_limit: seconds per part once it has imported; jobs: parts run at the same time.
    """
    folder = Path(folder).resolve()
    read_manifest(folder)
    autograder = Path(autograder).resolve() if autograder is not None else folder / "autograder"
    try:
        table = json.loads((autograder / "parts.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"{autograder} is not an autograder folder made by `make` ({e})") from None
    if not (autograder / "run.py").is_file():
        raise UsageError(f"{autograder} is not an autograder folder made by `make` (no run.py)")
    names = list(parts) if parts else list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise UsageError(f"unknown part{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                         f"valid parts: {', '.join(table)}")
    if not time_limit > 0 or not import_limit > 0:
        raise UsageError("time limits must be positive numbers of seconds")
    jobs = max(1, jobs if jobs is not None else min(4, os.cpu_count() or 1))
    python = python or sys.executable
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="minisnip-grade-") as tmp:
        waiting, running = list(names), []
        try:
            while waiting or running:
                while waiting and len(running) < jobs:
                    running.append(_start(waiting.pop(0), folder, autograder, Path(tmp), python))
                time.sleep(POLL_S)
                for run in list(running):
                    run.read()
                    now = time.monotonic()
                    points = int(table[run.part]["points"])
                    if run.proc.poll() is not None or run.done():
                        run.kill()  # done: whatever the student's code left running (a thread) goes too
                        results[run.part] = _result(run, points, None, None)
                    elif run.ready_at is None and now - run.started > import_limit:
                        run.kill()
                        results[run.part] = _result(run, points, "time limit",
                                                    f"time limit: importing took more than {import_limit:g} s")
                    elif run.ready_at is not None and now - run.ready_at > time_limit:
                        run.kill()
                        at = run.current_check()
                        results[run.part] = _result(run, points, "time limit", f"time limit of {time_limit:g} s "
                                                    f"exceeded" + (f" in {at}" if at else ""))
                    else:
                        continue
                    running.remove(run)
        finally:
            for run in running:  # interrupted: leave no process behind
                run.kill()
    ordered = [results[n] for n in names]
    return {"folder": str(folder), "autograder": str(autograder), "time_limit_s": time_limit,
            "total": sum(r["points"] for r in ordered), "max_total": sum(r["max_points"] for r in ordered),
            "parts": ordered}


def format_report(report: dict) -> str:
    """The report as a table: one line per part (points, and the reason when it lost them), then the total."""
    width = max([len("total")] + [len(r["name"]) for r in report["parts"]])
    lines = [f"{'part':<{width}}  points  result"]
    for r in report["parts"]:
        score = f"{r['points']}/{r['max_points']}"
        lines.append(f"{r['name']:<{width}}  {score:>6}  {'passed' if r['status'] == 'passed' else r['reason']}")
    total = f"{report['total']}/{report['max_total']}"
    lines.append(f"{'total':<{width}}  {total:>6}")
    return "\n".join(lines)


def write_report(report: dict, path: str | Path) -> Path:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


__all__ = ["format_report", "grade", "write_report"]
