"""Fine-tuning: minisnip's `train.fit` against a plain loop over `transformers.BertForSequenceClassification`.

Both implementations start from the same BERT folder (default: all-MiniLM-L6-v2 from
`minisnip.default_model_path()`) and get, for every seed:

* the same weights: minisnip draws the new classifier head from the seed (as `run_finetune` does); its
  classifier and pooler are copied into the Hugging Face model, and the logits are checked to agree;
* the same batches: `minisnip.data.length_bucketed_batches(lengths, batch_size, seed + epoch)` padded by
  minisnip's tokenizer; `fit` builds them itself, the Hugging Face loop calls the same functions;
* the same set-up and optimiser step as `fit`, by the same code (`minisnip.train.start_training`,
  `optimizer_step`: AdamW, no decay on 1-dim parameters, linear warm-up then decay, gradient clipping),
  and the same dropout probabilities;
* the same evaluation (`minisnip.train.evaluate` on every dev split after each epoch).

Only the dropout masks may differ, so the dev scores are compared "within seed noise": the difference of the
means against the spread over seeds. (On the CPU the masks turn out identical as well: both models draw them
from torch's global generator in the same order and shapes, so a seed's two runs are one run up to float
rounding; the JSON's `max_rel_train_loss_diff` says so.) Runs are interleaved (seed 1: minisnip then HF,
seed 2: HF then minisnip, ...) so that machine noise hits both; the throughput ratio is minisnip over HF
(> 1: minisnip faster), from wall-clock time and from process CPU time of the training steps.

On a machine shared with other processes, use --threads 1: with several threads, OpenMP threads spin while a
preempted sibling catches up, which costs per operator launched; the ratio then measures scheduler luck.

A deterministic check needs no noise argument: with every dropout probability set to 0, a few steps on the
same batches must give the same loss at every step (relative tolerance --check-tol).

    python bench/bench_finetune.py --glue-dir ../shared/data/glue                    # mrpc + sst2, 3 seeds
    python bench/bench_finetune.py --glue-dir ../shared/data/glue --task sst2 --max-train 1000 --threads 1
    python bench/bench_finetune.py --quick --glue-dir data/fixtures/glue --out /tmp/b   # smoke test
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(HERE.parent))

import minisnip  # noqa: E402
from bench.machine import loadavg, machine_info, table_text, write_result  # noqa: E402
from minisnip.data import Encoded, iterate, length_bucketed_batches  # noqa: E402
from minisnip.finetune import load_classifier, load_task_data  # noqa: E402
from minisnip.glue import GLUE_DIR_ENV, GlueTask  # noqa: E402
from minisnip.model import BertForSequenceClassification  # noqa: E402
from minisnip.tokenizer import Tokenizer, load_tokenizer  # noqa: E402
from minisnip.train import StepContext, TrainConfig, TrainHook, amp_dtype, evaluate, fit, set_seed  # noqa: E402

MS = "minisnip"
REF = "transformers"


# --- settings ----------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="BERT folder (default: minisnip.default_model_path())")
    p.add_argument("--glue-dir", default=None, help=f"GLUE TSV folder (default: ${GLUE_DIR_ENV})")
    p.add_argument("--task", nargs="+", default=None, help="GLUE task(s) (default: mrpc sst2; --quick: sst2)")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="seeds (default: 1 2 3; --quick: 1 2)")
    p.add_argument("--max-train", type=int, default=None,
                   help="train examples, a random sample drawn with the first seed (default 1000; --quick 8)")
    p.add_argument("--max-dev", type=int, default=None, help="first N dev examples only (default: whole dev)")
    p.add_argument("--epochs", type=int, default=None, help="default 2; --quick 1")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=None, help="default 32; --quick 2")
    p.add_argument("--max-length", type=int, default=None, help="default 128; --quick 32")
    p.add_argument("--warmup-ratio", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cpu (float32) or cuda (bf16 autocast in both, as fit's amp='auto')")
    p.add_argument("--amp", default="auto", choices=["auto", "off", "bf16", "fp16"],
                   help="autocast in both (fit's TrainConfig.amp): auto = bf16 on cuda, off on cpu; off = float32")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: number of CPUs this process may use)")
    p.add_argument("--check-steps", type=int, default=None,
                   help="steps of the no-dropout equality check on the first task (default 4; 0: skip)")
    p.add_argument("--check-tol", type=float, default=1e-4, help="relative tolerance of the no-dropout check")
    p.add_argument("--quick", action="store_true",
                   help="1 epoch of up to 8 examples, batch 2 x 32 tokens, 2 seeds, sst2: a smoke test (use the fixtures)")
    p.add_argument("--out", default=None,
                   help="output folder (finetune_<device>.json/.md inside; default bench/results, and "
                        "finetune_<device>_quick.* there with --quick), or a .json file path")
    args = p.parse_args(argv)
    quick = args.quick
    for name, full, small in (("task", ["mrpc", "sst2"], ["sst2"]), ("seeds", [1, 2, 3], [1, 2]),
                              ("max_train", 1000, 8), ("epochs", 2, 1), ("batch_size", 32, 2),
                              ("max_length", 128, 32), ("check_steps", 4, 2)):
        if getattr(args, name) is None:
            setattr(args, name, small if quick else full)
    if args.threads is None:
        args.threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if args.glue_dir is None:
        args.glue_dir = os.environ.get(GLUE_DIR_ENV)
    if not args.glue_dir:
        p.error(f"pass --glue-dir (or set ${GLUE_DIR_ENV}): the folder holding the GLUE TSVs")
    if len(set(args.seeds)) != len(args.seeds):
        p.error("--seeds must be distinct")
    if min(args.max_train, args.epochs, args.batch_size, args.threads) < 1 or args.check_steps < 0:
        p.error("max-train, epochs, batch-size and threads must be >= 1, check-steps >= 0")
    if args.max_dev is not None and args.max_dev < 1:
        p.error("--max-dev must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device available")
    return args


def _dtype_label(dtype: torch.dtype | None) -> str:
    """What the settings line says of the arithmetic: 'float32', or e.g. 'bf16 autocast'."""
    return "float32" if dtype is None else f"{'bf16' if dtype == torch.bfloat16 else 'fp16'} autocast"


def train_config(args: argparse.Namespace, seed: int) -> TrainConfig:
    return TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, max_length=args.max_length,
                       warmup_ratio=args.warmup_ratio, weight_decay=args.weight_decay,
                       max_grad_norm=args.max_grad_norm, seed=seed, device=args.device,
                       amp=args.amp, progress=False)


# --- the two models ----------------------------------------------------------------------------------------
class HFClassifier(nn.Module):
    """A Hugging Face classifier behind minisnip's interface, so `minisnip.train.evaluate` scores it too."""

    def __init__(self, hf: nn.Module):
        super().__init__()
        self.hf = hf
        self.config = hf.config  # evaluate() reads config.num_labels

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        return self.hf(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits

    def loss(self, logits, labels):
        if self.config.num_labels == 1:
            return F.mse_loss(logits.squeeze(-1).float(), labels.float())
        return F.cross_entropy(logits.float(), labels.long())


def disable_dropout(model: nn.Module) -> nn.Module:
    """Every dropout probability to 0: nn.Dropout modules, and minisnip's attention `dropout_p`."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if hasattr(m, "dropout_p"):
            m.dropout_p = 0.0
    return model


def dropout_probs(model: nn.Module) -> list[float]:
    """The sorted set of dropout probabilities a model applies (to check both use the same)."""
    ps = {m.p for m in model.modules() if isinstance(m, nn.Dropout)}
    ps |= {m.dropout_p for m in model.modules() if hasattr(m, "dropout_p")}
    return sorted(ps)


def load_pair(folder: Path, task: GlueTask, seed: int, device: str, dropout: bool = True
              ) -> tuple[BertForSequenceClassification, nn.Module]:
    """minisnip and Hugging Face classifiers with identical weights: the head is drawn by minisnip from `seed`."""
    import transformers
    set_seed(seed)  # as run_finetune: the new classifier head is drawn from the seed
    ms = load_classifier(folder, task)
    hf = transformers.BertForSequenceClassification.from_pretrained(
        folder, num_labels=task.num_labels, attn_implementation="sdpa", dtype=torch.float32,
        problem_type="regression" if task.is_regression else "single_label_classification")
    with torch.no_grad():  # the pooler too: a folder without one gets minisnip's fresh one in both
        hf.classifier.weight.copy_(ms.classifier.weight)
        hf.classifier.bias.copy_(ms.classifier.bias)
        hf.bert.pooler.dense.weight.copy_(ms.bert.pooler.dense.weight)
        hf.bert.pooler.dense.bias.copy_(ms.bert.pooler.dense.bias)
    if not dropout:
        disable_dropout(ms)
        disable_dropout(hf)
    return ms.to(device), hf.to(device)


@torch.no_grad()
def max_logit_diff(ms: nn.Module, hf: nn.Module, data: Encoded, tokenizer: Tokenizer, device: str, n: int = 16) -> float:
    """Largest |logit difference| of the two models (eval mode, float32) on the first n examples."""
    index = list(range(min(n, len(data))))
    batch = {k: v.to(device) for k, v in data.batch(index, tokenizer).items()}
    ms_mode, hf_mode = ms.training, hf.training
    ms.eval(), hf.eval()
    a = ms(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    b = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
           token_type_ids=batch["token_type_ids"]).logits
    ms.train(ms_mode), hf.train(hf_mode)
    return float((a.float() - b.float()).abs().max())


def subset(data: Encoded, n: int) -> Encoded:
    return Encoded(ids=data.ids[:n], types=data.types[:n], labels=data.labels[:n])


# --- training ----------------------------------------------------------------------------------------------
class StepLosses(TrainHook):
    """Records each training step's task loss (read after the step, as the reference loop reads its own)."""

    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []

    def after_step(self, ctx: StepContext) -> None:
        self.losses.append(ctx.loss.detach())


def train_minisnip(model: BertForSequenceClassification, tokenizer: Tokenizer, task: GlueTask, train: Encoded,
                   dev: dict[str, Encoded], cfg: TrainConfig) -> dict:
    """minisnip's own loop (`fit`); the per-step training losses are recorded by a `TrainHook`."""
    record = StepLosses()
    history = fit(model, tokenizer, task, train, dev, cfg, out_dir=None, hooks=[record], restore_best=False)
    h = history.to_dict()
    return {"epochs": h["epochs"], "steps": h["steps"], "train_seconds": h["train_seconds"],
            "cpu_seconds": h["train_cpu_seconds"], "train_examples": h["train_examples"],
            "train_tokens": h["train_tokens"], "step_losses": [float(x) for x in record.losses]}


def train_reference(model: nn.Module, tokenizer: Tokenizer, task: GlueTask, train: Encoded,
                    dev: dict[str, Encoded], cfg: TrainConfig) -> dict:
    """A plain loop over the Hugging Face model, step for step what `fit` does (no Trainer).

    Same seeding, batches, optimiser, schedule, clipping, autocast and per-epoch evaluation as
    `minisnip.train.fit`; the loss is the one the Hugging Face model computes from `labels`.
    """
    from minisnip.train import autocast, optimizer_step, start_training
    o = start_training(model, cfg, len(train))
    device, dtype, sched = o.device, o.dtype, o.sched
    wrapped = HFClassifier(model)
    epochs, losses = [], []
    steps = examples = tokens = 0
    seconds = cpu_seconds = 0.0
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        t0, c0, loss_sum, n_batches = time.perf_counter(), time.process_time(), 0.0, 0
        for _, batch in iterate(train, length_bucketed_batches(train.lengths, cfg.batch_size, cfg.seed + epoch),
                                tokenizer):
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast(device, dtype):
                loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             token_type_ids=batch["token_type_ids"], labels=batch["labels"]).loss
            optimizer_step(model, loss, o, cfg.max_grad_norm)
            value = loss.item()
            if not math.isfinite(value):
                raise RuntimeError(f"reference loss became {value} at step {steps + 1}")
            losses.append(value)
            loss_sum += value
            steps += 1
            n_batches += 1
            examples += batch["input_ids"].shape[0]
            tokens += int(batch["attention_mask"].sum())
        seconds += time.perf_counter() - t0
        cpu_seconds += time.process_time() - c0
        record = {"epoch": epoch, "train_loss": loss_sum / max(1, n_batches), "lr_end": sched.get_last_lr()[0],
                  "dev": {name: evaluate(wrapped, d, task, tokenizer, cfg.eval_batch_size, device, dtype)
                          for name, d in dev.items()}}
        epochs.append(record)
    return {"epochs": epochs, "steps": steps, "train_seconds": seconds, "cpu_seconds": cpu_seconds,
            "train_examples": examples,
            "train_tokens": tokens, "step_losses": losses}


