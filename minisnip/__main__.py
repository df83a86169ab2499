"""The command line: `python -m minisnip {show,finetune,prune,evaluate} ...` (`--help` on each).

Every argument is checked when it is parsed (`argparse` types below: finite numbers in range, existing
folders), then each command checks its paths, data and model before anything is written (`minisnip.rundir`).
Exit status: 0 done, 1 the run failed (its folder says how), 2 a usage or input error, 130 interrupted.
No traceback is printed unless `--debug` is given. `finetune` and `prune` also run under
`torchrun --nproc_per_node N -m minisnip ...` (`minisnip.distributed`): rank 0 prints and writes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path
from types import ModuleType

from . import distributed
from .methods import dsp, heads, l0, magnitude, magnitude_unstructured, movement, movement_structured, sparsebert
from .pruning.branches import KINDS
from .pruning.distill import DistillConfig
from .pruning.recipe import PruneConfig
from .snip import method as snip_method
from .snip.method import Config as SnipConfig
from .train import TrainConfig

EPILOG = """examples:
  python -m minisnip show                                   # the default model's branches
  python -m minisnip finetune --task sst2 --glue-dir ../shared/data/glue --max-train 2000 --out runs/sst2
  python -m minisnip finetune --task rte --glue-dir DIR --seeds 1 2 3 --out runs/rte
  python -m minisnip prune --method snip --target 0.5 --task sst2 --glue-dir DIR --max-train 2000 --out runs/snip
  python -m minisnip evaluate --task sst2 --glue-dir DIR --model runs/sst2/best
