"""Exact resume: every checkpoint carries the random number generator states of every process.

Lightning saves the model, optimizers, schedulers, loops and the train loader's position (a torchdata
``StatefulDataLoader``, which :class:`~tlkit.data.ImageDataModule` builds), but no random state: a run resumed from a
checkpoint draws different dropout masks (and, with ``num_workers=0``, different augmentations) than the run that
wrote it. :class:`RngStateCheckpoint` adds the global states of torch (CPU and CUDA), NumPy and Python of each
process to every checkpoint and puts them back when training resumes, so a resumed run is the same run as the
uninterrupted one (bit-identical on the CPU).

Under DDP only rank 0 writes the checkpoint, but each rank has its own states (Lightning seeds rank ``r``'s with
``seed + r`` by default, and ranks see different batches): the states of all ranks are gathered into the
checkpoint, and each rank restores its own.
"""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

# Lightning has the same collection as private helpers (lightning.fabric.utilities.seed._collect_rng_states); ours
# also keeps the NumPy state as a tensor, so the checkpoint loads with torch.load(weights_only=True).
RngStates = dict[str, Any]


def collect_rng_states() -> RngStates:
    """The global random states of this process: torch CPU, torch CUDA (every device), NumPy and Python.

    Returns:
        A dict of tensors, lists and numbers only (loadable with ``torch.load(weights_only=True)``).
    """
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, python_state, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "torch.cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached_gaussian],
        "python": [version, list(python_state), gauss],
    }


def set_rng_states(states: RngStates) -> None:
    """Put back the global random states that :func:`collect_rng_states` returned."""
    torch.set_rng_state(states["torch"])
    if states["torch.cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["torch.cuda"])
    kind, keys, pos, has_gauss, cached_gaussian = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached_gaussian))
    version, python_state, gauss = states["python"]
    random.setstate((version, tuple(python_state), gauss))


class RngStateCheckpoint(Callback):
    """Saves each process's random states in every checkpoint and restores them on resume (module docstring).

    ``TransferClassifier.configure_callbacks`` adds it, so recipes never list it. The states are put back at
    ``on_train_start``, after the sanity-check validation (which draws worker seeds from the global generator), so
    the first step after resuming draws what the uninterrupted run drew after the checkpoint was written.
    """

    def __init__(self) -> None:
        self._to_restore: list[RngStates] | None = None
        self._resuming = False
        self._loader_states: list[dict[str, Any]] = []

    def state_dict(self) -> dict[str, Any]:
        # Lightning builds the checkpoint dict on every rank (rank 0 alone writes it), so this gather is a
        # collective all ranks take part in.
        return {"per_rank": _gather_from_ranks(collect_rng_states())}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._to_restore = state_dict.get("per_rank")

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self._resuming = True
        fit_loop_state = checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {})
        self._loader_states = fit_loop_state.get("combined_loader", [])

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._resuming:
            restart_train_loader(trainer, self._loader_states)
            self._resuming, self._loader_states = False, []
        states, self._to_restore = self._to_restore, None
        if states is None:
            return
        if len(states) != trainer.world_size:
            rank_zero_warn(
                f"The checkpoint holds the random states of {len(states)} process(es), but this run has "
                f"{trainer.world_size}: the resumed run cannot repeat the random draws (dropout, augmentation) of the "
                f"run that wrote it. Resume with the same number of devices and nodes ({len(states)} processes) for "
                "an exact resume."
            )
            return
        set_rng_states(states[trainer.global_rank])


def restart_train_loader(trainer: L.Trainer, loader_states: list[dict[str, Any]]) -> None:
    """Start the resumed run's train iterator where the checkpointed run was: its epoch, and within it its position.

    Lightning 2.6 builds that iterator too early for an exact resume, twice over: before the sampler is told the
    epoch (``set_epoch`` runs only after a resumed run's first iterator is made, so with workers prefetching it
    draws the order of epoch 0), and, when ``trainer.estimated_stepping_batches`` was read before the restore (our
    ``configure_optimizers`` reads it to size the LR schedule), before the saved loader state is even loaded, which
    it then drops (Lightning-AI/pytorch-lightning#20550, fix proposed in #21765). So: set the epoch, load the saved
    position if the checkpoint was written mid-epoch (what Lightning's own restore does), and iterate afresh.
    Neither the data fetcher nor the pending loader states have a public accessor: the two private attributes used.
    """
    fit_loop = trainer.fit_loop
    loader = trainer.train_dataloader
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(fit_loop.epoch_progress.current.processed)  # the epoch Lightning's set_epoch will give
    if fit_loop.restarting and loader_states and hasattr(loader, "load_state_dict"):
        loader.load_state_dict(loader_states[0])
    fit_loop._combined_loader_states_to_load = []  # loaded here; a Lightning that loads them later must not
    fetcher = getattr(fit_loop, "_data_fetcher", None)
    if fetcher is not None:
        iter(fetcher)  # a new iterator, of this epoch, from the loaded position


def _gather_from_ranks(states: RngStates) -> list[RngStates]:
    if not (dist.is_available() and dist.is_initialized()):
        return [states]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, states)
    return gathered


__all__ = ["RngStateCheckpoint", "collect_rng_states", "set_rng_states"]