def summarize_run(run: dict, task: GlueTask) -> dict:
    """Dev main metric at the last epoch and at the best epoch (first dev split), and throughput."""
    split = next(iter(run["epochs"][-1]["dev"]))
    scores = [e["dev"][split][task.main_metric] for e in run["epochs"]]
    best = max(range(len(scores)), key=lambda i: scores[i])
    sec = run["train_seconds"]
    return {"split": split, "metric": task.main_metric, "final": scores[-1], "best": scores[best],
            "best_epoch": best + 1, "final_dev": run["epochs"][-1]["dev"][split],
            "examples_per_s": run["train_examples"] / sec if sec else None,
            "examples_per_cpu_s": run["train_examples"] / run["cpu_seconds"] if run["cpu_seconds"] else None,
            "tokens_per_s": run["train_tokens"] / sec if sec else None}


def warm_up(ms: nn.Module, hf: nn.Module, train: Encoded, tokenizer: Tokenizer, device: str, batch_size: int) -> None:
    """Two forward+backward passes per model (no update), so first-call costs stay out of the timings."""
    batch = {k: v.to(device) for k, v in train.batch(list(range(min(batch_size, len(train)))), tokenizer).items()}
    for _ in range(2):
        ms.train(), hf.train()
        ms.loss(ms(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]), batch["labels"]).backward()
        hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
           token_type_ids=batch["token_type_ids"], labels=batch["labels"]).loss.backward()
    ms.zero_grad(set_to_none=True), hf.zero_grad(set_to_none=True)


