"""The command line: `python -m minisnip {show,finetune,prune,evaluate} ...` (`--help` on each)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EPILOG = """examples:
  python -m minisnip show                                   # the default model's branches
  python -m minisnip finetune --task sst2 --glue-dir ../shared/data/glue --max-train 2000 --out runs/sst2
  python -m minisnip finetune --task rte --glue-dir DIR --seeds 1 2 3 --out runs/rte
  python -m minisnip prune --method snip --target 0.5 --task sst2 --glue-dir DIR --max-train 2000 --out runs/snip
  python -m minisnip evaluate --task sst2 --glue-dir DIR --model runs/sst2/best
The GLUE folder can also come from the MINISNIP_GLUE_DIR environment variable; without either,
data is fetched with the `datasets` library (needs internet)."""


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, help="GLUE task: cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli")
    p.add_argument("--glue-dir", type=Path, default=None,
                   help="folder with <TASK>/train.tsv, dev.tsv (default: $MINISNIP_GLUE_DIR, else the hub)")
    p.add_argument("--max-length", type=int, default=128, help="truncate sequences to this many tokens (128)")
    p.add_argument("--batch-size", type=int, default=32, help="training batch size (32)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (auto)")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"],
                   help="autocast on CUDA (auto: bf16 where supported, else fp16; off on CPU)")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="BERT folder or hub name (default: all-MiniLM-L6-v2, offline)")
    p.add_argument("--out", type=Path, required=True, help="run directory (result.json, checkpoints, plots)")
    p.add_argument("--epochs", type=int, default=3, help="training epochs (3)")
    p.add_argument("--lr", type=float, default=5e-5, help="peak learning rate (5e-5)")
    p.add_argument("--warmup", type=float, default=0.1, help="share of steps for linear warm-up (0.1)")
    p.add_argument("--max-train", type=int, default=None, help="train on a seeded random sample of N examples")
    p.add_argument("--seed", type=int, default=42, help="random seed (42)")
    p.add_argument("--overwrite", action="store_true", help="replace what --out already holds")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _train_config(args: argparse.Namespace, seed: int):
    from .train import TrainConfig
    return TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, max_length=args.max_length,
                       warmup_ratio=args.warmup, seed=seed, device=args.device, amp=args.amp,
                       progress=not args.no_progress)


def build_parser() -> argparse.ArgumentParser:
    from .snip.recipe import SnipConfig
    SNIP_DEFAULTS = SnipConfig()
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

    p = sub.add_parser("prune", help="fine-tune with the identity prior (+ SN), threshold, recover (SNIP)",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_data_args(p)
    _add_train_args(p)
    p.add_argument("--method", default="snip", choices=["snip", "snip-no-sn", "snip-no-prior", "dense"],
                   help="snip: prior + spectral norm; the others are its ablations (dense: no pruning)")
    p.add_argument("--target", type=float, default=None,
                   help="compression to reach, in (0, 1): share of encoder linear-layer weights removed (0.5)")
    p.add_argument("--threshold", type=float, default=None, help="instead of --target: remove branches with norm < τ")
    p.add_argument("--prior-lambda", type=float, default=SNIP_DEFAULTS.prior_lambda,
                   help="strength λ of the identity prior (%(default)s)")
    p.add_argument("--prior-warmup", type=float, default=SNIP_DEFAULTS.prior_warmup,
                   help="share of fine-tuning steps over which λ ramps up from 0 (%(default)s)")
    p.add_argument("--sn-bound", default="init", help="spectral-norm bound c: 'init' (σ at load time) or a number")
    p.add_argument("--group-size", type=int, default=None, help="FFN neurons per branch (default 2 x head_dim)")
    p.add_argument("--per-param", action="store_true", help="rank branches by norm per parameter")
    p.add_argument("--recovery-epochs", type=int, default=1, help="fine-tuning epochs after pruning (1)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")

    p = sub.add_parser("evaluate", help="evaluate a fine-tuned checkpoint on a GLUE dev set")
    _add_data_args(p)
    p.add_argument("--model", required=True, help="fine-tuned checkpoint folder (e.g. RUN/best)")
    p.add_argument("--out", type=Path, default=None, help="write the metrics as JSON to this file")
    return parser


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
    from .finetune import format_result, run_finetune, run_seeds
    seeds = args.seeds or [args.seed]
    cfg = _train_config(args, seeds[0])
    if len(seeds) == 1:
        result = run_finetune(args.task, args.out, args.model, args.glue_dir, cfg, args.max_train, args.overwrite)
    else:
        result = run_seeds(args.task, args.out, seeds, args.model, args.glue_dir, cfg, args.max_train,
                           args.overwrite)
    print(format_result(result))
    print(f"written: {args.out}")


def cmd_prune(args: argparse.Namespace) -> None:
    from .snip.recipe import SnipConfig, format_prune_result, run_prune
    target = args.target if args.target is not None or args.threshold is not None else 0.5
    bound = args.sn_bound if args.sn_bound == "init" else float(args.sn_bound)
    cfg = SnipConfig(method=args.method, target=target if args.method != "dense" else None,
                     threshold=args.threshold, prior_lambda=args.prior_lambda,
                     prior_warmup=args.prior_warmup, sn_bound=bound,
                     neuron_group_size=args.group_size, per_param=args.per_param,
                     recovery_epochs=args.recovery_epochs)
    result = run_prune(args.task, args.out, cfg, args.model, args.glue_dir, _train_config(args, args.seed),
                       args.max_train, args.overwrite, plots=not args.no_plots)
    print(format_prune_result(result))
    print(f"written: {args.out} (result.json, pruning.json, pruned/, plots)")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from .checkpoint import write_json
    from .finetune import load_classifier, load_task_data
    from .glue import get_task
    from .tokenizer import load_tokenizer
    from .train import amp_dtype, evaluate, resolve_device
    task = get_task(args.task)
    tokenizer = load_tokenizer(args.model)
    data = load_task_data(task, tokenizer, args.glue_dir, max_train=1, max_length=args.max_length)
    model = load_classifier(args.model, task)
    device = resolve_device(args.device)
    model.to(device)
    metrics = {split: evaluate(model, d, task, tokenizer, 128, device, amp_dtype(device, args.amp))
               for split, d in data.dev.items()}
    print(json.dumps(metrics, indent=2))
    if args.out:
        write_json(args.out, {"task": task.name, "model": str(args.model), "metrics": metrics})


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import datasets
        datasets.disable_progress_bars()  # the CLI shows one progress bar: training's
    except ImportError:
        pass
    try:
        {"show": cmd_show, "finetune": cmd_finetune, "prune": cmd_prune, "evaluate": cmd_evaluate}[args.command](args)
    except KeyboardInterrupt:
        print("interrupted: checkpoints written so far are complete and loadable", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
