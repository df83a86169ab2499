"""The GPU-ready path, exercised where there is no GPU: where a method's tensors are made, which autocast dtype a
device gets, how batches travel, and that a training step never waits on the device outside its log steps."""

from __future__ import annotations

import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import minisnip
from minisnip.__main__ import METHODS
from minisnip.finetune import load_classifier, load_task_data
from minisnip.pruning.branches import resolve_kinds
from minisnip.pruning.recipe import PruneConfig, finetune_with
from minisnip.train import TrainConfig, TrainHook, amp_dtype, start_training, to_device

pytestmark = pytest.mark.usefixtures("one_thread")


# --- where a method's tensors live ---------------------------------------------------------------------------
def _tensors(obj, seen: set, path: str):
    """Every tensor a hook holds: attributes, lists, dicts, modules' parameters and buffers."""
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, torch.nn.Module):
        yield from ((f"{path}.{n}", t) for n, t in [*obj.named_parameters(), *obj.named_buffers()])
    elif isinstance(obj, (list, tuple)):
        for i, x in enumerate(obj):
            yield from _tensors(x, seen, f"{path}[{i}]")
    elif isinstance(obj, dict):
        for k, x in obj.items():
            yield from _tensors(x, seen, f"{path}[{k!r}]")
    elif type(obj).__module__.startswith("minisnip") and hasattr(obj, "__dict__") and not isinstance(obj, type):
        for k, x in vars(obj).items():
            yield from _tensors(x, seen, f"{path}.{k}")


# L0's constructor reads the expected compression of its fresh gates back (one number, once): a meta tensor has
# no value to read, so it cannot be built there; its tensors take device= from the weights like the others'.
NEEDS_VALUES_AT_INIT = {"l0"}


@pytest.mark.parametrize("name", [n for n in METHODS if n not in NEEDS_VALUES_AT_INIT])
def test_every_tensor_a_method_makes_lives_on_the_model_device(name, tiny_config):
    """Built on a model on the "meta" device (shapes, no storage), every mask, score, gate index and
    power-iteration vector a method holds must be on "meta" too: one made on the CPU (a factory call without
    device=) would be left behind when the model trains on a GPU."""
    module, overrides = METHODS[name]
    model = minisnip.BertForSequenceClassification(tiny_config(num_labels=2)).to("meta")
    kinds, size = resolve_kinds(model, ("head", "neurons"), None)
    hooks = module.training_hooks(model, module.Config(**overrides), 0.5, 20, kinds, size)
    held = [(p, t.device) for i, h in enumerate(hooks) for p, t in _tensors(h, set(), f"hook{i}")]
    held += [(n, t.device) for n, t in [*model.named_parameters(), *model.named_buffers()]]
    assert held and all(d.type == "meta" for _, d in held), [(p, d) for p, d in held if d.type != "meta"]


def test_the_recipe_moves_the_model_before_the_method_makes_its_tensors(tiny_folder, glue_fixtures_dir):
    """finetune_with puts the model on the training device first, so what training_hooks creates beside the
    weights is on that device (here "meta": the method sees it, then the run stops)."""
    seen = {}

    class Stop(Exception):
        pass

    class Probe:
        STRUCTURED, SCHEDULED, USES_DISTILLATION = True, False, False

        @staticmethod
        def training_hooks(model, *args, **kwargs):
            seen["device"] = next(model.parameters()).device
            raise Stop

    tokenizer = minisnip.load_tokenizer(tiny_folder)
    data = load_task_data("rte", tokenizer, glue_fixtures_dir, max_length=32)
    model = load_classifier(tiny_folder, data.task)
    with pytest.raises(Stop):
        finetune_with(model, tokenizer, data, Probe, None, PruneConfig(target=0.5),
                      TrainConfig(epochs=1, batch_size=4, progress=False, device="meta"))
    assert seen["device"].type == "meta"


# --- autocast dtype, gradient scaler, transfers ------------------------------------------------------------------
@pytest.mark.parametrize("bf16", [True, False])
def test_cuda_gets_bf16_where_supported_else_fp16_with_a_scaler(bf16, monkeypatch, tiny_config):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    cuda = torch.device("cuda")
    assert amp_dtype(cuda, "auto") == (torch.bfloat16 if bf16 else torch.float16)
    assert amp_dtype(cuda, "off") is None and amp_dtype(cuda, "fp16") == torch.float16
    assert amp_dtype(torch.device("cpu"), "auto") is None  # CPU: fp32 unless asked
    # the scaler is on exactly for fp16 (bf16 has fp32's range and needs none); built on the CPU with amp="fp16"
    model = minisnip.BertForSequenceClassification(tiny_config(num_labels=2))
    for amp, on in (("fp16", True), ("bf16", False), ("off", False)):
        o = start_training(model, TrainConfig(amp=amp, device="cpu", progress=False), 8)
        assert o.scaler.is_enabled() is on, amp


