"""Training on several processes: torchrun's set-up, DistributedDataParallel, and the few collectives minisnip needs.

    torchrun --nproc_per_node N -m minisnip finetune ...      (or prune ...)

starts N processes (ranks); `init` joins them into one process group from torchrun's environment variables
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), with the nccl backend when they train on CUDA (each
rank on the GPU of its LOCAL_RANK) and gloo on the CPU. Without torchrun (or with one process) nothing here is
initialised and every function below is the identity or a no-op: a one-process run is exactly what it was.

What a distributed run keeps the same as one process with the same --batch-size B:

* the batches: every rank draws the same global batches in the same order, and takes every N-th example of
  each (`my_part`): a micro-batch of B/N, so B must be divisible by N;
* the loss: DDP averages gradients over the ranks, so a rank's micro-batch mean is scaled by its `share`
  (N * its examples / the global batch's) to make that average the mean over the global batch, also for the
  last, smaller batch of an epoch (a rank left without an example runs one with share 0);
* batch-wide statistics in a loss term (the identity prior's function norms) are sums over the global batch
  (`global_sum`, differentiable), not per rank;
* the weights: DDP starts every rank from rank 0's and keeps them identical; the buffers (spectral norm's
  power-iteration vectors u, v) are broadcast from rank 0 at every forward (DDP's default);
* decisions: evaluation runs on rank 0 and its numbers go to every rank (`from_rank0`), so every rank picks
  the same best epoch; pruning uses rank 0's scores and selection (`broadcast_object`);
* files: only rank 0 writes (`is_main`; checkpoint.write_json / save_pretrained, rundir.RunDir).

Not the same: dropout masks (rank r draws them from seed + r, see train.start_training; a hook's random draws,
e.g. L0 gate samples, likewise) and float rounding (sums in another order).
"""

from __future__ import annotations

import os
from typing import Callable, Iterable, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

T = TypeVar("T")


def init(device: str = "auto") -> bool:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA); False (and nothing done) when not
    started by torchrun or with one process. On CUDA, rank r's current device becomes cuda:LOCAL_RANK."""
    if dist.is_available() and dist.is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed; run on one process")
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device {device}: under torchrun a run trains on cpu or cuda, and every process takes "
                         "the GPU of its LOCAL_RANK: pass --device cuda, cpu or auto")
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return True


def close() -> None:
    """Leave the process group (at the end of a distributed command; a no-op otherwise)."""
    if is_distributed():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Whether this process writes files and prints: rank 0, or the only process."""
    return rank() == 0


def check_batch_size(batch_size: int) -> None:
    """Refuse a global batch the ranks cannot share equally."""
    n = world_size()
    if batch_size % n:
        raise ValueError(f"--batch-size {batch_size} is the global batch; it must be divisible by the {n} processes "
                         f"(each takes batch-size / {n} examples of every batch): use a multiple of {n}, e.g. "
                         f"{max(n, batch_size - batch_size % n)}")


def my_part(index: Sequence[int]) -> tuple[list[int], float]:
    """This rank's examples of one global batch, and its share: N * len(part) / len(batch).

    The rank takes every N-th example from its rank on (the batch is sorted by length within its bucket, so
    the ranks get similar lengths). A DDP step averages the ranks' gradients, so a loss that is a mean over
    the micro-batch, multiplied by `share`, averages to the mean over the global batch. A rank that gets no
    example (a last batch smaller than N) runs the batch's first example with share 0, so that it still takes
    part in the step. One process: (index, 1.0)."""
    n = world_size()
    if n == 1:
        return list(index), 1.0
    part = list(index[rank()::n])
    if not part:
        return [index[0]], 0.0
    return part, n * len(part) / len(index)


def wrap(model: nn.Module) -> nn.Module:
    """The model in DistributedDataParallel for one training run (the model itself on one process).

    Wrap afresh for every run: physical removal changes the parameters, so the pruned model needs a new
    wrapper. device_ids stays None (the model sits on one device already; inputs are not moved)."""
    if not is_distributed():
        return model
    return nn.parallel.DistributedDataParallel(model)


def unwrap(net: nn.Module) -> None:
    """End a training run's wrapper: take DDP's gradient hooks off the parameters (the model stays as it is)."""
    if isinstance(net, nn.parallel.DistributedDataParallel) and hasattr(net, "_remove_autograd_hooks"):
        net._remove_autograd_hooks()  # a later run's DDP (recovery after pruning) must be the only one listening


def average_gradients(params: Iterable[Tensor]) -> None:
    """Average the gradients of parameters that DDP does not hold (a training hook's own: scores, gate logits)."""
    if not is_distributed():
        return
    n = world_size()
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(n)


def global_sum(local: Tensor) -> Tensor:
    """The sum of `local` over the ranks (the identity on one process), for a batch-wide statistic in a loss.

    Its value is the global sum; its gradient flows into this rank's `local` times N (no collective in the
    backward pass), so that after DDP averages the ranks' gradients each rank's contribution counts once:
    d/dθ f(Σ_r s_r) = f'(S) Σ_r ds_r/dθ."""
    if not is_distributed():
        return local
    total = local.detach().clone()
    dist.all_reduce(total)
    if not local.requires_grad:
        return total
    scaled = local * world_size()
    return scaled - scaled.detach() + total


def mean_over_ranks(*values: Tensor | None) -> tuple[Tensor | None, ...]:
    """Each value (a 0-d tensor or None) averaged over the ranks, detached, in one all-reduce; on one process the
    values as they are. With `my_part`'s shares, the mean of the ranks' scaled losses is the global batch's."""
    if not is_distributed():
        return values
    present = [v for v in values if v is not None]
    if not present:
        return values
    total = torch.stack([v.detach().float() for v in present])
    dist.all_reduce(total)
    total /= world_size()
    it = iter(total.unbind())
    return tuple(next(it) if v is not None else None for v in values)


def broadcast_object(obj: T) -> T:
    """Rank 0's `obj` on every rank (picklable; the argument is ignored on the other ranks)."""
    if not is_distributed():
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def from_rank0(fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0 alone and give its result to every rank (if it raises, every rank raises).

    `fn` must not itself take part in a collective. Every rank must call this at the same point."""
    if not is_distributed():
        return fn()
    outcome, error = None, None
    if is_main():
        try:
            outcome = (True, fn())
        except Exception as e:  # noqa: BLE001 - the other ranks learn of it, then it is raised
            outcome, error = (False, f"{type(e).__name__}: {e}"), e
    ok, value = broadcast_object(outcome)
    if error is not None:
        raise error
    if not ok:
        raise RuntimeError(f"rank 0 failed: {value}")
    return value


__all__ = ["average_gradients", "broadcast_object", "check_batch_size", "close", "from_rank0", "global_sum", "init",
           "is_distributed", "is_main", "mean_over_ranks", "my_part", "rank", "unwrap", "world_size", "wrap"]