# --- the deterministic check -------------------------------------------------------------------------------
def no_dropout_check(folder: Path, tokenizer: Tokenizer, task: GlueTask, train: Encoded, dev: dict[str, Encoded],
                     cfg: TrainConfig, steps: int, tol: float = 1e-4) -> dict:
    """Dropout off in both, one epoch of `steps` batches: the losses must agree step by step.

    Runs in float32 (no autocast) on cfg.device. Returns the per-step losses, the largest relative
    difference, the logit differences before and after training, and `passed`.
    """
    cfg = replace(cfg, epochs=1, amp="off", progress=False)
    train = subset(train, min(len(train), steps * cfg.batch_size))
    first = next(iter(dev))
    dev = {first: subset(dev[first], min(len(dev[first]), 16))}
    ms, hf = load_pair(folder, task, cfg.seed, cfg.device if cfg.device != "auto" else "cpu", dropout=False)
    device = str(next(ms.parameters()).device)
    before = max_logit_diff(ms, hf, dev[first], tokenizer, device)
    a = train_minisnip(ms, tokenizer, task, train, dev, cfg)["step_losses"]
    b = train_reference(hf, tokenizer, task, train, dev, cfg)["step_losses"]
    after = max_logit_diff(ms, hf, dev[first], tokenizer, device)
    rel = [abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b)]
    max_rel = max(rel) if rel else float("nan")
    return {"task": task.name, "seed": cfg.seed, "steps": len(a), "batch_size": cfg.batch_size,
            "train_examples": len(train), "losses": {MS: a, REF: b}, "rel_diff": rel, "max_rel_diff": max_rel,
            "max_abs_logit_diff_before": before, "max_abs_logit_diff_after": after, "tolerance": tol,
            "passed": len(a) == len(b) > 0 and max_rel <= tol}


