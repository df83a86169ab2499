"""Distributed training (minisnip.distributed): two CPU processes (gloo) train exactly as one process.

One spawn of two ranks does everything (process start-up is the expensive part): `fit` and the SNIP recipe
through the Python API, with a hook recording every step's global loss and spectral norm's u, v, then the
`finetune` and `prune --method snip` commands and the refusal of a batch size two processes cannot share.
This process runs the same on one process and compares: per-step losses, final weights, removed branches,
what was written (by rank 0 alone).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minisnip import distributed
from minisnip.__main__ import METHODS, main
from minisnip.finetune import load_task_data, new_classifier
from minisnip.pruning.recipe import PruneConfig, prune
from minisnip.tokenizer import load_tokenizer
from minisnip.train import TrainConfig, TrainHook, fit

WORLD = 2
# 13 training examples in batches of 4: the last batch holds one example, so rank 1 runs a share-0 batch;
# the fine-tuning run samples 11 of them: its last batch of 3 splits 2 + 1 (shares 4/3 and 2/3)
N_TRAIN, FIT_SAMPLE, BATCH = 13, 11, 4
CLI = ["--task", "sst2", "--epochs", "2", "--batch-size", str(BATCH), "--lr", "1e-3", "--max-length", "32",
       "--no-progress"]


def train_cfg() -> TrainConfig:
    return TrainConfig(epochs=2, batch_size=BATCH, lr=1e-3, max_length=32, progress=False, device="cpu")


class StepRecord(TrainHook):
    """Every step's task loss over the global batch, and the spectral-norm buffers after the last step."""

    def __init__(self):
        self.losses: list[float] = []
        self.sn: dict[str, torch.Tensor] = {}

    def after_step(self, ctx) -> None:
        (loss,) = distributed.mean_over_ranks(ctx.loss * ctx.share)  # one process: the batch's loss as it is
        self.losses.append(float(loss))
        self.sn = {k: v.clone() for k, v in ctx.model.named_buffers() if k.endswith((".u", ".v"))}


def api_runs(model_path: Path, glue: Path) -> dict:
    """Fine-tuning (11 examples) and SNIP pruning to 50% (13 examples) through the Python API."""
    tok = load_tokenizer(model_path)
    cfg = train_cfg()
    data = load_task_data("sst2", tok, glue, max_train=FIT_SAMPLE, seed=cfg.seed, max_length=32)
    model, rec = new_classifier(model_path, data.task, cfg.seed), StepRecord()
    history = fit(model, tok, data.task, data.train, data.dev, cfg, hooks=[rec])
    out = {"fit_losses": rec.losses, "fit_state": model.state_dict(), "fit_history": history.to_dict()}
    data = load_task_data("sst2", tok, glue, seed=cfg.seed, max_length=32)
    model, rec = new_classifier(model_path, data.task, cfg.seed), StepRecord()
    module, overrides = METHODS["snip"]
    outcome = prune(model, tok, data, module, module.Config(**overrides), PruneConfig(target=0.5), cfg,
                    extra_hooks=[rec], log=lambda *a: None)
    out.update(prune_losses=rec.losses, prune_sn=rec.sn, prune_state=model.state_dict(), removed=outcome.removed,
               scores=outcome.scores)
    return out


def cli_runs(model_path: Path, glue: Path, out: Path) -> dict:
    """The two commands into out/finetune and out/prune; and a batch size of 3 (refused with two processes)."""
    common = [*CLI, "--glue-dir", str(glue), "--model", str(model_path)]
    codes = {"finetune": main(["finetune", *common, "--max-train", str(FIT_SAMPLE), "--out", str(out / "finetune")]),
             "prune": main(["prune", *common, "--method", "snip", "--target", "0.5", "--out", str(out / "prune")])}
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        codes["refused"] = main(["finetune", *common, "--batch-size", "3", "--out", str(out / "refused")])
    return {"codes": codes, "refusal": err.getvalue()}