def test_batches_move_as_they_are_on_the_cpu():
    batch = {"input_ids": torch.arange(6).view(2, 3), "attention_mask": torch.ones(2, 3, dtype=torch.long)}
    moved = to_device(batch, torch.device("cpu"))
    assert all(moved[k] is batch[k] for k in batch)  # no copy, no pinning on the CPU


def test_log_every_defaults_per_device_and_refuses_nonsense():
    assert TrainConfig().log_interval(torch.device("cpu")) == 1
    assert TrainConfig().log_interval(torch.device("cuda")) == 50
    assert TrainConfig(log_every=7).log_interval(torch.device("cuda")) == 7
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="log_every"):
            TrainConfig(log_every=bad)


# --- no host synchronisation inside a training step ------------------------------------------------------------
def _on_host() -> bool:
    """Whether the op runs on tensors that stay on the host in a GPU run too (see SyncCounter)."""
    return any("torch/optim/" in f.filename or f.name in ("check_on_host", "_uncapped_on_cpu")
               for f in traceback.extract_stack(limit=14))


class SyncCounter(TorchDispatchMode):
    """Counts, per training step, the ops that make a GPU wait for the host to read a value back:
    `_local_scalar_dense` (.item(), float(t), bool(t), `if t:`) and nonzero (its output size depends on the data).
    .tolist(), .cpu() and .numpy() of a CPU tensor are not dispatched: `watch_host_copies` counts them (as
    "host copy") by wrapping those Tensor methods for the test. Not counted, because they touch host tensors on
    a GPU run too and never wait for it: AdamW reading its step counters (torch keeps them on the host unless
    capturable), `BertModel.check_on_host`, which checks and packs the batch before it moves, and SN's
    `spectral._uncapped_on_cpu`, which reads σ̂ back on the CPU only (a GPU run never asks)."""

    SYNCING = ("aten._local_scalar_dense", "aten.nonzero")

    def __init__(self):
        super().__init__()
        self.steps: list[dict[str, int]] = [{}]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func).rsplit(".", 1)[0]
        if name in self.SYNCING and not _on_host():
            self.steps[-1][name] = self.steps[-1].get(name, 0) + 1
        return func(*args, **(kwargs or {}))

    def watch_host_copies(self, monkeypatch) -> None:
        for method in ("tolist", "cpu", "numpy"):
            real = getattr(torch.Tensor, method)

            def counted(t, *a, _real=real, **k):
                if not _on_host():
                    self.steps[-1]["host copy"] = self.steps[-1].get("host copy", 0) + 1
                return _real(t, *a, **k)
            monkeypatch.setattr(torch.Tensor, method, counted)


class StepMarker(TrainHook):
    def __init__(self, counter: SyncCounter):
        self.counter = counter

    def before_forward(self, ctx) -> None:
        self.counter.steps.append({})


# structured movement chooses its mask on the host at every step (a Python selection of branches by compression
# accounting, from the scores read back): one read-back per step, by design
HOST_SELECTION = {"movement-structured"}


@pytest.mark.parametrize("name", ["plain", "snip", "snip-prox", "magnitude-unstructured", "movement",
                                  "soft-movement", "sparsebert", "heads", "dsp", "l0", "distill",
                                  *sorted(HOST_SELECTION)])
