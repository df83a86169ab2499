"""Run folders, written so that nothing is lost: checked first, written aside, moved into place at the end.

The rules (every command that writes a run follows them, through `RunDir`):

1. `RunDir(out, overwrite, inputs)` only checks: `out` is not a file; a non-empty `out` needs `overwrite`; no
   input (the model folder, the GLUE folder, a teacher) lies inside `out`, since replacing the run would
   delete it; a folder above `out` can be written. Nothing on disk changes.
2. The caller then loads and checks its data and model, and only then calls `open()`, which creates a hidden
   sibling `.<name>.minisnip-partial-<random>` and returns it: everything the run writes goes there.
3. `commit()` moves what was written into `out`. When `out` already holds a run (with `overwrite`), only
   what minisnip itself writes is replaced (`OWNED_NAMES`, `seed-<n>/`); a user's own files in the
   folder stay where they are. `discard()` removes the partial folder of a run that wrote nothing worth keeping.
4. A run that fails or is interrupted after it started writing is kept, with its result.json saying how it ended:
   in `out` when `out` held no earlier run, otherwise in a new sibling `<out>.failed-<time>`, so that an earlier
   run is replaced only by one that completed (`--overwrite` never trades a finished run for a failed one).

A run killed outright (SIGKILL, power loss) leaves its partial sibling and the previous `out` untouched.

Under torchrun only rank 0 writes the run: the other ranks check as rank 0 does, but `open()` gives them a
scratch folder in the system's temporary directory (write_json and save_pretrained write nothing there),
which `commit()` and `discard()` remove.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping

from . import distributed

# Everything a minisnip run writes at the top of its folder; --overwrite replaces these and nothing else.
OWNED_NAMES = ("result.json", "summary.json", "pruning.json", "best", "pruned", "teacher",
               "norms_per_layer.png", "kept_map.png")
SEED_DIR = re.compile(r"^seed-\d+$")
PARTIAL = ".minisnip-partial-"


class RunDirError(FileExistsError):
    """The output folder cannot take this run (it holds a run, is a file, or holds an input of the run)."""


class RunFailed(RuntimeError):
    """A run failed after it started writing; its folder is in place, with result.json saying how it ended."""


def owned(name: str) -> bool:
    """Whether a top-level entry of a run folder is one minisnip writes."""
    return name in OWNED_NAMES or bool(SEED_DIR.match(name))


def is_inside(path: Path, folder: Path) -> bool:
    """Whether `path` is `folder` or lies below it (links resolved)."""
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


class RunDir:
    """One run's output folder; see the module docstring for the rules."""

    def __init__(self, out: str | Path, overwrite: bool = False, inputs: Mapping[str, str | Path | None] = {}):
        self.out = Path(out)
        self.overwrite = overwrite
        self.work: Path | None = None
        out = self.out
        if out.exists() and not out.is_dir():
            raise RunDirError(f"--out {out} is a file; a run needs a folder (choose another --out)")
        for flag, p in inputs.items():
            if p is not None and Path(p).exists() and is_inside(Path(p), out):
                raise RunDirError(f"{flag} {p} lies inside --out {out}: writing the run there would replace it; "
                                  "choose another --out (or copy the input elsewhere first)")
        if out.is_dir() and any(out.iterdir()):
            if not overwrite:
                held = "a run" if any((out / n).exists() for n in ("result.json", "summary.json")) else "files"
                raise RunDirError(f"{out} already holds {held}; choose another --out or pass --overwrite "
                                  "(which replaces only the files minisnip writes there)")
        ancestor = out if out.exists() else next(p for p in out.absolute().parents if p.exists())
        if not ancestor.is_dir():
            raise RunDirError(f"--out {out}: {ancestor} is a file, so no folder can be made there")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise RunDirError(f"--out {out}: {ancestor} is not writable")

    def open(self) -> Path:
        """Create the hidden partial folder beside `out` and return it: the place to write."""
        if not distributed.is_main():  # only rank 0 writes the run
            self.work = Path(tempfile.mkdtemp(prefix=f"minisnip-rank{distributed.rank()}-"))
            return self.work
        self.out.absolute().parent.mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix=f".{self.out.name}{PARTIAL}", dir=self.out.absolute().parent))
        return self.work

    def commit(self) -> Path:
        """Move what was written into `out` (replacing only minisnip's own entries there); returns `out`."""
        if self.work is None:
            raise RuntimeError("RunDir.commit() before open()")
        if not distributed.is_main():
            self.discard()
            return self.out
        work, out = self.work, self.out
        if not out.exists():
            os.replace(work, out)
        else:
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.minisnip-old-", dir=out.absolute().parent))
            for entry in out.iterdir():  # the previous run's entries, moved aside until the new ones are in
                if owned(entry.name):
                    os.replace(entry, trash / entry.name)
            for entry in work.iterdir():
                os.replace(entry, out / entry.name)
            work.rmdir()
            shutil.rmtree(trash, ignore_errors=True)
        self.work = None
        return out

    def holds_run(self) -> bool:
        """Whether `out` holds entries of an earlier run (what `--overwrite` would replace)."""
        return self.out.is_dir() and any(owned(e.name) for e in self.out.iterdir())

    def set_aside(self) -> Path:
        """Where a run that did not complete lands (rule 4): committed into `out` when `out` holds no earlier
        run, otherwise moved to a new sibling `<out>.failed-<time>`; returns that folder."""
        if self.work is None:
            raise RuntimeError("RunDir.set_aside() before open()")
        if not distributed.is_main() or not self.holds_run():
            return self.commit()
        stem = f"{self.out.name}.failed-{time.strftime('%Y%m%d-%H%M%S')}"
        dest, n = self.out.absolute().parent / stem, 1
        while dest.exists():
            n += 1
            dest = dest.with_name(f"{stem}-{n}")
        os.replace(self.work, dest)
        self.work = None
        return dest

    @contextmanager
    def writing(self) -> Iterator[Path]:
        """open(), yield the partial folder, then commit() if the block completes, or set_aside() if it fails or
        is interrupted: a run that started writing is kept, and its result.json (written by the caller in a
        `finally`) says whether it completed. An error comes back as RunFailed (Ctrl-C as KeyboardInterrupt),
        naming the folder that holds the run."""
        work = self.open()
        try:
            yield work
        except KeyboardInterrupt:
            where = self.set_aside()
            raise KeyboardInterrupt(f"{self._kept(where)} holds what was written, and its result.json says it was "
                                    "interrupted") from None
        except Exception as e:
            where = self.set_aside()
            raise RunFailed(f"{e}\nthe run stopped; {self._kept(where)} holds it, and its result.json records "
                            "how") from e
        self.commit()

    def _kept(self, where: Path) -> str:
        if where == self.out:
            return f"the run folder {where}"
        return f"{where} (beside {self.out}, which keeps its earlier run)"

    def discard(self) -> None:
        """Remove the partial folder (a run that failed before writing anything worth keeping)."""
        if self.work is not None:
            shutil.rmtree(self.work, ignore_errors=True)
            self.work = None


@contextmanager
def recorded(result: dict, path: Path) -> Iterator[dict]:
    """Write `result` to `path` with status "running", then again with how the block ended ("completed",
    "interrupted", "failed: <error>") and its wall time: a run file never claims more than happened."""
    from .checkpoint import write_json
    result["status"] = "running"
    write_json(path, result)
    t0 = time.perf_counter()
    try:
        yield result
        result["status"] = "completed"
    except KeyboardInterrupt:
        result["status"] = "interrupted"
        raise
    except Exception as e:
        result["status"] = f"failed: {type(e).__name__}: {e}"
        raise
    finally:
        result["wall_seconds"] = time.perf_counter() - t0
        write_json(path, result)


__all__ = ["OWNED_NAMES", "RunDir", "RunDirError", "RunFailed", "is_inside", "owned", "recorded"]
