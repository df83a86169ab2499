"""Measurements behind the study's reading of SNIP's parts (docs/snip.md), at the study's setting.

* `--probe sn-binding`: does spectral normalization with the default bound (c = σ(W) at load time) act during
  SNIP's fine-tuning? After every optimiser step, the scale min(1, c / σ̂) of every normalised matrix (Q, K, V,
  O, W_1, W_2 of each layer, σ̂ from the stored power-iteration vectors): its minimum over matrices and steps,
  and how many matrices are capped (scale < 1) at each step.
* `--probe block-bias`: removing every head of a layer removes its attention block with its output bias b_O
  (the layer then computes LN(x), `minisnip.surgery`). On a plain fine-tune: the dev score with each layer's
  attention block removed against the same heads zeroed with b_O kept, and the same for the 50% selection of
  thresholding the function norms (snip-no-prior), removed against zeroed with every bias kept.

* `--probe prox-zeros`: the proximal prior (`snip-prox`, λ = prox_lambda): after every epoch, the dev score and
  how many head and neuron-group output blocks are exactly zero, and which epoch the recipe keeps.

* `--probe grad-balance`: along SNIP's fine-tuning (λ from `--prior-lambda`; 0 for plain fine-tuning), every
  `--every` steps: the task loss, the norm of its gradient on the encoder's weights, the norm of the prior
  R = Σ_m w_m ||f_m||'s gradient times the current λ_t, and R itself; and each epoch's dev score. Where the
  task's gradient stays small (a loss on its plateau) the prior's can shrink the branches before the task is
  learnt (docs/snip.md, CoLA).

* `--probe gate`: SNIP's fine-tuning with the loss gate `--gate` ("baseline" by default): at every step the task
  loss L_t, its running mean L̄_t, the constant predictor's loss B_t, the gate g_t and λ_t g_t; beside them, for
  the same losses, the mean a gate would see if each step's loss were clamped at B_t (L̄'_t, g'_t; computed only,
  the training uses g_t): a loss above the constant predictor's says "nothing learnt" whatever its size, so
  clamping it keeps a random head's first losses (large for regression) from holding the gate shut. The first
  step at which each gate passes 0.5, and the dev score per epoch.

    python bench/snip_probes.py --probe sn-binding --glue-dir ../shared/data/glue --task sst2
    python bench/snip_probes.py --probe block-bias --glue-dir ../shared/data/glue --task sst2
    python bench/snip_probes.py --probe prox-zeros --glue-dir ../shared/data/glue --task sst2
    python bench/snip_probes.py --probe grad-balance --glue-dir ../shared/data/glue --task cola --prior-lambda 0
    python bench/snip_probes.py --probe gate --glue-dir ../shared/data/glue --task stsb
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402
from torch.nn.utils import parametrize  # noqa: E402

import minisnip  # noqa: E402
from bench.machine import code_version, loadavg, machine_info, result_paths, table_text, write_result  # noqa: E402
from minisnip.finetune import load_task_data, new_classifier  # noqa: E402
from minisnip.pruning.branches import default_group_size, list_branches, parse_name  # noqa: E402
from minisnip.pruning.recipe import PruneConfig, calibration_batches, dev_scores, finetune_with  # noqa: E402
from minisnip.pruning.removal import apply_pruning  # noqa: E402
from minisnip.pruning.select import select_for_target  # noqa: E402
from minisnip.snip import method as snip_method  # noqa: E402
from minisnip.snip.norms import function_norms  # noqa: E402
from minisnip.snip.prior import PriorPenalty, identity_prior, output_weight_groups  # noqa: E402
from minisnip.snip.spectral import SpectralNorm  # noqa: E402
from minisnip.surgery import encoder_of  # noqa: E402
from minisnip.train import StepContext, TrainConfig, TrainHook, fit  # noqa: E402


class CapWatch(TrainHook):
    """After each step: min over the normalised matrices of min(1, c / σ̂), and how many have it below 1."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, float, int]] = []
        self.matrices = 0

    @torch.no_grad()
    def after_step(self, ctx: StepContext) -> None:
        scales = []
        for module in ctx.model.modules():
            if not parametrize.is_parametrized(module, "weight"):
                continue
            for p in module.parametrizations.weight:
                if isinstance(p, SpectralNorm):  # the scale SN's forward applies: min(1, c / σ̂), σ̂ floored
                    sigma = p.sigma(module.parametrizations.weight.original)
                    scales.append((p.bound / sigma.clamp_min(p.eps)).clamp(max=1.0))
        s = torch.cat(scales)
        self.matrices = len(s)
        self.steps.append((ctx.step, float(s.min()), int((s < 1).sum())))


