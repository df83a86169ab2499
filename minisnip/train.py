"""The fine-tuning loop: one place for optimiser, schedule, autocast, evaluation and best-checkpoint keeping.

`fit` trains a `BertForSequenceClassification` on tokenized data (`minisnip.data.Encoded`) the way BERT is
fine-tuned (Devlin et al. 2019): AdamW (no weight decay on biases and LayerNorms), linear warm-up then
linear decay of the learning rate, gradient-norm clipping, dropout as configured.

Pruning methods (and observers) plug in through `hooks`: a list of `TrainHook` objects. Each step, fit calls

    before_forward(ctx)   e.g. sample L0 gates, set masks from scores
    loss(ctx)             an extra term added to the task loss (SNIP's identity prior, distillation, L0 penalty)
    after_backward(ctx)   gradients are there (unscaled, not yet clipped): e.g. movement scores, head importance
    after_step(ctx)       after the optimiser step: e.g. a sparsity schedule, a proximal step, a running estimate

with a `StepContext` holding the step, the model, the batch, the logits, the task loss and (when any hook
sets `needs_traces`) one `LayerTrace` per layer, on the packed layout (real tokens only) when every such hook
sets `packed_traces`, with the last layer's FFN output at [CLS] only when every such hook sets `cls_traces`.
`param_groups()` adds parameters of a hook's own (scores,
gate logits) to the optimiser with their own learning rate. Nothing else of the loop changes.

A parametrized weight (spectral normalization, `minisnip.snip.spectral`) is computed once per step
(`torch.nn.utils.parametrize.cached` around the forward and the loss terms): the model's forward and a
hook's loss term that reads the weight again (the identity prior's Gram matrices) see the same tensor, and
SN runs one power iteration per step however often the step reads the weight.

On a CPU a run repeats exactly for a seed: all randomness (data order, dropout, new heads) comes from it.
On CUDA, bf16 autocast (fp16 with a gradient scaler where bf16 is missing) is on by default.

Under torchrun (`minisnip.distributed`), fit trains the model wrapped in DistributedDataParallel: each rank
runs its part of every global batch (`StepContext.share` scales its loss so that DDP's gradient average is
the global batch's mean), the step's numbers are averaged over the ranks, evaluation runs on rank 0 and
only rank 0 writes. Hooks still see the plain model. On one process none of this happens.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence, TypeVar

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from . import distributed
from .checkpoint import save_pretrained
from .data import Encoded, iterate, length_bucketed_batches, sorted_batches
from .glue import GlueTask
from .metrics import compute_metrics
from .model import BertForSequenceClassification, HostChecks, LayerTrace
from .tokenizer import Tokenizer


@dataclass
class StepContext:
    """What a `TrainHook` sees at one training step (fields filled in as the step proceeds)."""

    step: int  # 1-based number of this optimiser step
    total_steps: int
    epoch: int
    model: nn.Module
    batch: dict[str, Tensor]  # input_ids, attention_mask, token_type_ids, labels, on the device
    logits: Tensor | None = None
    loss: Tensor | None = None  # the task loss of this batch
    traces: list[LayerTrace] | None = None  # one per layer when a hook needs them (packed: see TrainHook)
    checked: HostChecks | None = None  # the batch's input checks and packing, done on the host (a forward of the
    #                                    same batch, e.g. a teacher's with the same tokenizer, may pass it on)
    lr: float = 0.0  # the learning rate of this step (the model's parameter groups)
    # distributed: N x this rank's part of the global batch (`distributed.my_part`); a loss term that is a mean
    # over this batch's examples is multiplied by it. 1 on one process; 0 for a rank with no example this step
    share: float = 1.0

    @property
    def mask(self) -> Tensor:
        """The tokens that count: the attention mask (all zero on a rank whose batch has share 0)."""
        m = self.batch["attention_mask"]
        return m if self.share else torch.zeros_like(m)


class TrainHook:
    """A pruning method's (or an observer's) part in fine-tuning; every method does nothing unless overridden."""

    needs_traces: bool = False  # ask the forward pass to record one LayerTrace per layer
    # the hook reads packed traces too (`LayerTrace.packing`: real tokens only). When every hook that needs traces
    # does, fit records them packed, and the forward skips the padding as it does without a trace
    packed_traces: bool = False
    # the hook reads the last layer's FFN output and output (`ffn_out`, `y`) at [CLS] only, or through
    # `LayerTrace.ffn_output`. When every hook that needs traces does, the classifier's last layer computes those
    # two for [CLS] alone (`LayerTrace.cls_rows`), as it does without a trace; the other fields cover every token
    cls_traces: bool = False

    def param_groups(self) -> list[dict]:
        """Extra optimiser groups ({"params": [...], "lr": ..., "weight_decay": ...}) of the hook's own."""
        return []

    def before_forward(self, ctx: StepContext) -> None:
        pass

    def loss(self, ctx: StepContext) -> Tensor | None:
        """An extra term added to the task loss (None: nothing)."""
        return None

    def after_backward(self, ctx: StepContext) -> None:
        pass

    def after_step(self, ctx: StepContext) -> None:
        pass

    def epoch_log(self) -> dict:
        """Numbers for this epoch's record in the history (e.g. current sparsity), JSON-serialisable."""
        return {}


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the step. The last good checkpoint stays on disk."""


@dataclass
class TrainConfig:
    """Hyper-parameters of one fine-tuning run (defaults: BERT's GLUE recipe at batch 32, length 128)."""

    epochs: int = 3
    lr: float = 5e-5
    batch_size: int = 32
    eval_batch_size: int = 128
    max_length: int = 128
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    seed: int = 42
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    amp: str = "auto"  # "auto" (bf16/fp16 on CUDA, off on CPU), "bf16", "fp16", "off"
    progress: bool = True
    # steps between reads of the loss on the host (progress bar, NaN check); the steps between read nothing back,
    # so a GPU runs ahead of Python. None: 1 on a CPU (a read costs nothing there), 50 on a GPU
    log_every: int | None = None

    def steps_per_epoch(self, n_train: int) -> int:
        """Optimiser steps in one epoch over `n_train` examples (the last batch may be smaller)."""
        return math.ceil(n_train / self.batch_size)

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.amp not in ("auto", "bf16", "fp16", "off"):
            raise ValueError(f"amp must be auto, bf16, fp16 or off, got {self.amp!r}")
        if self.log_every is not None and (isinstance(self.log_every, bool) or not isinstance(self.log_every, int)
                                           or self.log_every < 1):
            raise ValueError(f"log_every must be a whole number of steps >= 1 (or None), got {self.log_every!r}")

    def log_interval(self, device: torch.device) -> int:
        """`log_every`, or its default for `device`."""
        return self.log_every if self.log_every is not None else (1 if device.type == "cpu" else 50)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def amp_dtype(device: torch.device, amp: str) -> torch.dtype | None:
    """The autocast dtype: None on CPU unless asked; bf16 on CUDA where supported, else fp16."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "fp16" or (amp == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def to_device(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """The batch on `device`. To a GPU from pinned (page-locked) host memory without blocking, so the copy
    overlaps the work already queued; on the CPU the tensors come back as they are."""
    if device.type != "cuda":
        return {k: v.to(device) for k, v in batch.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


def make_optimizer(model: nn.Module, cfg: TrainConfig, total_steps: int, extra_groups: Sequence[dict] = ()):
    """AdamW without decay on biases and LayerNorm weights; LR: linear warm-up, then linear decay to 0.

    extra_groups: parameter groups of the training hooks (their own lr, weight decay 0 unless given); they
    follow the same schedule."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.dim() < 2 else decay).append(p)
    extra = [{"weight_decay": 0.0, **g} for g in extra_groups]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}, *extra], lr=cfg.lr)
    warmup = int(cfg.warmup_ratio * total_steps)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule)


