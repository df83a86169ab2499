"""The SNIP results grid: tasks x seeds x compressions x methods, mean ± std, as JSON + a markdown table.

For each task and seed the expensive part is shared: the model is fine-tuned once per *family*
(plain; with the identity prior; with prior + spectral normalization), then every target compression is
cut from a copy of that fine-tuned model and recovered for `--recovery-epochs`:

    dense          plain fine-tuning, no pruning (the reference score)
    snip-no-prior  plain fine-tuning, then thresholding of its function norms
    snip-no-sn     fine-tuning with the identity prior, thresholding
    snip           fine-tuning with the identity prior under spectral normalization, thresholding

Usage (the laptop setting; see --help):
    python bench/snip_grid.py --glue-dir ../shared/data/glue --tasks sst2 mrpc rte stsb cola \
        --seeds 1 2 3 --compressions 0.3 0.5 0.7 --max-train 2000 --epochs 3 --out bench/results/snip_grid
Results are appended run by run to <out>.jsonl, so an interrupted grid resumes where it stopped.
Compression everywhere is the share of encoder linear-layer weights removed (embeddings and classifier excluded).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import minisnip
from minisnip.checkpoint import write_json, write_text
from minisnip.finetune import environment, load_classifier, load_task_data
from minisnip.pruning.recipe import PruneConfig, dev_scores, finetune_with, recover, remove
from minisnip.snip import method as snip_method
from minisnip.snip.method import Config as SnipConfig
from minisnip.pruning.compression import COMPRESSION_DEFINITION, compression
from minisnip.train import TrainConfig, set_seed

ORDER = ("dense", "snip", "snip-no-sn", "snip-no-prior")  # rows of the tables
FAMILIES = {"plain": ("dense", "snip-no-prior"), "prior": ("snip-no-sn",), "prior+sn": ("snip",)}


def run_cell(task: str, seed: int, family: str, args, done: set, sink) -> None:
    """Fine-tune one family once, then prune at every compression; append one JSON line per result."""
    methods = [m for m in FAMILIES[family] if m in args.methods]
    todo = [(m, c) for m in methods for c in ([0.0] if m == "dense" else args.compressions)
            if (task, seed, m, c) not in done]
    if not todo:
        return
    model_path = args.model or minisnip.default_model_path()
    tokenizer = minisnip.load_tokenizer(model_path)
    train_cfg = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, max_length=args.max_length,
                            seed=seed, progress=False, device=args.device)
    data = load_task_data(task, tokenizer, args.glue_dir, args.max_train, seed=0, max_length=args.max_length)
    set_seed(seed)
    model = load_classifier(model_path, data.task)
    dense_config = copy.deepcopy(model.config)
    prior, sn = {"plain": (False, False), "prior": (True, False), "prior+sn": (True, True)}[family]
    snip_cfg = SnipConfig(prior=prior, spectral_norm=sn, prior_lambda=args.prior_lambda, prior_warmup=args.prior_warmup)
    base_cfg = PruneConfig(target=0.5, recovery_epochs=args.recovery_epochs)
    t0 = time.perf_counter()
    history, _ = finetune_with(model, tokenizer, data, snip_method, snip_cfg, base_cfg, train_cfg)
    finetune_seconds = time.perf_counter() - t0
    finetuned = history.best_metrics  # the model holds the best epoch's weights: no second evaluation
    split, metric = next(iter(data.dev)), data.task.main_metric
    for method, target in todo:
        record = {"task": task, "seed": seed, "method": method, "target": target, "family": family,
                  "main_metric": metric, "finetuned": finetuned[split][metric],
                  "finetune_seconds": finetune_seconds}
        if method == "dense":
            record.update(compression=0.0, before_recovery=finetuned[split][metric], score=finetuned[split][metric])
        else:
            pruned = copy.deepcopy(model)
            cfg = replace(base_cfg, target=target)
            outcome = remove(pruned, tokenizer, data, snip_method, [], cfg, train_cfg, dense_config)
            before = dev_scores(pruned, tokenizer, data, train_cfg=train_cfg)[split][metric]
            after = recover(pruned, tokenizer, data, cfg, train_cfg).best_metrics[split][metric] \
                if cfg.recovery_epochs else before
            record.update(compression=compression(pruned, dense_config), before_recovery=before, score=after,
                          removed=outcome.report["removed"], tau=outcome.tau)
        print(f"{task} seed {seed} {method:<13} target {target:.1f}: compression {record['compression']:.3f}, "
              f"{metric} {100 * record['score']:.2f} (before recovery {100 * record['before_recovery']:.2f})",
              flush=True)
        sink.write(json.dumps(record) + "\n")
        sink.flush()


def summarize(records: list[dict]) -> dict:
    """{task: {method: {target: {mean, std, n, compression}}}} over seeds."""
    out: dict = {}
    for r in records:
        out.setdefault(r["task"], {}).setdefault(r["method"], {}).setdefault(str(r["target"]), []).append(r)
    for task, methods in out.items():
        for method, targets in methods.items():
            for target, rs in targets.items():
                scores = [r["score"] for r in rs]
                targets[target] = {"mean": statistics.fmean(scores),
                                   "std": statistics.stdev(scores) if len(scores) > 1 else 0.0, "n": len(scores),
                                   "compression": statistics.fmean(r["compression"] for r in rs),
                                   "before_recovery": statistics.fmean(r["before_recovery"] for r in rs),
                                   "metric": rs[0]["main_metric"]}
    return out


def table(summary: dict, compressions: list[float]) -> str:
    """Markdown: one row per task and method, one column per compression (dev main metric x100, mean ± std);
    in brackets the mean before recovery fine-tuning."""
    head = "| task | metric | method | " + " | ".join(f"{c:.0%}" for c in compressions) + " |"
    lines = [head, "|" + "---|" * (3 + len(compressions))]
    for task, methods in summary.items():
        dense = methods.get("dense", {}).get("0.0")
        for method in ORDER:
            if method not in methods:
                continue
            cells = []
            for c in compressions:
                v = methods[method].get("0.0" if method == "dense" else str(c))
                before = f" [{100 * v['before_recovery']:.1f}]" if v and method != "dense" else ""
                cells.append(f"{100 * v['mean']:.1f} ± {100 * v['std']:.1f}{before} (n={v['n']})" if v else "–")
            metric = (dense or next(iter(methods[method].values())))["metric"]
            lines.append(f"| {task} | {metric} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def averages(summary: dict, compressions: list[float]) -> dict:
    """{method: {target: {"mean": mean over tasks of the task means, "of_dense": that / the dense average}}}.

    Only over tasks that have every method and compression (GLUE's "average score": metrics mixed as they come).
    """
    keys = {m: ["0.0"] if m == "dense" else [str(c) for c in compressions] for m in ORDER}
    tasks = [t for t, ms in summary.items() if all(k in ms.get(m, {}) for m in ORDER for k in keys[m])]
    if not tasks:
        return {}
    dense = statistics.fmean(summary[t]["dense"]["0.0"]["mean"] for t in tasks)
    out = {"tasks": tasks}
    for m in ORDER:
        out[m] = {}
        for c in compressions:
            k = "0.0" if m == "dense" else str(c)
            mean = statistics.fmean(summary[t][m][k]["mean"] for t in tasks)
            out[m][str(c)] = {"mean": mean, "of_dense": mean / dense if dense else float("nan")}
    return out


def averages_table(avg: dict, compressions: list[float]) -> str:
    """Markdown: the task average per method and compression, and its share of the dense average."""
    if not avg:
        return ""
    lines = [f"Average over {', '.join(avg['tasks'])} (x100; in brackets: share of the dense average):", "",
             "| method | " + " | ".join(f"{c:.0%}" for c in compressions) + " |",
             "|---|" + "---|" * len(compressions)]
    for m in ORDER:
        cells = [f"{100 * avg[m][str(c)]['mean']:.1f} ({100 * avg[m][str(c)]['of_dense']:.1f}%)" for c in compressions]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def read_records(jsonl: Path) -> list[dict]:
    """The results in `jsonl`, the first one for each (task, seed, method, target) (concurrent processes may
    have written one twice)."""
    lines = jsonl.read_text().splitlines() if jsonl.exists() else []
    first: dict = {}
    for r in (json.loads(line) for line in lines if line.strip()):
        first.setdefault((r["task"], r["seed"], r["method"], r["target"]), r)
    return list(first.values())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--glue-dir", type=Path, required=True)
    p.add_argument("--model", default=None)
    p.add_argument("--tasks", nargs="+", default=["sst2", "mrpc", "rte", "stsb", "cola"])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--compressions", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    p.add_argument("--methods", nargs="+", default=list(ORDER))
    p.add_argument("--max-train", type=int, default=2000)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--recovery-epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--prior-lambda", type=float, default=SnipConfig().prior_lambda)
    p.add_argument("--prior-warmup", type=float, default=SnipConfig().prior_warmup)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, default=Path("bench/results/snip_grid"))
    args = p.parse_args(argv)
    jsonl = args.out.with_suffix(".jsonl")
    jsonl.parent.mkdir(parents=True, exist_ok=True)
    records = read_records(jsonl)
    done = {(r["task"], r["seed"], r["method"], r["target"]) for r in records}
    with jsonl.open("a") as sink:
        for task in args.tasks:
            for seed in args.seeds:
                for family in FAMILIES:
                    run_cell(task, seed, family, args, done, sink)
    records = read_records(jsonl)
    summary = summarize(records)
    avg = averages(summary, args.compressions)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    write_json(args.out.with_suffix(".json"),
               {"settings": settings, "environment": environment(), "compression_definition": COMPRESSION_DEFINITION,
                "summary": summary, "averages": avg})
    md = table(summary, args.compressions) + ("\n\n" + averages_table(avg, args.compressions) if avg else "")
    write_text(args.out.with_suffix(".md"),
        f"Dev main metric x100, mean ± std over seeds after recovery fine-tuning [mean before recovery]; "
        f"columns: target compression ({COMPRESSION_DEFINITION}).\n"
        f"Settings: {settings}\n\n{md}\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