def sn_binding(args, tokenizer, data, train_cfg) -> tuple[dict, list[str]]:
    model = new_classifier(args.model_path, data.task, args.seed)
    watch = CapWatch()
    history, _ = finetune_with(model, tokenizer, data, snip_method, snip_method.Config(), PruneConfig(target=0.5),
                               train_cfg, extra_hooks=[watch])
    capped = [n for _, _, n in watch.steps]
    result = {"min_scale": min(s for _, s, _ in watch.steps), "steps": len(watch.steps),
              "steps_with_a_capped_matrix": sum(1 for n in capped if n), "max_capped_matrices": max(capped),
              "capped_matrices_at_end": capped[-1], "matrices": watch.matrices, "per_step": watch.steps,
              "dev_per_epoch": [e["dev"] for e in history.epochs], "best_epoch": history.best_epoch}
    lines = [f"| min over steps and matrices of min(1, c/σ̂) | {result['min_scale']:.4f} |",
             f"| steps with at least one capped matrix | {result['steps_with_a_capped_matrix']} of {result['steps']} |",
             f"| most matrices capped at one step | {result['max_capped_matrices']} of {result['matrices']} |",
             f"| capped at the last step | {result['capped_matrices_at_end']} |"]
    return result, ["| SN (bound init) during SNIP's fine-tuning | |", "|---|---:|", *lines]


def _zeroed(model, names: list[str], group: int):
    """A copy with the output weights of the named branches zeroed and every bias kept."""
    m = copy.deepcopy(model)
    enc = encoder_of(m)
    with torch.no_grad():
        for name in names:
            layer, kind, index = parse_name(name)
            block = enc.layers[layer]
            if kind == "head":
                d = block.attention.head_dim
                block.attention.out.weight[:, index * d:(index + 1) * d] = 0
            elif kind == "attention":
                block.attention.out.weight.zero_()
            elif kind == "neurons":
                block.ffn.down.weight[:, index * group:(index + 1) * group] = 0
            else:
                block.ffn.down.weight.zero_()
    return m


def _removed(model, names: list[str], group: int):
    m = copy.deepcopy(model)
    apply_pruning(m, names, neuron_group_size=group)
    return m


def block_bias(args, tokenizer, data, train_cfg) -> tuple[dict, list[str]]:
    model = new_classifier(args.model_path, data.task, args.seed)
    fit(model, tokenizer, data.task, data.train, data.dev, train_cfg)
    split, metric = next(iter(data.dev)), data.task.main_metric
    score = lambda m: dev_scores(m, tokenizer, data, train_cfg=train_cfg)[split][metric]  # noqa: E731
    group = default_group_size(model)
    result: dict = {"dense": score(model), "layers": []}
    for i, layer in enumerate(encoder_of(model).layers):
        name = f"layer{i}.attention"
        result["layers"].append({"layer": i, "b_O_norm": float(layer.attention.out.bias.detach().norm()),
                                 "removed": score(_removed(model, [name], group)),
                                 "zeroed_bias_kept": score(_zeroed(model, [name], group))})
    calib = calibration_batches(data.train, tokenizer, PruneConfig().calibration_examples, train_cfg.eval_batch_size,
                                args.seed)
    norms = function_norms(model, calib, kinds=("head", "neurons"), neuron_group_size=group)
    names = select_for_target(list_branches(model, kinds=("head", "neurons"), neuron_group_size=group), norms, 0.5,
                              model=model)
    result.update(selection_50=names, removed_50=score(_removed(model, names, group)),
                  zeroed_bias_kept_50=score(_zeroed(model, names, group)))
    lines = [f"Dense {100 * result['dense']:.2f}.", "",
             "| removed | ‖b_O‖ | block removed (b_O goes) | heads zeroed, b_O kept |", "|---|---:|---:|---:|"]
    lines += [f"| layer{r['layer']}.attention | {r['b_O_norm']:.2f} | {100 * r['removed']:.2f} | "
              f"{100 * r['zeroed_bias_kept']:.2f} |" for r in result["layers"]]
    lines.append(f"| 50% by function norm (snip-no-prior's selection) | | {100 * result['removed_50']:.2f} | "
                 f"{100 * result['zeroed_bias_kept_50']:.2f} |")
    return result, lines