H = TypeVar("H", bound=TrainHook)


def the_hook(hooks: Sequence[TrainHook], cls: type[H]) -> H:
    """The one hook of type `cls` among `hooks` (a method finds its own hook again after fine-tuning)."""
    found = [h for h in hooks if isinstance(h, cls)]
    if len(found) != 1:
        raise ValueError(f"expected exactly one {cls.__name__} among the training hooks, got {len(found)}")
    return found[0]


@dataclass
class Optimisation:
    """What one training run steps with: where, in which autocast dtype, and the optimiser state."""

    device: torch.device
    dtype: torch.dtype | None
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    steps_per_epoch: int
    hook_params: list[Tensor] = field(default_factory=list)  # the hooks' own parameters (not the model's)


def start_training(model: nn.Module, cfg: TrainConfig, n_train: int, hooks: Sequence[TrainHook] = ()) -> Optimisation:
    """Seed, move the model to its device, and build optimiser, schedule and (fp16 only) gradient scaler."""
    distributed.check_batch_size(cfg.batch_size)
    set_seed(cfg.seed + distributed.rank())  # distributed: each rank its own dropout masks (rank 0: the seed)
    device = resolve_device(cfg.device)
    dtype = amp_dtype(device, cfg.amp)
    model.to(device)
    steps_per_epoch = cfg.steps_per_epoch(n_train)
    groups = [g for h in hooks for g in h.param_groups()]
    opt, sched = make_optimizer(model, cfg, steps_per_epoch * cfg.epochs, groups)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    own = {id(p) for p in model.parameters()}
    hook_params = [p for g in groups for p in g["params"] if id(p) not in own]
    return Optimisation(device, dtype, opt, sched, scaler, steps_per_epoch, hook_params)