def test_a_training_step_reads_nothing_back_outside_its_log_steps(name, tiny_folder, glue_fixtures_dir, monkeypatch):
    """With log_every = 3, the loop's only reads of the step's numbers (the loss for the progress bar, the NaN
    check) come every third step and at the epoch's end. The other steps read nothing back from the device:
    no .item(), no host copy, no nonzero (the model's input checks and packing ran on the host, `checked=`)."""
    tokenizer = minisnip.load_tokenizer(tiny_folder)
    data = load_task_data("sst2", tokenizer, glue_fixtures_dir, max_length=32)
    cfg = TrainConfig(epochs=1, batch_size=1, lr=1e-3, max_length=32, progress=False, log_every=3)
    counter = SyncCounter()
    model = load_classifier(tiny_folder, data.task)
    if name == "plain":
        module, method_cfg = METHODS["snip-no-prior"][0], METHODS["snip-no-prior"][0].Config(**METHODS["snip-no-prior"][1])
        prune_cfg = PruneConfig(target=0.5)
    elif name == "distill":
        module, method_cfg = METHODS["snip-no-prior"][0], METHODS["snip-no-prior"][0].Config(**METHODS["snip-no-prior"][1])
        from minisnip.pruning.distill import DistillConfig
        prune_cfg = PruneConfig(target=0.5, distill=DistillConfig(hidden_weight=1.0))
    else:
        module, overrides = METHODS[name]
        method_cfg, prune_cfg = module.Config(**overrides), PruneConfig(target=0.5)
    teacher = load_classifier(tiny_folder, data.task) if name == "distill" or module.USES_DISTILLATION else None
    counter.watch_host_copies(monkeypatch)
    with counter:
        finetune_with(model, tokenizer, data, module, method_cfg, prune_cfg, cfg, extra_hooks=[StepMarker(counter)],
                      teacher=teacher)
    steps = counter.steps[1:]  # [0]: before the first step (optimiser set-up)
    n = -(-len(data.train) // cfg.batch_size)
    assert len(steps) == n
    quiet = [s for i, s in enumerate(steps, 1) if i % cfg.log_every and i != n]  # steps that log nothing
    assert quiet
    reads = [sum(s.values()) for s in quiet]
    if name in HOST_SELECTION:
        assert max(reads) > 0  # the documented exception: if this fails, the method no longer syncs; move it
    else:
        assert reads == [0] * len(quiet), quiet


def test_host_checked_forward_equals_the_forward_that_checks_itself(tiny_config):
    """forward(..., checked=check_on_host(...)) computes what the self-checking forward computes, with padding
    and without, traced or not; check_on_host refuses device tensors and catches what check_inputs catches."""
    model = minisnip.BertForSequenceClassification(tiny_config(num_labels=2)).eval()
    ids = torch.randint(1, 99, (3, 7))
    for mask in (torch.ones(3, 7, dtype=torch.long), torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5])):
        types = torch.zeros_like(ids)
        checked = model.bert.check_on_host(ids, mask, types, torch.device("cpu"))
        assert checked.has_padding == bool((mask == 0).any()) and (checked.packing is None) != checked.has_padding
        torch.testing.assert_close(model(ids, mask, types, checked=checked), model(ids, mask, types), rtol=0, atol=0)
        t0, t1 = [], []
        model(ids, mask, types, t0, pack_trace=True)
        model(ids, mask, types, t1, pack_trace=True, checked=checked)
        torch.testing.assert_close(t1[-1].y, t0[-1].y, rtol=0, atol=0)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.bert.check_on_host(ids + 1000, None, None, torch.device("cpu"))
    with pytest.raises(ValueError, match="on the host"):
        model.bert.check_on_host(ids.to("meta"), None, None, torch.device("cpu"))


# --- mixed precision: what a GPU runs by default, run here under the CPU's bf16 autocast ------------------------
@pytest.mark.parametrize("name", [*METHODS, "distill"])
def test_every_method_fine_tunes_and_prunes_under_bf16_autocast(name, tiny_folder, glue_fixtures_dir):
    """On CUDA fit autocasts to bf16 by default. Each method's training terms and scores must take the lower
    precision of the traced values (SNIP's prior backpropagated a bf16 Gram product into a float32 buffer on the
    first GPU run): two steps under amp="bf16", then scoring and removal, with finite losses and scores."""
    from minisnip.pruning.distill import DistillConfig
    from minisnip.pruning.recipe import remove
    from minisnip.config import BertConfig

    tokenizer = minisnip.load_tokenizer(tiny_folder)
    data = load_task_data("sst2", tokenizer, glue_fixtures_dir, max_length=32, max_train=4)
    cfg = TrainConfig(epochs=1, batch_size=2, lr=1e-3, max_length=32, progress=False, amp="bf16")
    module, overrides = METHODS["snip" if name == "distill" else name]
    prune_cfg = PruneConfig(target=0.5, distill=DistillConfig() if name == "distill" else None)
    model = load_classifier(tiny_folder, data.task)
    dense = BertConfig.from_dict(model.config.to_dict())
    teacher = load_classifier(tiny_folder, data.task) if name == "distill" or module.USES_DISTILLATION else None
    history, hooks = finetune_with(model, tokenizer, data, module, module.Config(**overrides), prune_cfg, cfg,
                                   teacher=teacher)
    assert history.epochs and all(torch.isfinite(torch.tensor(e["train_loss"])) for e in history.epochs)
    outcome = remove(model, tokenizer, data, module, hooks, prune_cfg, cfg, dense)
    assert all(torch.isfinite(torch.tensor(float(s))) for s in outcome.scores.values())
    assert outcome.report["compression"] > 0