The GLUE folder can also come from the MINISNIP_GLUE_DIR environment variable; without either,
data is fetched with the `datasets` library (needs internet)."""

# The pruning methods: command-line name -> (module, the fields of its Config that this name sets).
METHODS: dict[str, tuple[ModuleType, dict]] = {
    "snip": (snip_method, {}),
    "snip-no-sn": (snip_method, {"spectral_norm": False}),
    "snip-no-prior": (snip_method, {"prior": False, "spectral_norm": False}),
    "snip-prox": (snip_method, {"prior_step": "proximal"}),
    "magnitude": (magnitude, {}),
    "magnitude-unstructured": (magnitude_unstructured, {}),
    "movement": (movement, {"variant": "hard"}),
    "soft-movement": (movement, {"variant": "soft"}),
    "movement-structured": (movement_structured, {}),
    "l0": (l0, {}),
    "heads": (heads, {}),
    "dsp": (dsp, {}),
    "sparsebert": (sparsebert, {}),
}

TRAIN, PRUNE, SNIP, DISTILL = TrainConfig(), PruneConfig(), SnipConfig(), DistillConfig()


# --- argument types: each refuses a bad value with a message naming it ------------------------------------------
def number(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False):
    """An argparse type: a finite float in [lo, hi] (open ends where asked)."""
    def parse(text: str) -> float:
        try:
            x = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(x):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if lo is not None and (x < lo or (lo_open and x == lo)) or hi is not None and (x > hi or (hi_open and x == hi)):
            raise argparse.ArgumentTypeError(f"{text} is outside {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}")
        return x
    return parse


def integer(lo: int = 1):
    """An argparse type: an integer ≥ lo."""
    def parse(text: str) -> int:
        try:
            x = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if x < lo:
            raise argparse.ArgumentTypeError(f"{text} is below {lo}")
        return x
    return parse


def sn_bound(text: str) -> str | float:
    if text == "init":
        return text
    try:
        return number(0, None, lo_open=True)(text)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"{e}; expected 'init' or a number > 0") from None


def device(text: str) -> str:
    import torch
    if text == "auto":
        return text
    try:
        d = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; expected auto, cpu, cuda, cuda:1, mps, ...") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: this torch build ({torch.__version__}) sees no CUDA GPU; use cpu or auto")
    if d.type == "cuda" and d.index is not None and d.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: only {torch.cuda.device_count()} CUDA device(s) present")
    if d.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text}: MPS is not available here; use cpu or auto")
    return text


def option(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=VALUE, e.g. prior_lambda=1e-3")
    return key.strip(), value.strip()


# --- the parser ---------------------------------------------------------------------------------------------------
def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, help="GLUE task: cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli")
    p.add_argument("--glue-dir", type=Path, default=None,
                   help="folder with <TASK>/train.tsv, dev.tsv (default: $MINISNIP_GLUE_DIR, else the hub)")
    p.add_argument("--max-length", type=integer(2), default=TRAIN.max_length,
                   help="truncate sequences to this many tokens (%(default)s)")
    p.add_argument("--batch-size", type=integer(1), default=TRAIN.batch_size, help="training batch size (%(default)s)")
    p.add_argument("--device", type=device, default=TRAIN.device, help="auto, cpu, cuda, cuda:1, ... (%(default)s)")
    p.add_argument("--amp", default=TRAIN.amp, choices=["auto", "bf16", "fp16", "off"],
                   help="autocast on CUDA (auto: bf16 where supported, else fp16; off on CPU)")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="BERT folder or hub name (default: all-MiniLM-L6-v2, offline)")
    p.add_argument("--out", type=Path, required=True, help="run directory (result.json, checkpoints, plots)")
    p.add_argument("--epochs", type=integer(1), default=TRAIN.epochs, help="training epochs (%(default)s)")
    p.add_argument("--lr", type=number(0, None, lo_open=True), default=TRAIN.lr, help="peak learning rate (%(default)s)")
    p.add_argument("--warmup", type=number(0, 1, hi_open=True), default=TRAIN.warmup_ratio,
                   help="share of steps for linear warm-up (%(default)s)")
    p.add_argument("--max-train", type=integer(1), default=None, help="train on a seeded random sample of N examples")
    p.add_argument("--seed", type=int, default=TRAIN.seed, help="random seed (%(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run --out holds (only the files minisnip writes; others stay)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m minisnip", description="minisnip: BERT, GLUE fine-tuning and "
                                     "SNIP pruning (Lin et al. 2020), from scratch.", epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("show", help="load a model and list its residual branches")
    p.add_argument("--model", default=None, help="BERT folder or minisnip checkpoint (default: all-MiniLM-L6-v2)")

    p = sub.add_parser("finetune", help="fine-tune on a GLUE task (one or several seeds)",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_data_args(p)
    _add_train_args(p)
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="several seeds: one run each, then mean ± std (instead of --seed)")

    methods = "\n".join(f"  {name:<16} {module.DESCRIPTION}" + (f" ({overrides})" if overrides else "")
                        for name, (module, overrides) in METHODS.items())
    p = sub.add_parser("prune", help="fine-tune with a pruning method's terms, select, remove, recover",
                       epilog=f"methods:\n{methods}\n\n{EPILOG}", formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_data_args(p)
    _add_train_args(p)
    p.add_argument("--method", default="snip", choices=list(METHODS), help="pruning method (%(default)s); see below")
    p.add_argument("--target", type=number(0, 1, lo_open=True, hi_open=True), default=None,
                   help=f"compression to reach, in (0, 1): share of encoder linear-layer weights removed ({PRUNE.target})")
    p.add_argument("--threshold", type=number(0, None), default=None,
                   help="instead of --target: remove branches with score (SNIP: function norm) < τ")
    p.add_argument("--dense", action="store_true", help="no target: fine-tune with the method's terms, prune nothing")
    p.add_argument("--allow-empty", action="store_true", help="allow removing every attention and FFN block")
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(PRUNE.kinds),
                   help="branch kinds a structured method scores and removes (%(default)s)")
    p.add_argument("--neuron-group-size", type=integer(1), default=PRUNE.neuron_group_size,
                   help="FFN neurons per branch (default 2 x head_dim)")
    p.add_argument("--per-param", action="store_true", help="rank branches by score per parameter")
    p.add_argument("--recovery-epochs", type=integer(0), default=PRUNE.recovery_epochs,
                   help="fine-tuning epochs after pruning (%(default)s)")
    p.add_argument("--prior-lambda", type=number(0, None), default=SNIP.prior_lambda,
                   help="SNIP: strength λ of the identity prior (%(default)s)")
    p.add_argument("--prior-warmup", type=number(0, 1), default=SNIP.prior_warmup,
                   help="SNIP: share of fine-tuning steps over which λ ramps up from 0 (%(default)s)")
    p.add_argument("--sn-bound", type=sn_bound, default=SNIP.sn_bound,
                   help="SNIP: spectral-norm bound c: 'init' (σ at load time) or a number > 0 (%(default)s)")
    p.add_argument("--distill", action="store_true",
                   help="distil from a fine-tuned dense teacher while fine-tuning (any method; sparsebert always does)")
    p.add_argument("--teacher", type=Path, default=None,
                   help="the teacher: a checkpoint fine-tuned on the task (default: fine-tune one first, kept in teacher/)")
    p.add_argument("--distill-temperature", type=number(0, None, lo_open=True), default=DISTILL.temperature,
                   help="distillation temperature T (%(default)s)")
    p.add_argument("--distill-alpha", type=number(0, None), default=DISTILL.alpha,
                   help="weight α of the distillation term added to the task loss (%(default)s)")
    p.add_argument("--distill-hidden", type=number(0, None), default=DISTILL.hidden_weight,
                   help="weight β of the layer-output term inside it (%(default)s: off)")
    p.add_argument("--option", type=option, action="append", default=[], metavar="NAME=VALUE",
                   help="set a field of the method's Config (repeatable), e.g. --option prior_weights=none")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")

    p = sub.add_parser("evaluate", help="evaluate a fine-tuned checkpoint on a GLUE dev set")
    _add_data_args(p)
    p.add_argument("--model", required=True, help="fine-tuned checkpoint folder (e.g. RUN/best)")
    p.add_argument("--out", type=Path, default=None, help="write the metrics as JSON to this file")
    p.add_argument("--allow-untrained-head", action="store_true",
                   help="evaluate even a classifier head that was not fine-tuned for this task (a random score)")
    for p in sub.choices.values():
        p.add_argument("--debug", action="store_true", help="print the traceback of an error")
    return parser


class UsageError(ValueError):
    """A combination of arguments that cannot work (exit status 2)."""


def train_config(args: argparse.Namespace, seed: int) -> TrainConfig:
    return TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, max_length=args.max_length,
                       warmup_ratio=args.warmup, seed=seed, device=args.device, amp=args.amp,
                       progress=not args.no_progress)


def method_config(args: argparse.Namespace):
    """The method's Config: its defaults, what the method name sets, SNIP's flags, then each --option."""
    module, overrides = METHODS[args.method]
    cls = module.Config
    values = dict(overrides)
    if module is snip_method:
        values.update(prior_lambda=args.prior_lambda, prior_warmup=args.prior_warmup, sn_bound=args.sn_bound)
    elif (args.prior_lambda, args.prior_warmup, args.sn_bound) != (SNIP.prior_lambda, SNIP.prior_warmup, SNIP.sn_bound):
        raise UsageError(f"--prior-lambda, --prior-warmup and --sn-bound are SNIP's; --method {args.method} has none")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, text in args.option:
        if key not in fields:
            raise UsageError(f"--option {key}: --method {args.method} has no such setting; its settings: "
                             f"{', '.join(fields)}")
        values[key] = _convert(key, text, getattr(cls(), key))
    return cls(**values)


def _convert(key: str, text: str, default):
    """An --option value in the type of the field's default ("none" -> None)."""
    if text.lower() == "none":
        return None
    if isinstance(default, bool):
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise UsageError(f"--option {key}={text}: expected true or false")
        return text.lower() in ("true", "1", "yes")
    if isinstance(default, (int, float)):
        try:
            return type(default)(text) if not (isinstance(default, int) and "." in text) else float(text)
        except ValueError:
            raise UsageError(f"--option {key}={text}: expected a number like {default!r}") from None
    return text