# --- one task ----------------------------------------------------------------------------------------------
def mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values), "values": values}


def compare(runs: dict[str, list[dict]]) -> dict:
    """Scores: difference of means against the seed noise; throughput: minisnip / HF ratios."""
    out: dict = {}
    n = len(runs[MS])
    for key in ("final", "best"):
        a, b = [r[key] for r in runs[MS]], [r[key] for r in runs[REF]]
        sa, sb = mean_std(a), mean_std(b)
        diff = sa["mean"] - sb["mean"]
        pooled = math.sqrt((sa["std"] ** 2 + sb["std"] ** 2) / 2)
        se = math.sqrt((sa["std"] ** 2 + sb["std"] ** 2) / n) if n > 1 else float("nan")
        paired = mean_std([x - y for x, y in zip(a, b)])
        out[key] = {MS: sa, REF: sb, "diff_of_means": diff, "pooled_seed_std": pooled, "se_of_diff": se,
                    "diff_over_seed_std": diff / pooled if pooled > 0 else None,
                    "paired_diff": paired, "within_noise": bool(n > 1 and abs(diff) <= 2 * se)}
    for key in ("examples_per_s", "tokens_per_s", "examples_per_cpu_s"):
        a, b = [r.get(key) for r in runs[MS]], [r.get(key) for r in runs[REF]]
        if None in a + b:
            continue
        ratios = [x / y for x, y in zip(a, b)]
        out[key] = {MS: mean_std(a), REF: mean_std(b), "ratio_per_seed": ratios,
                    "ratio_median": statistics.median(ratios), "ratio_of_means": statistics.fmean(a) / statistics.fmean(b)}
    return out


