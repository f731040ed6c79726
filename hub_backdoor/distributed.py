"""Running an audit (and purification) over several processes with Hugging Face ``accelerate``.

The same code runs on one CPU, several CPU processes, one GPU and several GPUs::

    hub-backdoor audit ...                                   # one process
    torchrun --nproc_per_node 2 -m hub_backdoor.cli audit ... # 2 processes (CPU: gloo, GPU: nccl)
    accelerate launch --num_processes 4 -m hub_backdoor.cli audit ...   # 4 GPUs

(``accelerate launch --cpu --num_processes 2`` starts one process; for several CPU processes use
``torchrun``.)

How the work is split (docs/multi-gpu.md):

* **Reference pass.** The reference set is sharded over processes: a map-style dataset by
  accelerate's :func:`~accelerate.data_loader.prepare_data_loader` with ``even_batches=False``
  (no sample is repeated, so per-class counts, accuracy and the fingerprint are exact), a stream by
  position (:class:`~hub_backdoor.sources.reference.StreamingReference`). Stage 1 needs only the logits: each
  process folds them into its ``(C, C)`` running maximum, and the processes merge it with an
  all-reduce MAX (exact, order-free); counts and embedding sums use SUM, the order-free
  fingerprint (LtHash) adds its vectors.
* **QPs.** Class k is solved by process ``k % world``; the perturbations are summed (every other
  process contributes exact zeros) and the per-class diagnostics gathered.
* **Detection, report, card.** Computed on the main process and broadcast, so ``audit()`` returns
  the same report on every process; write files only where :attr:`Dist.is_main`.
* **Errors.** Every collective step first agrees on success: if any process raised, all processes
  raise that error instead of hanging in a collective.
* **Fine-tuning** (:class:`GradientSync`, :func:`shard_training_loader`, :func:`finetune_loop`):
  DDP semantics (gradients averaged over processes after each backward, identical parameters
  everywhere, rank 0's BatchNorm buffers at the end) without wrapping the module, so the adapters'
  forward hooks and ``head_affine`` keep working on the original model (a model from
  ``Accelerator.prepare`` syncs only when called through its wrapper).

Every collective is one of accelerate's own operations (``reduce``, ``gather_object``,
``broadcast``, ``broadcast_object_list``, ``wait_for_everyone``) on the accelerator's device.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import broadcast, broadcast_object_list, gather_object, reduce

from .errors import HubBackdoorError

__all__ = [
    "Dist",
    "GradientSync",
    "broadcast_module",
    "finetune_loop",
    "is_main_process",
    "launched_distributed",
    "resolve",
    "shard_reference_loader",
    "shard_training_loader",
    "steps_per_epoch",
]


def launched_distributed() -> bool:
    """True inside a multi-process launch (``torchrun``, ``accelerate launch``, debug launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_main_process() -> bool:
    """False on every process but rank 0 of a launch; the CLI writes, pushes and prints on rank 0."""
    return int(os.environ.get("RANK", "0")) == 0


@dataclass
class Dist:
    """The process group as the audit sees it: one process, or several under ``accelerate``.

    ``accelerator`` is an :class:`accelerate.Accelerator` or ``None`` (plain single process).
    """

    accelerator: Any = None

    @property
    def world(self) -> int:
        return 1 if self.accelerator is None else int(self.accelerator.num_processes)

    @property
    def rank(self) -> int:
        return 0 if self.accelerator is None else int(self.accelerator.process_index)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device | None:
        return None if self.accelerator is None else torch.device(self.accelerator.device)

    @property
    def active(self) -> bool:
        """Several processes take part (collectives needed)."""
        return self.world > 1

    # -- collectives: accelerate's own operations (no-ops for one process) ----------------------
    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """A reduced copy of ``tensor`` (``op``: "sum" or "max") on the tensor's own device."""
        if op not in ("sum", "max"):
            raise ValueError(f"all_reduce: op must be 'sum' or 'max', got {op!r}")
        if not self.active:
            return tensor.clone()
        # the collective runs where the process group's backend can reach (gloo: CPU, nccl: the GPU)
        out = reduce(tensor.detach().to(self.device), reduction=op)
        return out.to(tensor.device)

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in rank order."""
        return gather_object([obj]) if self.active else [obj]

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Process ``src``'s ``obj`` on every process."""
        return broadcast_object_list([obj], from_process=src)[0] if self.active else obj

    def barrier(self) -> None:
        if self.active:
            self.accelerator.wait_for_everyone()

    def agree(self, error: BaseException | None) -> None:
        """Collective error check: raise on every process if any process failed.

        A process that failed re-raises its own exception; the others raise the first failing
        process's (the same type and message when it pickles, else a :class:`HubBackdoorError`).
        """
        if not self.active:
            if error is not None:
                raise error
            return
        errors = self.all_gather_object(None if error is None else _portable(error))
        if error is not None:
            raise error
        for r, e in enumerate(errors):
            if e is not None:
                if isinstance(e, BaseException):
                    raise e
                raise HubBackdoorError(f"process {r} failed: {e}")

    def run(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        """``fn(*args, **kw)`` on this process, then :meth:`agree` on success."""
        err: BaseException | None = None
        out = None
        try:
            out = fn(*args, **kw)
        except Exception as e:  # re-raised after the collective check, on every process
            err = e
        self.agree(err)
        return out


def _portable(e: BaseException) -> BaseException | str:
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # an exception that does not pickle travels as text
        return f"{type(e).__name__}: {e}"


def resolve(accelerator: Any = None, *, cpu: bool | None = None) -> Dist:
    """The :class:`Dist` for ``accelerator``.

    ``None``: an ``Accelerator`` when launched with several processes (``torchrun``,
    ``accelerate launch``), else a plain single process. ``True``: always an ``Accelerator``
    (picks the GPU when there is one). ``False``: a plain single process. An
    ``accelerate.Accelerator`` or a :class:`Dist` is used as given. ``cpu``: passed to a new
    ``Accelerator`` (force CPU); by default True exactly when several processes were launched on a
    machine without a GPU (accelerate then uses gloo; without it, it would fall back to one
    process each).
    """
    if isinstance(accelerator, Dist):
        return accelerator
    if accelerator is False or (accelerator is None and not launched_distributed()):
        return Dist(None)
    if accelerator is None or accelerator is True:
        from accelerate import Accelerator
        from accelerate.state import PartialState

        if cpu is None and PartialState._shared_state != {}:
            return Dist(Accelerator())  # accelerate is already set up in this process: join it
        if cpu is None:
            # accelerate sets up several CPU processes (gloo) only when told to use the CPU
            cpu = launched_distributed() and not _has_accelerator_device()
        return Dist(Accelerator(cpu=cpu))
    if not hasattr(accelerator, "num_processes") or not hasattr(accelerator, "process_index"):
        raise TypeError(f"accelerator= must be an accelerate.Accelerator, True/False or None, "
                        f"not {type(accelerator).__name__}")
    return Dist(accelerator)


def _has_accelerator_device() -> bool:
    acc = getattr(torch, "accelerator", None)
    if acc is not None and hasattr(acc, "is_available"):
        return bool(acc.is_available())
    return torch.cuda.is_available()


# -- data -------------------------------------------------------------------------------------------
def shard_reference_loader(loader: torch.utils.data.DataLoader, dist: Dist) -> torch.utils.data.DataLoader:
    """Process ``dist.rank``'s share of a map-style reference loader, without padding.

    ``even_batches=False``: with uneven shards some processes get one batch less instead of
    repeated samples, so sums and counts over all processes are exact. Batches stay on the CPU
    (the fingerprint hashes them there); the pass moves them to the device.
    """
    if not dist.active:
        return loader
    from accelerate.data_loader import prepare_data_loader

    return prepare_data_loader(
        loader, None, num_processes=dist.world, process_index=dist.rank, put_on_device=False,
        even_batches=False,
    )


def shard_training_loader(
    loader: torch.utils.data.DataLoader, dist: Dist, *, seed: int = 0
) -> torch.utils.data.DataLoader:
    """Process ``dist.rank``'s share of a (shuffled) training loader, as ``accelerator.prepare`` does.

    A seedable sampler makes every process draw the same permutation per epoch (call
    ``loader.set_epoch(epoch)``); ``even_batches=True`` repeats a few samples so every process
    takes the same number of optimizer steps (as DDP requires).
    """
    if not dist.active:
        return loader
    from accelerate.data_loader import prepare_data_loader

    return prepare_data_loader(
        loader, None, num_processes=dist.world, process_index=dist.rank, put_on_device=False,
        even_batches=True, use_seedable_sampler=True, data_seed=seed,
    )


def steps_per_epoch(loader: torch.utils.data.DataLoader, dist: Dist) -> int:
    """Optimizer steps per epoch on each process once :func:`shard_training_loader` has sharded
    ``loader`` (size a learning-rate schedule with it)."""
    return -(-len(loader) // dist.world)


# -- fine-tuning (purification) -----------------------------------------------------------------------
class GradientSync:
    """Average the gradients of ``params`` over processes: call after ``backward()``, before ``step()``.

    This is what DDP's reducer does (one flat all-reduce per call here, instead of overlapping
    buckets). Parameters without a gradient on some process count as zero there, so every
    process makes the same update.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], dist: Dist) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.dist = dist

    def __call__(self) -> None:
        if not self.dist.active or not self.params:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        flat = reduce(flat.to(self.dist.device), reduction="mean").to(flat.device)
        i = 0
        for p in self.params:
            n = p.numel()
            p.grad = flat[i : i + n].view_as(p).to(p.dtype).clone()
            i += n


def broadcast_module(module: torch.nn.Module, dist: Dist, src: int = 0) -> None:
    """Copy ``src``'s parameters and buffers to every process (DDP's start and final state)."""
    if not dist.active:
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            t.copy_(broadcast(t.detach().to(dist.device).clone(), from_process=src).to(t.device))


def _sharpness_aware(step: Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]], x: torch.Tensor,
                     y: torch.Tensor, params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                     sync: GradientSync, rho: float, adaptive: bool = False) -> None:
    """Replace the gradients of ``params`` by those at ``w + e`` and leave the weights at ``w``:
    SAM's ``e = rho g / ||g||``, or with ``adaptive`` ASAM's ``e = rho T^2 g / ||T g||`` with
    ``T = |w|`` elementwise (Kwon et al., 2021), so each weight moves in proportion to its size."""
    grads = [p.grad for p in params]
    if all(g is None for g in grads):
        return
    with torch.no_grad():
        scaled = [None if g is None else (p.abs() * g if adaptive else g) for p, g in zip(params, grads)]
        norm = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(t) for t in scaled if t is not None])).clamp_min(1e-12)
        moves = [None if t is None else (p.abs() * t if adaptive else t) * (rho / norm)
                 for p, t in zip(params, scaled)]
        for p, e in zip(params, moves):
            if e is not None:
                p.add_(e)
    optimizer.zero_grad(set_to_none=True)
    step(x, y)["loss"].backward()
    sync()  # averaged as the first gradient was: every process moves and steps alike
    with torch.no_grad():
        for p, e in zip(params, moves):
            if e is not None:
                p.sub_(e)


def finetune_loop(
    step: Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]],
    loader: torch.utils.data.DataLoader,
    optimizer: torch.optim.Optimizer,
    *,
    params: Iterable[torch.nn.Parameter],
    epochs: int,
    dist: Dist | None = None,
    scheduler: Any = None,
    device: torch.device | str | None = None,
    seed: int = 0,
    before_epoch: Callable[[int], None] | None = None,
    progress: bool = False,
    model: torch.nn.Module | None = None,
    batch_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    sam_rho: float = 0.0,
    sam_adaptive: bool = False,
) -> list[dict[str, float]]:
    """A training loop that runs the same on one or several processes (DDP semantics).

    Args:
        step: ``step(x, y)`` returns a dict of scalar loss tensors; its ``"loss"`` entry is
            back-propagated, every entry is averaged per sample into the history.
        loader: the full (unsharded, shuffled) training loader; it is sharded here with
            :func:`shard_training_loader`.
        params: the trainable parameters (their gradients are averaged over processes).
        before_epoch: called with the epoch index before each epoch (e.g. to re-solve s_t, to
            set train mode / freeze BatchNorm); it runs on every process.
        model: when given, rank 0's parameters and buffers are broadcast at the start and the end.
        batch_transform: applied to each batch of inputs (on ``device``) before ``step`` sees it,
            once per batch (e.g. random augmentation).
        sam_rho: > 0: sharpness-aware minimisation (Foret et al., 2021): each step uses the
            gradient taken at the weights moved by ``sam_rho`` along the normalised (averaged)
            gradient, then the weights move back and the optimizer steps from where they were.
            It costs a second forward and backward pass per step. ``sam_adaptive``: the move is
            ASAM's, scaled per weight by its magnitude (``sam_rho`` is then relative to it).

    Returns:
        One dict per epoch: ``epoch`` and the sample-weighted mean of each loss over all processes.
    """
    dist = dist or Dist(None)
    params = [p for p in params if p.requires_grad]
    loader = shard_training_loader(loader, dist, seed=seed)
    sync = GradientSync(params, dist)
    if model is not None:
        broadcast_module(model, dist)
    history: list[dict[str, float]] = []
    epoch_iter: Any = range(epochs)
    if progress and dist.is_main:
        from tqdm.auto import tqdm

        epoch_iter = tqdm(epoch_iter, desc="fine-tune", unit="epoch", leave=False)
    for epoch in epoch_iter:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        if before_epoch is not None:
            before_epoch(epoch)
        totals, n = _epoch(step, loader, optimizer, params, sync, scheduler=scheduler, device=device,
                           batch_transform=batch_transform, sam_rho=sam_rho, sam_adaptive=sam_adaptive)
        keys = sorted(totals)
        summed = dist.all_reduce(torch.tensor([totals[k] for k in keys] + [n], dtype=torch.float64))
        tot_n = max(float(summed[-1]), 1.0)
        history.append({"epoch": epoch + 1, **{k: float(v) / tot_n for k, v in zip(keys, summed[:-1])}})
    if model is not None:
        broadcast_module(model, dist)
    return history


def _epoch(step: Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]], loader: Any,
           optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], sync: Any, *, scheduler: Any,
           device: torch.device | str | None, batch_transform: Callable[[torch.Tensor], torch.Tensor] | None,
           sam_rho: float, sam_adaptive: bool) -> tuple[dict[str, float], int]:
    """One epoch over this process's shard (batches ``x (B, ...)``, ``y (B,)``); returns each
    loss summed over its samples, and the number of samples."""
    totals: dict[str, float] = {}
    n = 0
    for x, y in loader:
        if device is not None:
            x, y = x.to(device), y.to(device)
        if batch_transform is not None:
            x = batch_transform(x)
        losses = step(x, y)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        sync()
        if sam_rho > 0:
            _sharpness_aware(step, x, y, params, optimizer, sync, sam_rho, sam_adaptive)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        for key, v in losses.items():
            totals[key] = totals.get(key, 0.0) + float(v.detach()) * len(y)
        n += len(y)
    return totals, n