class ZeroCount(TrainHook):
    """At the end of every epoch: how many output-weight groups (heads' W_O blocks, neuron groups' W_2 columns) are
    exactly zero, and how many there are (an `epoch_log`, so it lands in the history's epoch records)."""

    def __init__(self, model, group: int) -> None:
        self.model, self.group = model, group

    @torch.no_grad()
    def epoch_log(self) -> dict:
        groups = output_weight_groups(self.model, ("head", "neurons"), self.group)
        zero = sum(int((g.pow(2).sum(dim=(0, 2)) == 0).sum()) for g in groups)
        return {"exact_zero_groups": zero, "groups": sum(g.shape[1] for g in groups)}


def prox_zeros(args, tokenizer, data, train_cfg) -> tuple[dict, list[str]]:
    model = new_classifier(args.model_path, data.task, args.seed)
    group = default_group_size(model)
    cfg = snip_method.Config(prior_step="proximal", prox_lambda=args.prox_lambda)
    history, _ = finetune_with(model, tokenizer, data, snip_method, cfg, PruneConfig(target=0.5), train_cfg,
                               extra_hooks=[ZeroCount(model, group)])
    split, metric = next(iter(data.dev)), data.task.main_metric
    epochs = [{"epoch": e["epoch"], "dev": e["dev"][split][metric], "exact_zero_groups": e["exact_zero_groups"],
               "groups": e["groups"]} for e in history.epochs]
    result = {"prox_lambda": args.prox_lambda, "epochs": epochs, "kept_epoch": history.best_epoch}
    lines = [f"Proximal prior, λ = {args.prox_lambda:g}; the recipe keeps epoch {history.best_epoch}.", "",
             "| epoch | dev | output-weight groups exactly zero |", "|---:|---:|---:|"]
    lines += [f"| {e['epoch']} | {100 * e['dev']:.2f} | {e['exact_zero_groups']} of {e['groups']} |" for e in epochs]
    return result, lines


class GradBalance(TrainHook):
    """Every `every` steps (and at step 1): the task loss, ||∇_θ L_task|| and ||∇_θ λ_t R|| over the encoder's
    layers θ, and R. Measures only: its `loss` returns None, and torch.autograd.grad leaves .grad alone."""

    needs_traces = packed_traces = cls_traces = True  # the traces the prior reads, as PriorPenalty's

    def __init__(self, prior: PriorPenalty | None, kinds, group: int | None, every: int) -> None:
        self.prior, self.kinds, self.group, self.every = prior, kinds, group, every
        self.rows: list[dict] = []

    def loss(self, ctx: StepContext):
        if ctx.step % self.every and ctx.step != 1:
            return None
        theta = [p for n, p in ctx.model.named_parameters() if ".layers." in f".{n}" and p.requires_grad]
        r = identity_prior(ctx.model, ctx.traces, ctx.mask, self.kinds, "params", self.group)
        g_task = torch.autograd.grad(ctx.loss, theta, retain_graph=True, allow_unused=True)
        g_r = torch.autograd.grad(r, theta, retain_graph=True, allow_unused=True)
        norm = lambda gs: float(torch.stack([g.float().pow(2).sum() for g in gs if g is not None]).sum().sqrt())  # noqa: E731
        lam = self.prior.strength() if self.prior is not None else 0.0  # this step's λ_t: asked before the prior
        #                                                                   hook's term advances its step
        self.rows.append({"step": ctx.step, "loss": float(ctx.loss.detach()), "grad_task": norm(g_task),
                          "grad_prior": lam * norm(g_r), "lambda_t": lam, "R": float(r.detach())})
        return None