def run_task(args: argparse.Namespace, folder: Path, tokenizer: Tokenizer, task_name: str, check: bool) -> dict:
    data = load_task_data(task_name, tokenizer, args.glue_dir, args.max_train, seed=args.seeds[0],
                          max_length=args.max_length, source="local")
    task, train = data.task, data.train
    dev = {k: subset(v, args.max_dev) if args.max_dev else v for k, v in data.dev.items()}
    print(f"[{task.display}] {len(train)} train examples, dev {', '.join(f'{k} {len(v)}' for k, v in dev.items())}, "
          f"seeds {args.seeds}", flush=True)
    result: dict = {"task": task.name, "metric": task.main_metric, "data": {**data.info,
                    "dev_examples_used": {k: len(v) for k, v in dev.items()}}}
    if check and args.check_steps > 0:
        chk = no_dropout_check(folder, tokenizer, task, train, dev, train_config(args, args.seeds[0]),
                               args.check_steps, args.check_tol)
        print(f"  no-dropout check: {chk['steps']} steps, max relative loss difference {chk['max_rel_diff']:.2e} "
              f"({'passed' if chk['passed'] else 'FAILED'})", flush=True)
        result["no_dropout_check"] = chk
    ms, hf = load_pair(folder, task, args.seeds[0], args.device)
    result["dropout"] = {MS: dropout_probs(ms), REF: dropout_probs(hf)}
    warm_up(ms, hf, train, tokenizer, args.device, args.batch_size)
    del ms, hf
    per_seed: dict[str, list[dict]] = {MS: [], REF: []}
    raw: list[dict] = []
    for i, seed in enumerate(args.seeds):
        cfg = train_config(args, seed)
        ms, hf = load_pair(folder, task, seed, args.device)
        first = next(iter(dev))
        init_diff = max_logit_diff(ms, hf, dev[first], tokenizer, args.device)
        order = (MS, REF) if i % 2 == 0 else (REF, MS)  # A B, B A, ...: drift hits both
        for impl in order:
            load = loadavg()
            run = (train_minisnip(ms, tokenizer, task, train, dev, cfg) if impl == MS
                   else train_reference(hf, tokenizer, task, train, dev, cfg))
            s = summarize_run(run, task)
            per_seed[impl].append(s)
            raw.append({"impl": impl, "seed": seed, "initial_max_abs_logit_diff": init_diff, "loadavg_1m_start": load,
                        **s, "train_seconds": run["train_seconds"], "cpu_seconds": run["cpu_seconds"],
                        "train_examples": run["train_examples"],
                        "train_tokens": run["train_tokens"], "steps": run["steps"], "epochs": run["epochs"]})
            print(f"  seed {seed} {impl:<12} {task.main_metric} final {s['final']:.4f} best {s['best']:.4f} "
                  f"(epoch {s['best_epoch']})  {s['examples_per_s']:.1f} ex/s  {s['tokens_per_s']:.0f} tok/s",
                  flush=True)
        del ms, hf
    result["runs"] = raw
    result["summary"] = compare(per_seed)
    by = {(r["seed"], r["impl"]): r for r in raw}  # do the runs coincide (the same dropout masks too)?
    result["summary"]["max_rel_train_loss_diff"] = max(
        abs(a["train_loss"] - b["train_loss"]) / max(abs(b["train_loss"]), 1e-12)
        for seed in args.seeds for a, b in zip(by[seed, MS]["epochs"], by[seed, REF]["epochs"]))
    return result


