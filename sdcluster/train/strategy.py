"""How the trained weights live on the ranks, chosen once from ``train.strategy``: replicated or sharded.

The trainer, checkpointer, validation and export ask the strategy (the :class:`Strategy` protocol; DDP and
FSDP are its two implementations, side by side) instead of branching on its name:

- :meth:`~Strategy.shard` runs on the models before the optimizer and the EMA see their parameters;
- :meth:`~Strategy.prepare` hands the models and the optimizer to accelerate (or not);
- :meth:`~Strategy.save` / :meth:`~Strategy.load` write and read what accelerate's ``save_state`` does not
  (collective, inside the checkpoint folder being built, so its files are in the manifest like any other);
- :meth:`~Strategy.gathered` is the run with plain, whole modules, for validation and the export.

**DDP** (the default) keeps a whole copy of the weights, gradients, optimizer state and EMA on every rank:
accelerate wraps the models and its ``save_state`` writes them.

**FSDP** shards parameters, gradients, optimizer state and the EMA over all ranks (torch's FSDP2,
``fully_shard``): each rank holds 1/N of them. Checkpoints are ``torch.distributed.checkpoint`` folders
(each rank writes its shards), which load on any number of ranks: DCP re-shards on load. We call
``fully_shard`` ourselves rather than through accelerate's ``FullyShardedDataParallelPlugin(fsdp_version=2)``:
accelerate (1.16) ignores the plugin on CPU processes (the state stays ``MULTI_CPU`` and ``prepare`` wraps the
model in DDP), so its FSDP path could not be run, and so not tested, where the suite runs; torch's FSDP2 runs
on CPU with gloo as on GPUs with NCCL, the same code on both.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import torch

from sdcluster.config import Config

if TYPE_CHECKING:
    from accelerate import Accelerator

    from sdcluster.train.trainer import Trainer

log = logging.getLogger("sdcluster")

SHARDED_DIR = "sharded"
"""The ``torch.distributed.checkpoint`` folder inside an FSDP run's ``step-N`` checkpoint."""


@runtime_checkable
class Strategy(Protocol):
    """How the trained weights live on the ranks; see the module docstring for when each part is asked."""

    name: ClassVar[str]
    shards: ClassVar[bool]
    """Whether the trained parameters are shards (``DTensor``): what the optimizer builders ask."""
    keeps_ema: ClassVar[bool]
    """Whether its checkpoint holds the EMA itself (sharded); else rank 0 writes ``ema.safetensors``."""

    def shard(self, models: list[torch.nn.Module], accelerator: Accelerator) -> None: ...
    def prepare(
        self, accelerator: Accelerator, models: list[torch.nn.Module], optimizer: torch.optim.Optimizer
    ) -> tuple[list[torch.nn.Module], torch.optim.Optimizer]: ...
    def save(self, t: Trainer, folder: Path) -> None: ...
    def load(self, t: Trainer, folder: Path) -> None: ...
    def gathered(self, t: Trainer) -> contextlib.AbstractContextManager[Trainer]: ...


class DDP:
    """Every rank holds the whole model; accelerate's DDP wrapper averages the gradients."""

    name: ClassVar[str] = "ddp"
    shards: ClassVar[bool] = False
    keeps_ema: ClassVar[bool] = False

    def __init__(self, cfg: Config | None = None) -> None:
        self.cfg = cfg

    def shard(self, models: list[torch.nn.Module], accelerator: Accelerator) -> None:
        """Nothing to shard: each rank keeps its whole replica."""

    def prepare(
        self, accelerator: Accelerator, models: list[torch.nn.Module], optimizer: torch.optim.Optimizer
    ) -> tuple[list[torch.nn.Module], torch.optim.Optimizer]:
        *prepared, optimizer = accelerator.prepare(*models, optimizer)
        return prepared, optimizer

    def save(self, t: Trainer, folder: Path) -> None:
        """Nothing beyond ``save_state`` (models, optimizer) and the EMA file rank 0 writes."""

    def load(self, t: Trainer, folder: Path) -> None:
        """Nothing beyond ``load_state`` and the EMA file."""

    @contextlib.contextmanager
    def gathered(self, t: Trainer) -> Iterator[Trainer]:
        yield t  # already whole on every rank