def prune_config(args: argparse.Namespace) -> PruneConfig:
    if args.dense and (args.target is not None or args.threshold is not None):
        raise UsageError("--dense prunes nothing; it cannot go with --target or --threshold")
    if args.target is not None and args.threshold is not None:
        raise UsageError("give --target or --threshold, not both")
    target = None if args.dense or args.threshold is not None else (args.target if args.target is not None else PRUNE.target)
    module = METHODS[args.method][0]
    distilled = args.distill or module.USES_DISTILLATION
    set_distill = (args.distill_temperature, args.distill_alpha, args.distill_hidden) != \
        (DISTILL.temperature, DISTILL.alpha, DISTILL.hidden_weight)
    if set_distill and not distilled:
        raise UsageError("--distill-temperature / --distill-alpha / --distill-hidden need --distill")
    if args.teacher is not None and not distilled:
        raise UsageError(f"--teacher is used for distillation: add --distill (--method {args.method} does not distil)")
    distill = DistillConfig(temperature=args.distill_temperature, alpha=args.distill_alpha,
                            hidden_weight=args.distill_hidden) if distilled else None
    return PruneConfig(target=target, threshold=args.threshold, kinds=tuple(args.kinds),
                       neuron_group_size=args.neuron_group_size,
                       per_param=args.per_param, recovery_epochs=args.recovery_epochs, allow_empty=args.allow_empty,
                       distill=distill)


# --- the commands ---------------------------------------------------------------------------------------------------
def cmd_show(args: argparse.Namespace) -> None:
    from .checkpoint import default_model_path
    from .model import BertModel
    path = args.model or default_model_path()
    model = BertModel.from_pretrained(path)
    c = model.config
    print(f"{path}\n{c.num_hidden_layers} layers, hidden {c.hidden_size}, {c.num_attention_heads} heads of "
          f"{c.head_dim}, FFN {c.intermediate_size}, vocab {c.vocab_size}")
    print(f"{'layer':>5}  {'heads kept':<40} {'attention params':>16} {'ffn width':>9} {'ffn params':>10}")
    for i, layer in enumerate(model.layers):
        a, f = layer.attention, layer.ffn
        a_params = sum(p.numel() for p in a.parameters()) if a is not None else 0
        f_params = sum(p.numel() for p in f.parameters()) if f is not None else 0
        heads = ",".join(map(str, a.heads)) if a is not None else "(removed)"
        print(f"{i:>5}  {heads:<40} {a_params:>16,} {f.ffn_dim if f is not None else 0:>9} {f_params:>10,}")