# --- output ------------------------------------------------------------------------------------------------
def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def markdown(result: dict) -> str:
    m, s = result["machine"], result["settings"]
    where = m.get("gpu", m["cpu_model"]) if m["device"] == "cuda" else m["cpu_model"]
    dev_note = "whole dev" if s["max_dev"] is None else f"first {s['max_dev']} dev examples"
    lines = [f"Device {m['device']} ({where}), torch {m['torch']}, transformers {m['transformers']}, "
             f"{m['torch_threads']} threads, {s['dtype']}; model {s['model_name']}; "
             f"{s['max_train']} train examples ({dev_note}), "
             f"{s['epochs']} epoch(s), lr {s['lr']:g}, batch {s['batch_size']}, max length {s['max_length']}, "
             f"warm-up {s['warmup_ratio']:g}, seeds {' '.join(map(str, s['seeds']))}.",
             "",
             "| task | implementation | dev metric, last epoch, per seed (x100) | mean ± std | best epoch: mean ± std "
             "| train examples / s | train tokens / s |",
             "|---|---|---|---:|---:|---:|---:|"]
    for t in result["tasks"]:
        sm = t["summary"]
        for impl in (MS, REF):
            f, b = sm["final"][impl], sm["best"][impl]
            ex, tok = sm["examples_per_s"][impl], sm["tokens_per_s"][impl]
            lines.append(f"| {t['task']} ({t['metric']}) | {impl} | {' / '.join(_pct(v) for v in f['values'])} | "
                         f"{_pct(f['mean'])} ± {_pct(f['std'])} | {_pct(b['mean'])} ± {_pct(b['std'])} | "
                         f"{ex['mean']:.1f} ± {ex['std']:.1f} | {tok['mean']:.0f} ± {tok['std']:.0f} |")
    lines += ["", "| task | Δ mean minisnip − HF (x100) | seed std, pooled | 2 × s.e. of Δ | paired Δ per seed "
                  "| within noise | throughput ratio minisnip / HF (median, per seed) | same, from CPU time |",
              "|---|---:|---:|---:|---|---|---:|---:|"]
    for t in result["tasks"]:
        c, ex, cpu = t["summary"]["final"], t["summary"]["examples_per_s"], t["summary"].get("examples_per_cpu_s")
        cpu_cell = (f"{cpu['ratio_median']:.2f} ({' / '.join(f'{r:.2f}' for r in cpu['ratio_per_seed'])})"
                    if cpu else "–")
        lines.append(f"| {t['task']} | {100 * c['diff_of_means']:+.2f} | {_pct(c['pooled_seed_std'])} | "
                     f"{_pct(2 * c['se_of_diff'])} | {' / '.join(f'{100 * v:+.2f}' for v in c['paired_diff']['values'])} | "
                     f"{'yes' if c['within_noise'] else 'no'} | **{ex['ratio_median']:.2f}** "
                     f"({' / '.join(f'{r:.2f}' for r in ex['ratio_per_seed'])}) | {cpu_cell} |")
    lines += ["", "Both start from the same weights (head drawn by minisnip from the seed, copied into HF), see the "
                  "same batches in the same order and use the same AdamW groups, schedule, clipping and dropout "
                  "probabilities; only dropout masks may differ. Runs alternate minisnip/HF per seed (A B, B A, ...). "
                  "Throughput: training steps only (padding included, evaluation excluded), real tokens; CPU time: "
                  "process CPU time of the same steps, all threads. "
                  "Within noise: |Δ| ≤ 2 × s.e. of the difference of means."]
    for t in result["tasks"]:
        d = t["summary"].get("max_rel_train_loss_diff")
        if d is not None and d < 1e-4:
            lines.append(f"{t['task']}: with dropout on, the per-epoch training losses of the two implementations agree "
                         f"to {d:.1e} (relative) for every seed: the dropout masks coincide as well (both draw from "
                         "torch's global generator in the same order and shapes), so each seed's two runs are one run "
                         "up to float rounding, and the seed-noise comparison is trivially passed.")
    for t in result["tasks"]:
        chk = t.get("no_dropout_check")
        if chk:
            lines.append(f"No-dropout check ({chk['task']}, {chk['steps']} steps of {chk['batch_size']}): max relative "
                         f"loss difference {chk['max_rel_diff']:.1e} ({'passed' if chk['passed'] else 'FAILED'}, "
                         f"tolerance {chk['tolerance']:g}); max |Δ logit| {chk['max_abs_logit_diff_before']:.1e} "
                         f"before, {chk['max_abs_logit_diff_after']:.1e} after.")
    return table_text(lines, m, result["wall_seconds"])