def grad_balance(args, tokenizer, data, train_cfg) -> tuple[dict, list[str]]:
    model = new_classifier(args.model_path, data.task, args.seed)
    # λ = 0: plain fine-tuning (no SN either), the prior only measured
    cfg = snip_method.Config(prior_lambda=args.prior_lambda, spectral_norm=args.prior_lambda > 0)
    probe: list[GradBalance] = []

    class WithProbe:  # SNIP's module, with the probe's hook before its prior's
        STRUCTURED, SCHEDULED, USES_DISTILLATION = True, False, False
        before_removal = staticmethod(snip_method.before_removal)

        @staticmethod
        def training_hooks(model, c, target, total_steps, kinds, group):
            hooks = snip_method.training_hooks(model, c, target, total_steps, kinds, group)
            prior = next((h for h in hooks if isinstance(h, PriorPenalty)), None)
            probe.append(GradBalance(prior, kinds, group, args.every))
            return [probe[0], *hooks]

    history, _ = finetune_with(model, tokenizer, data, WithProbe, cfg, PruneConfig(target=0.5), train_cfg)
    split, metric = next(iter(data.dev)), data.task.main_metric
    rows = probe[0].rows
    epochs = [{"epoch": e["epoch"], "dev": e["dev"][split][metric]} for e in history.epochs]
    result = {"prior_lambda": args.prior_lambda, "every": args.every, "steps": rows, "epochs": epochs}
    run = (f"SNIP's fine-tuning at λ = {args.prior_lambda:g} (warm-up over half of the steps)" if args.prior_lambda
           else "Plain fine-tuning (λ = 0, no SN; the prior only measured)")
    lines = [f"{run}: gradient norms on the encoder's layers every {args.every} steps; dev {metric} per epoch: "
             + ", ".join(f"{100 * e['dev']:.1f}" for e in epochs) + ".", "",
             "| step | task loss | ‖∇ L_task‖ | ‖∇ λ_t R‖ | ratio | R |", "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio = f"{r['grad_task'] / r['grad_prior']:.1f}" if r["grad_prior"] > 0 else "–"
        lines.append(f"| {r['step']} | {r['loss']:.3f} | {r['grad_task']:.3f} | {r['grad_prior']:.4f} | {ratio} "
                     f"| {r['R']:.1f} |")
    return result, lines


class GateWatch(TrainHook):
    """After every step: the gate's state (PriorPenalty's L̄_t, B_t, g_t, λ_t) and the clamped mean L̄'_t beside it."""

    def __init__(self, prior: PriorPenalty) -> None:
        self.prior, self.clamped, self.lam = prior, None, 0.0
        self.rows: list[dict] = []

    def before_forward(self, ctx: StepContext) -> None:
        self.lam = self.prior.strength()  # the λ_t this step's prior will use (its term advances the step)

    def after_step(self, ctx: StepContext) -> None:
        p, lam = self.prior, self.lam
        loss = float(ctx.loss.detach())
        base = float(p.baseline_loss()) if p.label_stats is not None else float("nan")
        c = min(loss, base) if base == base else loss
        self.clamped = c if self.clamped is None else p.GATE_DECAY * self.clamped + (1 - p.GATE_DECAY) * c
        gate = float(p._gate()) if p.mean_loss is not None else 1.0
        clamped_gate = float(p.baseline_gate(torch.tensor(self.clamped), torch.tensor(base))) if base > 0 else 0.0
        self.rows.append({"step": ctx.step, "loss": loss, "mean_loss": float(p.mean_loss) if p.mean_loss is not None
                          else loss, "baseline_loss": base, "gate": gate, "lambda_t": lam, "lambda_gated": lam * gate,
                          "clamped_mean_loss": self.clamped, "clamped_gate": clamped_gate})


def gate(args, tokenizer, data, train_cfg) -> tuple[dict, list[str]]:
    model = new_classifier(args.model_path, data.task, args.seed)
    cfg = snip_method.Config(prior_gate=args.gate)
    watch: list[GateWatch] = []

    class WithWatch:  # SNIP's module, with the watch after its prior
        STRUCTURED, SCHEDULED, USES_DISTILLATION = True, False, False
        before_removal = staticmethod(snip_method.before_removal)

        @staticmethod
        def training_hooks(model, c, target, total_steps, kinds, group):
            hooks = snip_method.training_hooks(model, c, target, total_steps, kinds, group)
            watch.append(GateWatch(next(h for h in hooks if isinstance(h, PriorPenalty))))
            return [*hooks, watch[0]]

    history, _ = finetune_with(model, tokenizer, data, WithWatch, cfg, PruneConfig(target=0.5), train_cfg)
    split, metric = next(iter(data.dev)), data.task.main_metric
    rows = watch[0].rows
    epochs = [{"epoch": e["epoch"], "dev": e["dev"][split][metric]} for e in history.epochs]

    def first_open(key: str) -> int | None:
        return next((r["step"] for r in rows if r[key] >= 0.5), None)

    opens = {"gate": first_open("gate"), "clamped_gate": first_open("clamped_gate")}
    result = {"gate": args.gate, "steps": rows, "epochs": epochs, "first_step_above_half": opens}
    lines = [f"SNIP's fine-tuning with prior_gate={args.gate!r} ({len(rows)} steps); dev {metric} per epoch: "
             + ", ".join(f"{100 * e['dev']:.1f}" for e in epochs) + f". The gate first passes 0.5 at step "
             f"{opens['gate']}; the clamped one would at step {opens['clamped_gate']}.", "",
             "| step | task loss | L̄_t | B_t | g_t | λ_t g_t | L̄'_t (clamped) | g'_t |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["step"] % args.every and r["step"] != 1:
            continue
        lines.append(f"| {r['step']} | {r['loss']:.3f} | {r['mean_loss']:.3f} | {r['baseline_loss']:.3f} "
                     f"| {r['gate']:.2f} | {r['lambda_gated']:.2e} | {r['clamped_mean_loss']:.3f} "
                     f"| {r['clamped_gate']:.2f} |")
    return result, lines


PROBES = {"gate": gate, "sn-binding": sn_binding, "block-bias": block_bias, "prox-zeros": prox_zeros, "grad-balance": grad_balance}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--probe", choices=sorted(PROBES), required=True)
    p.add_argument("--glue-dir", required=True)
    p.add_argument("--task", default="sst2")
    p.add_argument("--model", default=None, help="a BERT folder (default: minisnip's default model)")
    p.add_argument("--max-train", type=int, default=4000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--prox-lambda", type=float, default=snip_method.Config().prox_lambda, help="prox-zeros: λ")
    p.add_argument("--prior-lambda", type=float, default=snip_method.Config().prior_lambda,
                   help="grad-balance: SNIP's λ (0: plain fine-tuning, no SN, the prior only measured)")
    p.add_argument("--every", type=int, default=25, help="grad-balance: measure every this many steps; gate: "
                   "print every this many steps (all are in the JSON)")
    p.add_argument("--gate", choices=("loss", "baseline"), default="baseline", help="gate: SNIP's prior_gate")
    p.add_argument("--out", default=str(HERE / "results"), help="a folder, or the .json file to write")
    args = p.parse_args(argv)
    if args.max_train < 1 or args.epochs < 1 or args.every < 1:
        p.error(f"--max-train, --epochs and --every must be ≥ 1, got {args.max_train}, {args.epochs}, {args.every}")
    if not (args.prior_lambda >= 0 and args.prior_lambda < float("inf")):
        p.error(f"--prior-lambda must be a finite number ≥ 0, got {args.prior_lambda}")
    torch.set_num_threads(args.threads)
    args.model_path = Path(args.model) if args.model else minisnip.default_model_path()
    tokenizer = minisnip.load_tokenizer(args.model_path)
    data = load_task_data(args.task, tokenizer, args.glue_dir, args.max_train, seed=0, max_length=args.max_length)
    train_cfg = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, max_length=args.max_length,
                            seed=args.seed, progress=False)
    machine, t0 = machine_info("cpu"), time.perf_counter()
    result, lines = PROBES[args.probe](args, tokenizer, data, train_cfg)
    model = args.model or "the default model (all-MiniLM-L6-v2)"
    setting = (f"{args.probe}: {model}, {args.task}, {args.max_train} train examples, {args.epochs} epochs, "
               f"lr {args.lr:g}, batch {args.batch_size}, max length {args.max_length}, seed {args.seed}.")
    machine["loadavg_1m_end"] = loadavg()
    result.update(probe=args.probe, task=args.task, setting=setting, code=code_version(), machine=machine,
                  wall_seconds=time.perf_counter() - t0)
    stem = f"snip_probe_{args.probe.replace('-', '_')}_{args.task}"
    if args.probe == "grad-balance":
        stem += f"_lambda{args.prior_lambda:g}"
    if args.probe == "gate":
        stem += f"_{args.gate}"
    write_result(result, *result_paths(args.out, stem), table_text([setting, "", *lines], machine))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