def optimizer_step(model: nn.Module, total: Tensor, o: Optimisation, max_grad_norm: float,
                   after_backward: Callable[[], None] | None = None) -> None:
    """Backward, (after_backward: gradients unscaled, not yet clipped), clip the gradient norm, one AdamW step,
    one schedule step. Distributed: DDP averages the model's gradients over the ranks in the backward pass, and
    the hooks' own parameters are averaged here, so every rank steps with the same gradients."""
    o.opt.zero_grad(set_to_none=True)
    o.scaler.scale(total).backward()
    distributed.average_gradients(o.hook_params)
    o.scaler.unscale_(o.opt)
    if after_backward is not None:
        after_backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    o.scaler.step(o.opt)
    o.scaler.update()
    o.sched.step()


@torch.no_grad()
def predict(model: nn.Module, data: Encoded, tokenizer: Tokenizer, batch_size: int = 128,
            device: torch.device | None = None, dtype: torch.dtype | None = None) -> Tensor:
    """Logits (N, num_labels) in the data's original order, float32 on the CPU."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = torch.empty(len(data), model.config.num_labels)
    for index, batch in iterate(data, sorted_batches(data.lengths, batch_size), tokenizer):
        with autocast(device, dtype):
            logits = model(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                           batch["token_type_ids"].to(device))
        out[index] = logits.float().cpu()
    model.train(was_training)
    return out


def evaluate(model: nn.Module, data: Encoded, task: GlueTask, tokenizer: Tokenizer, batch_size: int = 128,
             device: torch.device | None = None, dtype: torch.dtype | None = None) -> dict[str, float]:
    """The task's GLUE metrics on `data` (plus the mean loss). Distributed: rank 0 evaluates and every rank gets its
    numbers (so all take the same decisions from them); every rank must call it."""
    def metrics() -> dict[str, float]:
        logits = predict(model, data, tokenizer, batch_size, device, dtype)
        out = compute_metrics(task, logits.numpy(), data.labels.numpy())
        out["loss"] = float(model.loss(logits, data.labels))
        return out
    return distributed.from_rank0(metrics)


@dataclass
class History:
    """What `fit` measured: per-epoch records, the best epoch, and throughput."""

    epochs: list[dict] = field(default_factory=list)
    best_epoch: int | None = None
    best_metrics: dict | None = None
    steps: int = 0
    train_seconds: float = 0.0
    train_cpu_seconds: float = 0.0  # process CPU time of the training epochs (evaluation excluded)
    train_examples: int = 0
    train_tokens: int = 0
    restored_best: bool = False  # fit loaded the best epoch's weights back (restore_best); else the last epoch's stay

    @property
    def kept_epoch(self) -> int | None:
        """The epoch whose weights the model holds after fit: the best one where fit restored it, else the last."""
        return self.best_epoch if self.restored_best or not self.epochs else self.epochs[-1]["epoch"]

    @property
    def kept_metrics(self) -> dict | None:
        """The dev scores of the model as fit left it (`kept_epoch`'s), not those of a better epoch it did not keep."""
        return self.best_metrics if self.restored_best or not self.epochs else self.epochs[-1]["dev"]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["examples_per_second"] = self.train_examples / self.train_seconds if self.train_seconds else None
        d["tokens_per_second"] = self.train_tokens / self.train_seconds if self.train_seconds else None
        return d


def fit(model: BertForSequenceClassification, tokenizer: Tokenizer, task: GlueTask, train: Encoded,
        dev: dict[str, Encoded], cfg: TrainConfig, out_dir: Path | None = None,
        hooks: Sequence[TrainHook] = (), restore_best: bool = True) -> History:
    """Fine-tune `model` on `train`, evaluating on every `dev` split after each epoch.

    The first dev split's main metric picks the best epoch; its weights are kept (in memory, and in
    `out_dir/best` as a minisnip checkpoint with the tokenizer when `out_dir` is given) and restored at the
    end when `restore_best`. A NaN/inf loss raises TrainingDiverged naming the step, at the next read of the
    loss (at most `cfg.log_every` steps later; on a CPU at once). `hooks` take part in every step as the module
    docstring says; `after_step` runs under no_grad. Under torchrun see the module docstring: the model trains
    wrapped in DDP (a new wrapper per call), hooks see `model` itself.
    """
    hooks = list(hooks)
    o = start_training(model, cfg, len(train), hooks)
    net = distributed.wrap(model)  # what the forward pass runs: DDP around the model, or the model itself
    device, dtype, sched = o.device, o.dtype, o.sched
    history, best_state = History(), None
    main_split = next(iter(dev))
    total_steps = o.steps_per_epoch * cfg.epochs
    want_traces = any(h.needs_traces for h in hooks)
    pack_trace = want_traces and all(h.packed_traces for h in hooks if h.needs_traces)
    cls_trace = want_traces and all(h.cls_traces for h in hooks if h.needs_traces)
    progress = _progress(cfg.progress and distributed.is_main(), total_steps, f"{task.display} fine-tune")
    saved = has_terms = False
    lengths = train.lengths
    log_every = cfg.log_interval(device)
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        t0, c0, n_batches, epoch_start = time.perf_counter(), time.process_time(), 0, history.steps
        # kept on the device and read back every log_every steps: the steps between never wait for the GPU
        loss_sum, pen_sum = torch.zeros((), device=device), torch.zeros((), device=device)
        first_bad = torch.full((), -1, dtype=torch.long, device=device)  # the first step with a non-finite loss
        batches = length_bucketed_batches(lengths, cfg.batch_size, cfg.seed + epoch)
        for global_batch in batches:
            index, share = distributed.my_part(global_batch)  # one process: the whole batch, share 1
            host = train.batch(index, tokenizer)
            checked = model.bert.check_on_host(host["input_ids"], host["attention_mask"], host["token_type_ids"],
                                               device)  # on the host: the forward reads nothing back
            batch = to_device(host, device)
            ctx = StepContext(step=history.steps + 1, total_steps=total_steps, epoch=epoch, model=model, batch=batch,
                              traces=[] if want_traces else None, lr=o.opt.param_groups[0]["lr"], share=share,
                              checked=checked)
            for h in hooks:
                h.before_forward(ctx)
            with autocast(device, dtype), parametrize.cached():  # each parametrized weight once per step
                ctx.logits = net(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], ctx.traces,
                                 pack_trace=pack_trace, cls_trace=cls_trace, checked=checked)
                ctx.loss = loss = model.loss(ctx.logits, batch["labels"])
                terms = [t for t in (h.loss(ctx) for h in hooks) if t is not None]
                pen = torch.stack([t.float() for t in terms]).sum() if terms else None
            has_terms = has_terms or pen is not None
            if share != 1:  # DDP averages the ranks' gradients: scaled, that average is the global batch's mean
                loss = loss * share
            total = loss + pen if pen is not None else loss
            step_loss, step_pen, step_total = distributed.mean_over_ranks(loss, pen, total)  # the global batch's
            bad = ~torch.isfinite(step_total.detach()) & (first_bad < 0)
            first_bad = torch.where(bad, ctx.step, first_bad)
            optimizer_step(model, total, o, cfg.max_grad_norm,
                           after_backward=(lambda: [h.after_backward(ctx) for h in hooks]) if hooks else None)
            history.steps += 1
            if hooks:
                with torch.no_grad():
                    for h in hooks:
                        h.after_step(ctx)
            n_batches += 1
            loss_sum += step_loss.detach().float()
            if step_pen is not None:
                pen_sum += step_pen.detach().float()
            history.train_examples += len(global_batch)
            history.train_tokens += sum(lengths[i] for i in global_batch)
            if n_batches % log_every == 0 or n_batches == len(batches):  # the only reads of the step's numbers
                bad_step = int(first_bad)
                if bad_step >= 0:
                    raise TrainingDiverged(
                        f"the loss became NaN or infinite at step {bad_step} (epoch {epoch}, batch "
                        f"{bad_step - epoch_start}); " + (f"the last good checkpoint is {Path(out_dir) / 'best'}"
                                                          if saved else "no checkpoint was saved before it"))
                if progress is not None:
                    seconds = history.train_seconds + time.perf_counter() - t0
                    progress.update(history.steps - progress.n)
                    progress.set_postfix(epoch=epoch, loss=f"{float(loss_sum) / n_batches:.4f}",
                                         ex_per_s=f"{history.train_examples / seconds:.1f}")
        history.train_seconds += time.perf_counter() - t0
        history.train_cpu_seconds += time.process_time() - c0
        record = {"epoch": epoch, "train_loss": float(loss_sum) / max(1, n_batches),
                  "penalty": float(pen_sum) / max(1, n_batches) if has_terms else None,
                  "lr_end": sched.get_last_lr()[0], "dev": {}}
        for h in hooks:
            record.update(h.epoch_log())
        for name, data in dev.items():
            record["dev"][name] = evaluate(model, data, task, tokenizer, cfg.eval_batch_size, device, dtype)
        history.epochs.append(record)
        score = record["dev"][main_split][task.main_metric]
        if history.best_metrics is None or score > history.best_metrics[main_split][task.main_metric]:
            history.best_epoch, history.best_metrics = epoch, record["dev"]
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            if out_dir is not None:
                save_pretrained(model, Path(out_dir) / "best", tokenizer=tokenizer)
                saved = True
        if progress is not None:
            progress.write(f"epoch {epoch}: train loss {record['train_loss']:.4f}, {main_split} "
                           f"{task.main_metric} {score:.4f}")
    if progress is not None:
        progress.close()
    distributed.unwrap(net)
    if restore_best and best_state is not None:
        model.load_state_dict(best_state)
        history.restored_best = True
    return history


def _progress(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True)
