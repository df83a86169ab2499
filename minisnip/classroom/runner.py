"""The autograder's runner, copied into a student folder as autograder/run.py.

Students check their work with it:

    python autograder/run.py                 every part, one line per check
    python autograder/run.py attention       one part (several names: several parts)

`python -m minisnip.classroom grade` runs it once per part, in its own process with a time limit, as

    python autograder/run.py PART --events FILE [--root STUDENT_FOLDER]

and reads FILE: JSON lines {"event": "ready"} (imports done: the time limit starts), {"event": "start", "check":
...}, {"event": "check", "check": ..., "passed": ..., "message": ...}, {"event": "done"}, or {"event": "error",
"message": ...} when the part cannot run at all. The library imported is the one in the student folder
(`--root`, default: the folder above this file), never an installed copy.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _say(events, **event) -> None:
    if events is not None:
        events.write(json.dumps(event) + "\n")
        events.flush()


def _where(exc: BaseException, root: Path) -> str:
    """The innermost line of the student's package in the traceback, as ' (minisnip/x.py:12)'."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if _inside(Path(f.filename), root / "minisnip")]
    return f" ({Path(frames[-1].filename).resolve().relative_to(root)}:{frames[-1].lineno})" if frames else ""


def _inside(path: Path, folder: Path) -> bool:
    """rundir.is_inside, written out: the runner imports no minisnip before it has checked which copy it gets."""
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def _reason(exc: BaseException, root: Path) -> str:
    if isinstance(exc, NotImplementedError):
        return f"not implemented: {exc}"
    if isinstance(exc, AssertionError):
        text = str(exc)
        if not text:
            tb = traceback.extract_tb(exc.__traceback__)
            text = f"assertion failed: {tb[-1].line}" if tb else "assertion failed"
        return text
    return f"{type(exc).__name__}: {exc}{_where(exc, root)}"


def _load(root: Path, part: str):
    """Import the student's minisnip (from root) and this autograder's checks and data for one part."""
    # this folder's files (attention.py, ...) must not shadow other modules; the student copy comes first
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
    sys.path.insert(0, str(root))
    import torch
    torch.set_num_threads(1)
    import minisnip
    if not _inside(Path(minisnip.__file__), root / "minisnip"):
        raise RuntimeError(f"imported minisnip from {Path(minisnip.__file__).parent}, not from the student copy "
                           f"{root / 'minisnip'}")
    if "autograder" not in sys.modules or Path(sys.modules["autograder"].__file__).parent != HERE:
        spec = importlib.util.spec_from_file_location("autograder", HERE / "__init__.py",
                                                      submodule_search_locations=[str(HERE)])
        package = importlib.util.module_from_spec(spec)
        sys.modules["autograder"] = package
        spec.loader.exec_module(package)
    module = importlib.import_module(f"autograder.{part}")
    data = torch.load(HERE / "data" / f"{part}.pt", weights_only=True)
    checks = [(n, f) for n, f in vars(module).items() if n.startswith("test_") and callable(f)]
    return checks, data


def run_part(part: str, root: Path, events=None) -> list[dict]:
    """Run one part's checks; returns [{check, passed, message}] (one entry "import" when it cannot start)."""
    try:
        checks, data = _load(root, part)
    except BaseException as e:  # a student's syntax error or a failing import must not stop the other parts
        if isinstance(e, KeyboardInterrupt):
            raise
        message = f"could not import the student copy or the checks: {_reason(e, root)}"
        _say(events, event="error", message=message)
        return [{"check": "import", "passed": False, "message": message}]
    _say(events, event="ready", checks=[n for n, _ in checks])
    results = []
    for name, check in checks:
        _say(events, event="start", check=name)
        try:
            check(data)
            result = {"check": name, "passed": True, "message": ""}
        except Exception as e:  # noqa: BLE001 - any failure of student code is a failed check
            result = {"check": name, "passed": False, "message": _reason(e, root)}
        results.append(result)
        _say(events, event="check", **result)
    _say(events, event="done")
    return results


def main(argv: list[str] | None = None) -> int:
    known = json.loads((HERE / "parts.json").read_text())
    parser = argparse.ArgumentParser(prog="python autograder/run.py", description="Check the parts of this assignment.")
    parser.add_argument("parts", nargs="*", metavar="PART", help=f"parts to check (default: all): {', '.join(known)}")
    parser.add_argument("--events", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, default=HERE.parent, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = [p for p in args.parts if p not in known]
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; valid parts: {', '.join(known)}")
    root = args.root.resolve()
    if args.events is not None:
        if len(args.parts) != 1:
            parser.error("--events takes exactly one part")
        with open(args.events, "a", encoding="utf-8") as events:
            run_part(args.parts[0], root, events)
        return 0
    total = 0
    for part in args.parts or list(known):
        results = run_part(part, root)
        ok = all(r["passed"] for r in results)
        points = known[part]["points"] if ok else 0
        total += points
        print(f"{part}: {points}/{known[part]['points']}")
        for r in results:
            print(f"  {'ok  ' if r['passed'] else 'FAIL'} {r['check']}" + (f": {r['message']}" if r["message"] else ""))
    print(f"total: {total}/{sum(known[p]['points'] for p in args.parts or known)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