def helper_checks() -> dict:
    """The helpers on their own: each rank's part of two global batches, and the gradient of a batch-wide
    statistic through `global_sum` after DDP's averaging (each rank holds a[rank] of the batch a)."""
    a = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    theta = torch.tensor([0.5, -2.0], requires_grad=True)
    r = distributed.global_sum(((theta * a[distributed.rank()]) ** 2).sum()).sqrt()
    r.backward()
    distributed.average_gradients([theta])  # what DDP does to a parameter's gradient
    return {"parts": [distributed.my_part([10, 11, 12]), distributed.my_part([7])], "value": r.item(),
            "grad": theta.grad.clone()}


def _worker(rank: int, port: int, model_path: str, glue: str, out: str) -> None:
    # what torchrun sets for each process; distributed.init reads it
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), TMPDIR=str(Path(out) / f"tmp-{rank}"))
    os.makedirs(os.environ["TMPDIR"])
    torch.set_num_threads(1)
    assert distributed.init("cpu") and distributed.world_size() == WORLD and distributed.rank() == rank
    try:
        result = {**helper_checks(), **api_runs(Path(model_path), Path(glue))}
        if rank == 0:
            result["printed"] = io.StringIO()
        with contextlib.redirect_stdout(result.get("printed", io.StringIO())):
            result.update(cli_runs(Path(model_path), Path(glue), Path(out) / "runs"))
        if "printed" in result:
            result["printed"] = result["printed"].getvalue()
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        distributed.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def inputs(tiny_folder, glue_fixtures_dir, tmp_path_factory) -> tuple[Path, Path]:
    """The tiny model without dropout (so that one and two processes compute the same function) and an SST-2
    folder of 13 training sentences made from the fixtures' six."""
    root = tmp_path_factory.mktemp("ddp-inputs")
    model = root / "model"
    shutil.copytree(tiny_folder, model)
    config = json.loads((model / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (model / "config.json").write_text(json.dumps(config))
    src = glue_fixtures_dir / "SST-2"
    rows = [r for f in ("train.tsv", "dev.tsv") for r in (src / f).read_text().splitlines()[1:]]
    lines = [f"{w} {r}" for w in ("really", "so", "truly") for r in rows][:N_TRAIN]
    (root / "glue" / "SST-2").mkdir(parents=True)
    (root / "glue" / "SST-2" / "train.tsv").write_text("sentence\tlabel\n" + "\n".join(lines) + "\n")
    shutil.copy(src / "dev.tsv", root / "glue" / "SST-2" / "dev.tsv")
    return model, root / "glue"


def _spawn(inputs, out: Path, timeout: float = 240.0) -> list[dict]:
    import torch.multiprocessing as mp
    ctx = mp.start_processes(_worker, args=(_free_port(), str(inputs[0]), str(inputs[1]), str(out)), nprocs=WORLD,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the {WORLD} ranks did not finish within {timeout:.0f} s (a collective hung?)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 2e-5) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=atol, msg=lambda m: f"{k}: {m}")


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs between the ranks"


def test_one_process_is_untouched():
    """Without torchrun nothing is initialised and every helper is the identity."""
    assert not distributed.is_distributed() and distributed.world_size() == 1 and distributed.is_main()
    assert distributed.init() is False  # WORLD_SIZE unset (or 1): no process group
    x = torch.ones(3, requires_grad=True)
    assert distributed.global_sum(x) is x and distributed.mean_over_ranks(x, None) == (x, None)
    assert distributed.my_part([4, 5, 6]) == ([4, 5, 6], 1.0)
    assert distributed.broadcast_object({"a": 1}) == {"a": 1} and distributed.from_rank0(lambda: 3) == 3
    model = torch.nn.Linear(2, 2)
    assert distributed.wrap(model) is model
    distributed.check_batch_size(7)


def test_two_processes_train_as_one(inputs, tmp_path):
    ranks = _spawn(inputs, tmp_path / "ddp")
    one = api_runs(*inputs)
    r0, r1 = ranks

    # the helpers: rank r takes every 2nd example from r on; a rank without an example gets share 0; the
    # gradient of sqrt(Σ over the global batch), averaged over the ranks, is the one-process gradient
    assert r0["parts"] == [([10, 12], 4 / 3), ([7], 2.0)] and r1["parts"] == [([11], 2 / 3), ([7], 0.0)]
    theta = torch.tensor([0.5, -2.0], requires_grad=True)
    value = ((theta * torch.tensor([[1.0, 2.0], [3.0, -1.0]])) ** 2).sum().sqrt()
    value.backward()
    for r in ranks:
        assert r["value"] == pytest.approx(value.item())
        torch.testing.assert_close(r["grad"], theta.grad)

    # fine-tuning: the same steps, losses and weights; the ranks bit-identical to each other
    assert len(r0["fit_losses"]) == len(one["fit_losses"]) == 2 * 3
    assert r0["fit_losses"] == r1["fit_losses"]
    assert r0["fit_losses"] == pytest.approx(one["fit_losses"], rel=1e-5, abs=1e-6)
    _equal(r0["fit_state"], r1["fit_state"])
    _close(r0["fit_state"], one["fit_state"])
    for key in ("train_examples", "train_tokens", "steps", "best_epoch"):
        assert r0["fit_history"][key] == one["fit_history"][key], key
    for e0, e1 in zip(r0["fit_history"]["epochs"], one["fit_history"]["epochs"]):
        assert e0["train_loss"] == pytest.approx(e1["train_loss"], rel=1e-5)
        assert e0["dev"]["dev"] == pytest.approx(e1["dev"]["dev"], rel=1e-4)

    # SNIP: prior + SN fine-tuning (the hook sees its steps), then recovery of the smaller model (wrapped
    # afresh): same losses, same function norms, the same branches removed, the same final weights; the
    # power iteration's u, v in step on the ranks
    assert len(r0["prune_losses"]) == len(one["prune_losses"]) == 2 * 4
    assert r0["prune_losses"] == pytest.approx(one["prune_losses"], rel=1e-5, abs=1e-6)
    assert r0["removed"] == r1["removed"] == one["removed"] and one["removed"]
    assert r0["scores"] == r1["scores"] and r0["scores"] == pytest.approx(one["scores"], rel=1e-4)
    assert r0["prune_sn"] and r0["prune_sn"].keys() == one["prune_sn"].keys()
    _equal(r0["prune_sn"], r1["prune_sn"])
    _close(r0["prune_sn"], one["prune_sn"], atol=1e-5)
    _equal(r0["prune_state"], r1["prune_state"])
    _close(r0["prune_state"], one["prune_state"])

    # the commands: rank 0 alone printed and wrote its files, nothing left elsewhere
    assert r0["codes"] == r1["codes"] == {"finetune": 0, "prune": 0, "refused": 2}
    assert "--batch-size 3 is the global batch; it must be divisible by the 2 processes" in r0["refusal"]
    assert r0["printed"].count("written:") == 2
    runs = tmp_path / "ddp" / "runs"
    assert sorted(p.name for p in runs.iterdir()) == ["finetune", "prune"]  # no partial folder, no "refused"
    assert sorted(p.name for p in (runs / "finetune").iterdir()) == ["best", "result.json"]
    assert sorted(p.name for p in (runs / "prune").iterdir()) == ["kept_map.png", "norms_per_layer.png", "pruned",
                                                                  "pruning.json", "result.json"]
    for name in ("finetune", "prune"):
        assert json.loads((runs / name / "result.json").read_text())["status"] == "completed"
    # the commands ran what the API runs above ran (same data, seed, settings): compare with one process
    assert json.loads((runs / "prune" / "pruning.json").read_text())["removed"] == one["removed"]
    _close(load_file(runs / "finetune" / "best" / "model.safetensors"), one["fit_state"])
    _close(load_file(runs / "prune" / "pruned" / "model.safetensors"), one["prune_state"])
    for r in range(WORLD):
        assert not any((tmp_path / "ddp" / f"tmp-{r}").iterdir()), "a rank left its scratch folder behind"


@pytest.mark.slow
def test_torchrun_launch(inputs, tmp_path):
    """The real launcher: `torchrun --standalone --nproc_per_node 2 -m minisnip prune ...` (python -m
    torch.distributed.run) removes what one process removes, prints once, writes once."""
    import subprocess
    import sys
    common = [*CLI, "--glue-dir", str(inputs[1]), "--model", str(inputs[0]), "--method", "snip", "--target", "0.5"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "minisnip", "prune", *common, "--out", str(tmp_path / "ddp")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("written:") == 1
    assert main(["prune", *common, "--out", str(tmp_path / "one")]) == 0
    got, want = (json.loads((tmp_path / d / "pruning.json").read_text()) for d in ("ddp", "one"))
    assert got["removed"] == want["removed"]
    _close(load_file(tmp_path / "ddp" / "pruned" / "model.safetensors"),
           load_file(tmp_path / "one" / "pruned" / "model.safetensors"))


# --- every method under DDP ------------------------------------------------------------------------------------
# l0 and dsp sample their gates from each rank's own random stream (seed + rank), so two processes are not one
# process with a bigger batch; soft movement keeps a weight while its score is above a fixed threshold, and
# scores equal to rounding (a gradient summed in another order) land on either side of it. Their ranks must
# still agree on every parameter and decision
NOT_ONE_PROCESS = {"l0", "dsp", "soft-movement"}


def method_runs(model_path: Path, glue: Path) -> dict:
    """Every method of the command line (but snip, checked above) pruned to 50% through the Python API, 1 epoch:
    the removed branches and the final weights of each (sparsebert's teacher: the model it starts from)."""
    tok = load_tokenizer(model_path)
    cfg = TrainConfig(epochs=1, batch_size=BATCH, lr=1e-3, max_length=32, progress=False, device="cpu")
    data = load_task_data("sst2", tok, glue, seed=cfg.seed, max_length=32)
    out = {}
    for name, (module, overrides) in METHODS.items():
        if name == "snip":
            continue
        model = new_classifier(model_path, data.task, cfg.seed)
        teacher = new_classifier(model_path, data.task, cfg.seed) if module.USES_DISTILLATION else None
        outcome = prune(model, tok, data, module, module.Config(**overrides), PruneConfig(target=0.5), cfg,
                        teacher=teacher, log=lambda *a: None)
        out[name] = {"removed": outcome.removed, "state": model.state_dict()}
    return out


def _method_worker(rank: int, port: int, model_path: str, glue: str, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    assert distributed.init("cpu")
    try:
        torch.save(method_runs(Path(model_path), Path(glue)), Path(out) / f"methods{rank}.pt")
    finally:
        distributed.close()


def test_every_method_trains_in_step_on_two_processes(inputs, tmp_path):
    """Each method's own parameters (scores, gate logits) are averaged like the model's, its masks follow them:
    the two ranks end bit-identical, and a method that samples nothing removes what one process removes."""
    import torch.multiprocessing as mp
    tmp_path.mkdir(exist_ok=True)
    ctx = mp.start_processes(_method_worker, args=(_free_port(), str(inputs[0]), str(inputs[1]), str(tmp_path)),
                             nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + 300
    try:
        while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise TimeoutError("the ranks did not finish within 300 s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    r0, r1 = (torch.load(tmp_path / f"methods{r}.pt", weights_only=False) for r in range(WORLD))
    one = method_runs(*inputs)
    assert r0.keys() == one.keys() == set(METHODS) - {"snip"}
    far = {}
    for name in one:
        assert r0[name]["removed"] == r1[name]["removed"], name
        _equal(r0[name]["state"], r1[name]["state"])
        if name not in NOT_ONE_PROCESS:
            assert r0[name]["removed"] == one[name]["removed"], name
            # Adam turns rounding-level gradient differences of a near-zero gradient into a whole step (lr) of
            # either sign: count the weights that moved apart by more than rounding
            a, b = r0[name]["state"], one[name]["state"]
            far[name] = sum(int(((a[k] - b[k]).abs() > 1e-4 + 1e-4 * b[k].abs()).sum()) for k in a)
    total = sum(t.numel() for t in one["magnitude"]["state"].values())
    assert all(n <= 1e-5 * total for n in far.values()), sorted(far.items(), key=lambda kv: -kv[1])[:4]