class FSDP:
    """Parameters, gradients, optimizer state and EMA sharded over all ranks (FSDP2, ``fully_shard``).

    Each down/mid/up block of the denoiser is its own unit (gathered for its forward and backward, then freed
    again), the rest of the denoiser the root unit: peak memory is the shards plus one block's whole weights.
    """

    name: ClassVar[str] = "fsdp"
    shards: ClassVar[bool] = True
    keeps_ema: ClassVar[bool] = True

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.plain: dict[int, type[torch.nn.Module]] = {}  # id(model) -> its class before fully_shard

    def _mesh(self, accelerator: Accelerator) -> Any:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        if not dist.is_initialized():
            # One process: accelerate starts no process group, but a mesh needs one. A one-rank FSDP run
            # shards nothing and writes the same checkpoint format, so it resumes a run of N ranks and back.
            # FSDP's collectives run on the mesh's device: NCCL for CUDA tensors (gloo has no reduce-scatter
            # for them), gloo for CPU ones (the checkpoint's own collectives).
            cuda = accelerator.device.type == "cuda"
            backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
            log.info("train.strategy=fsdp on one process: nothing is sharded (checkpoints re-shard on load)")
        return init_device_mesh(accelerator.device.type, (accelerator.num_processes,))

    def shard(self, models: list[torch.nn.Module], accelerator: Accelerator) -> None:
        from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

        mesh = self._mesh(accelerator)
        # Offloading to the CPU what already is on the CPU would only copy: a no-op on CPU-only nodes.
        offload = self.cfg.train.fsdp_offload and accelerator.device.type != "cpu"
        kwargs: dict[str, Any] = {"mesh": mesh}
        if offload:
            kwargs["offload_policy"] = CPUOffloadPolicy()
        for model in models:
            self.plain[id(model)] = type(model)
            for block in _blocks(model):
                fully_shard(block, **kwargs)
            fully_shard(model, **kwargs)

    def prepare(
        self, accelerator: Accelerator, models: list[torch.nn.Module], optimizer: torch.optim.Optimizer
    ) -> tuple[list[torch.nn.Module], torch.optim.Optimizer]:
        """The sharded models as they are; the optimizer in accelerate's wrapper only (it skips steps inside
        gradient accumulation), not registered: ``save_state`` would pickle rank 0's shards as the whole."""
        from accelerate.optimizer import AcceleratedOptimizer

        return models, AcceleratedOptimizer(optimizer, device_placement=False, scaler=None)

    def _state(self, t: Trainer) -> dict[str, Any]:
        """What DCP writes and reads: the shards of what the method trains (the denoiser's weights, or only
        its adapters: a LoRA checkpoint leaves out the frozen base, which the run reloads from the model),
        of the optimizer and of the EMA."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        model = t.models[0]
        state: dict[str, Any] = {
            "model": get_model_state_dict(model, options=StateDictOptions(ignore_frozen_params=True)),
            # a fresh optimizer gets its (zero) state here first, so a load has tensors to load into
            "optim": get_optimizer_state_dict(model, t.optimizer.optimizer),
        }
        if t.ema is not None:
            state["ema"] = dict(zip(t.param_names, t.ema.shadow_params, strict=True))
        return state

    def save(self, t: Trainer, folder: Path) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(self._state(t), checkpoint_id=str(folder / SHARDED_DIR))

    def load(self, t: Trainer, folder: Path) -> None:
        """Load into this run's shards; DCP re-shards a checkpoint written by another number of ranks."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        if not (folder / SHARDED_DIR).is_dir():
            raise FileNotFoundError(f"no {SHARDED_DIR}/ (saved with train.strategy=ddp?)")
        state = self._state(t)
        dcp.load(state, checkpoint_id=str(folder / SHARDED_DIR))  # EMA shards are loaded in place
        # not strict: the keys are the trained ones _state asked DCP for (DCP refuses a checkpoint lacking
        # any), the frozen ones are left out on purpose
        set_model_state_dict(t.models[0], state["model"], options=StateDictOptions(strict=False))
        set_optimizer_state_dict(t.models[0], t.optimizer.optimizer, state["optim"])

    @contextlib.contextmanager
    def gathered(self, t: Trainer) -> Iterator[Trainer]:
        """The run with a whole, plain copy of the denoiser (and its EMA) on every rank; collective.

        Validation splits its work unevenly over the ranks and the export runs on rank 0 alone, so neither
        can run the sharded model (each of its forwards is a collective). The copy costs one whole denoiser
        per rank while it exists, as in DDP; its weights equal the unsharded ones exactly (a gather only).
        """
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sharded = t.models[0]
        full = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True))
        plain = self.plain[id(sharded)].from_config(sharded.config)
        t.method.adapt(plain)  # the same adapters as the sharded denoiser, if the method adds any
        plain.load_state_dict(full)
        plain.to(t.accelerator.device)
        del full
        params = [plain.get_parameter(name) for name in t.param_names]
        ema = None
        if t.ema is not None:
            from sdcluster.train.ema import LerpEMA

            ema = LerpEMA(params, decay=t.ema.decay, foreach=True)
            ema.shadow_params = [s.full_tensor() for s in t.ema.shadow_params]
            ema.optimization_step = t.ema.optimization_step
        yield dataclasses.replace(t, denoiser=plain, models=[plain], params=params, ema=ema)


def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The denoiser's down, mid and up blocks (diffusers' UNets name them so): FSDP's units below the root."""
    found = [*getattr(model, "down_blocks", []), *getattr(model, "up_blocks", [])]
    mid = getattr(model, "mid_block", None)
    return found + ([mid] if mid is not None else [])


STRATEGIES: dict[str, type[DDP] | type[FSDP]] = {DDP.name: DDP, FSDP.name: FSDP}
"""``train.strategy`` -> the strategy's class."""


def make_strategy(cfg: Config) -> Strategy:
    """The strategy ``train.strategy`` names (the schema allows only these names)."""
    return STRATEGIES[cfg.train.strategy](cfg)