def output_paths(out: str | None, device: str, quick: bool) -> tuple[Path, Path]:
    name = f"finetune_{device}{'_quick' if quick and out is None else ''}"
    p = Path(out) if out is not None else HERE / "results"
    if p.suffix == ".json":
        return p, p.with_suffix(".md")
    return p / f"{name}.json", p / f"{name}.md"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    import datasets
    datasets.disable_progress_bars()
    logging.getLogger("minisnip").setLevel(logging.ERROR)  # "head newly initialised": expected here
    folder = Path(args.model) if args.model else minisnip.default_model_path()
    tokenizer = load_tokenizer(folder)
    t0, load_start = time.perf_counter(), loadavg()
    tasks = [run_task(args, folder, tokenizer, name, check=i == 0) for i, name in enumerate(args.task)]
    settings = {k: getattr(args, k) for k in ("task", "seeds", "max_train", "max_dev", "epochs", "lr", "batch_size",
                                              "max_length", "warmup_ratio", "weight_decay", "max_grad_norm",
                                              "threads", "check_steps", "check_tol", "quick")}
    default = minisnip.default_model_path() if args.model is None else None
    settings.update(model=str(folder), model_name="all-MiniLM-L6-v2" if default == folder else folder.name,
                    glue_dir=str(args.glue_dir), device=args.device,
                    dtype=_dtype_label(amp_dtype(torch.device(args.device), args.amp)),
                    eval_batch_size=TrainConfig().eval_batch_size)
    machine = machine_info(args.device)
    machine["loadavg_1m_start"], machine["loadavg_1m_end"] = load_start, loadavg()
    result = {"machine": machine, "settings": settings, "wall_seconds": time.perf_counter() - t0, "tasks": tasks}
    json_path, md_path = output_paths(args.out, args.device, args.quick)
    write_result(result, json_path, md_path, markdown(result))
    return result


if __name__ == "__main__":
    main()
