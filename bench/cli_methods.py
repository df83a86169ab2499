"""Every `prune --method` through the command line on the default model and a GLUE subset: each must exit 0 and
write the same outputs (result.json, pruning.json, pruned/); the table lists what each wrote.

    python bench/cli_methods.py --glue-dir ../shared/data/glue --task sst2 --max-train 200 --epochs 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

from minisnip.__main__ import METHODS, main as cli  # noqa: E402
from minisnip.checkpoint import write_json, write_text  # noqa: E402


def _stamp(path: Path) -> tuple[int, int] | None:
    """(inode, mtime in ns) of a file, None if absent: minisnip writes result.json by a rename, so a new file
    has a new stamp."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--glue-dir", type=Path, required=True)
    p.add_argument("--model", default=None)
    p.add_argument("--task", default="sst2")
    p.add_argument("--target", type=float, default=0.5)
    p.add_argument("--max-train", type=int, default=200)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--work", type=Path, default=Path("bench/out/cli_methods"))
    p.add_argument("--out", type=Path, default=Path("bench/results/cli_methods"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.methods:
        run = args.work / name
        argv = ["prune", "--method", name, "--target", str(args.target), "--task", args.task, "--glue-dir",
                str(args.glue_dir), "--max-train", str(args.max_train), "--epochs", str(args.epochs), "--max-length",
                str(args.max_length), "--out", str(run), "--overwrite", "--no-progress", "--no-plots"]
        if args.model:
            argv += ["--model", args.model]
        written = run / "result.json"  # a failed run may leave an earlier run's file in place: read only a new one
        earlier = _stamp(written)
        t0 = time.perf_counter()
        try:
            code = cli(argv)
        except SystemExit as e:  # argparse's refusals exit (2) instead of returning
            code = e.code if isinstance(e.code, int) else 1
        seconds = time.perf_counter() - t0
        result = json.loads(written.read_text()) if _stamp(written) not in (None, earlier) else {}
        rows.append({"method": name, "exit": code, "status": result.get("status"), "seconds": seconds,
                     "written": sorted(p.name for p in run.iterdir()) if run.exists() else [],
                     "finetuned_score": result.get("finetuned_score"), "score": result.get("score"),
                     "before_recovery": (result.get("scores", {}).get("pruned_before_recovery") or {}).get("dev", {}).get(
                         result.get("main_metric")), "compression": result.get("compression"),
                     "sparsity": result.get("sparsity"), "main_metric": result.get("main_metric")})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    write_json(args.out.with_suffix(".json"), {"settings": settings, "rows": rows})
    lines = [f"`python -m minisnip prune --method M --target {args.target} --task {args.task} --max-train "
             f"{args.max_train} --epochs {args.epochs} --max-length {args.max_length}` on the default model "
             f"({args.threads} thread); dev {rows[0]['main_metric'] if rows else ''} x100.", "",
             "| method | exit | status | fine-tuned | before recovery | after recovery | compression | sparsity | s | written |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    f = lambda v: f"{100 * v:.2f}" if isinstance(v, float) else "–"  # noqa: E731
    for r in rows:
        lines.append(f"| {r['method']} | {r['exit']} | {r['status']} | {f(r['finetuned_score'])} | {f(r['before_recovery'])} "
                     f"| {f(r['score'])} | {'–' if r['compression'] is None else format(r['compression'], '.3f')} | "
                     f"{'–' if r['sparsity'] is None else format(r['sparsity'], '.3f')} | {r['seconds']:.0f} | "
                     f"{', '.join(r['written'])} |")
    write_text(args.out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(r["exit"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