def cmd_finetune(args: argparse.Namespace) -> None:
    from .finetune import check_seeds, format_result, run_finetune, run_seeds
    seeds = check_seeds(args.seeds) if args.seeds else [args.seed]
    cfg = train_config(args, seeds[0])
    if len(seeds) == 1:
        result = run_finetune(args.task, args.out, args.model, args.glue_dir, cfg, args.max_train, args.overwrite)
    else:
        result = run_seeds(args.task, args.out, seeds, args.model, args.glue_dir, cfg, args.max_train,
                           args.overwrite)
    if distributed.is_main():
        print(format_result(result))
        print(f"written: {args.out}")


def cmd_prune(args: argparse.Namespace) -> None:
    from .pruning.recipe import format_prune_result, run_prune
    module = METHODS[args.method][0]
    method_cfg, cfg, train_cfg = method_config(args), prune_config(args), train_config(args, args.seed)
    result = run_prune(args.task, args.out, args.method, module, method_cfg, cfg, args.model, args.glue_dir,
                       train_cfg, args.max_train, args.overwrite, plots=not args.no_plots, teacher_path=args.teacher)
    if distributed.is_main():
        print(format_prune_result(result))
        print(f"written: {args.out} (result.json, pruning.json, pruned/, plots)")


METRICS_KEYS = {"task", "model", "metrics"}  # what `evaluate --out` writes: the only file it may replace


def _check_metrics_out(out: Path, model: str | Path) -> None:
    """`evaluate --out`: a new file, or one an earlier `evaluate --out` wrote; never a folder, never a file of
    the model being evaluated, never someone else's file."""
    from .rundir import is_inside
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder; evaluate writes one JSON file (e.g. --out {out}/metrics.json)")
    if Path(model).exists() and is_inside(out, Path(model)):
        raise UsageError(f"--out {out} lies inside --model {model}: write the metrics outside the checkpoint")
    if out.exists():
        try:
            earlier = json.loads(out.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            earlier = None
        if not (isinstance(earlier, dict) and set(earlier) == METRICS_KEYS):
            raise UsageError(f"--out {out} exists and is not a metrics file written by evaluate; it is left as it "
                             "is (choose another --out)")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from .checkpoint import write_json
    from .finetune import load_task_data, load_trained_classifier
    from .glue import get_task
    from .tokenizer import load_tokenizer
    from .train import amp_dtype, evaluate, resolve_device
    if args.out is not None:
        _check_metrics_out(args.out, args.model)
    task = get_task(args.task)
    model = load_trained_classifier(args.model, task, allow_untrained=args.allow_untrained_head)
    tokenizer = load_tokenizer(args.model)
    data = load_task_data(task, tokenizer, args.glue_dir, max_train=1, max_length=args.max_length)
    device = resolve_device(args.device)
    model.to(device)
    metrics = {split: evaluate(model, d, task, tokenizer, 128, device, amp_dtype(device, args.amp))
               for split, d in data.dev.items()}
    print(json.dumps(metrics, indent=2))
    if args.out:
        write_json(args.out, {"task": task.name, "model": str(args.model), "metrics": metrics})


def _error() -> str:
    return f"rank {distributed.rank()}: error" if distributed.is_distributed() else "error"


COMMANDS = {"show": cmd_show, "finetune": cmd_finetune, "prune": cmd_prune, "evaluate": cmd_evaluate}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # a bad argument exits here with status 2 and a usage line
    from .rundir import RunFailed
    try:
        import datasets
        datasets.disable_progress_bars()  # the CLI shows one progress bar: training's
    except ImportError:
        pass
    joined = False  # whether this call joined torchrun's processes (and so leaves them at the end)
    try:
        if args.command in ("finetune", "prune"):
            joined = not distributed.is_distributed() and distributed.init(args.device)
            distributed.check_batch_size(args.batch_size)  # the global batch, split over the processes
        COMMANDS[args.command](args)
    except KeyboardInterrupt as e:
        print(f"interrupted: {e or 'nothing was written'}",
              file=sys.stderr)
        return 130
    except RunFailed as e:  # the run started writing: a failure, not a usage error
        if args.debug:
            raise
        print(f"{_error()}: {e}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as e:  # bad input, found before anything was written
        if args.debug:
            raise
        print(f"{_error()}: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - anything else: one line, the traceback with --debug
        if args.debug:
            raise
        print(f"{_error()}: {type(e).__name__}: {e} (run with --debug for the traceback)", file=sys.stderr)
        return 1
    finally:
        if joined:
            distributed.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
