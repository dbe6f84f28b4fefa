"""Which recipe fits which GPU: the memory plan of SD 1.x and SDXL, full and LoRA, on 1, 4 and 8 GPUs.

    python -m benchmarks.recipe_table           # print the Markdown table
    python -m benchmarks.recipe_table --write   # and put it into docs/performance.md, between its markers

Each cell is the memory plan (:mod:`sdcluster.plan`) of SD 1.5's or SDXL base 1.0's published component
configs (:mod:`benchmarks.published_configs`, no hub and no weights needed) at the family's native
resolution, micro-batch 1, bf16 mixed precision, one node: as is (DDP, AdamW, no gradient checkpointing;
EMA on for a full fine-tune as in ``experiment=sd15_full``, none for LoRA as in ``experiment=sdxl_lora``)
when that fits, else the cheapest change that fits in the plan's own order
(:func:`sdcluster.plan.fit.candidates`: gradient checkpointing, EMA offload, a leaner optimizer, FSDP, its
CPU offload), each alone, then combined (:func:`cheapest_in_cell`). Changes that leave the cell (more GPUs,
LoRA for a full fine-tune) are not counted: a cell is that method on that many GPUs, or "does not fit".
bf16 rather than the recipes' fp16, because FSDP refuses fp16; the plan counts both half types alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks.published_configs import write_config_folder

if TYPE_CHECKING:  # the plan imports diffusers when it plans; the module itself stays light
    from sdcluster.config import Config
    from sdcluster.plan.budget import Plan
    from sdcluster.plan.fit import Planned

DOC = Path(__file__).resolve().parents[1] / "docs" / "performance.md"
BEGIN = "<!-- recipe-table: begin (python -m benchmarks.recipe_table --write) -->"
END = "<!-- recipe-table: end -->"

MODELS = {"SD 1.x": ("sd15", 512), "SDXL": ("sdxl", 1024)}
"""Row label -> (folder of :data:`benchmarks.published_configs.PUBLISHED`, native resolution)."""
METHODS = {"full": ["train.use_ema=true"], "LoRA": ["train.method=lora"]}
GPUS = (1, 4, 8)
CARDS_GIB = (24, 40, 80, 141)
HEADROOM_GIB = 1
"""Left to the CUDA context and the allocator, as docs/performance.md advises for ``cluster.gpu_mem_gb``."""


@dataclass(frozen=True)
class Cell:
    """The cheapest setting of one cell: the overrides added to its base config, and their plan."""

    base: str
    """The base config's strategy and optimizer (``ddp + adamw``), what a cell without changes says."""
    overrides: tuple[str, ...]
    plan: Plan | None
    """The :class:`sdcluster.plan.budget.Plan` of the base config with :attr:`overrides`; None: none fits."""

    def text(self) -> str:
        if self.plan is None:
            return "does not fit"
        what = " + ".join(_short(o) for o in self.overrides) or self.base
        return f"{what} ({self.plan.peak / 1024**3:.1f} GiB)"


def _short(override: str) -> str:
    """``train.ema_offload=true`` -> ``ema offload``, ``optim=adamw8bit`` -> ``adamw8bit``."""
    key, value = override.split("=", 1)
    return key.rsplit(".", 1)[-1].replace("_", " ") if value == "true" else value


def base_overrides(folder: Path, model: str, method: str, gpus: int) -> list[str]:
    """The overrides of a cell's config before any change (see the module docstring)."""
    name, resolution = MODELS[model]
    return [
        f"model={name}",  # its name and native resolution (conf/model/)
        f"model.path={folder / name}",
        f"train.resolution={resolution}",
        "train.batch_size=1",
        "train.mixed_precision=bf16",
        *METHODS[method],
        "+cluster=slurm",
        f"cluster.gpus_per_node={gpus}",
    ]


def _overrides(labels: list[str]) -> tuple[str, ...]:
    """The ``key=value`` overrides of the candidates' labels, a later value of a key replacing an earlier."""
    keys: dict[str, str] = {}
    for label in labels:
        for token in label.split():
            key, _, value = token.partition("=")
            keys.pop(key, None)
            keys[key] = value
    return tuple(f"{k}={v}" for k, v in keys.items())


def cheapest_in_cell(planned: Planned, budget: int) -> Cell:
    """``planned`` as is when it fits ``budget``, else the cheapest of the plan's candidate changes
    (:func:`sdcluster.plan.fit.candidates`, cheapest first) that fits on the same GPUs with the same method:
    each alone in the plan's order, then combinations (:func:`_combinations`).

    Not :func:`sdcluster.plan.fit.cheapest_fit` itself: it also offers more GPUs and LoRA, which would leave
    the cell, and it combines greedily, keeping every change the schema accepts; a kept ``optim=adafactor``
    then makes every later ``train.strategy=fsdp`` refused (the schema forbids the pair), so full SDXL on
    24 GiB GPUs would find no fit although checkpointing with FSDP fits."""
    from sdcluster.plan.fit import candidates

    cfg = planned.cfg
    base = f"{cfg.train.strategy} + {cfg.optim.name}"
    if planned.plan.peak <= budget:
        return Cell(base, (), planned.plan)
    kept = []
    for label, change in candidates(cfg):
        changed = _safe(change, cfg)
        same = changed.cluster.world_size == cfg.cluster.world_size
        if changed is not cfg and same and changed.train.trains_adapters == cfg.train.trains_adapters:
            kept.append((label, change))
    for combo in _combinations(len(kept)):
        changed = cfg
        for i in combo:
            changed, before = _safe(kept[i][1], changed), changed
            if changed is before:  # refused with the changes before it
                break
        else:
            fitted = _plan_if_valid(planned, changed)
            if fitted is not None and fitted.peak <= budget:
                return Cell(base, _overrides([kept[i][0] for i in combo]), fitted)
    return Cell(base, (), None)


def _combinations(n: int) -> list[tuple[int, ...]]:
    """Indices of ``n`` changes ordered cheapest first: each alone in order (as ``cheapest_fit`` tries
    them), then every larger set by its most expensive change, then by size, then lexicographically."""
    sets = [c for size in range(2, n + 1) for c in itertools.combinations(range(n), size)]
    return [(i,) for i in range(n)] + sorted(sets, key=lambda c: (c[-1], len(c), c))


def _safe(change: Callable[[Config], Config], cfg: Config) -> Config:
    from sdcluster.config import ConfigError

    try:
        return change(cfg)
    except ConfigError:  # the schema refuses this change with the rest of the config (FSDP with LoRA)
        return cfg


def _plan_if_valid(planned: Planned, cfg: Config) -> Plan | None:
    """The plan of ``cfg``, or None when the launch's checks across groups would refuse it."""
    from sdcluster.config import ConfigError, check_config

    try:
        check_config(cfg)
        return planned.again(cfg)
    except ConfigError:
        return None


def plan_cells(folder: Path, model: str, method: str) -> dict[int, Planned]:
    """The plan of each GPU count's base config (the model's components counted once)."""
    from sdcluster.compose import compose
    from sdcluster.config import check_config
    from sdcluster.plan.fit import plan_config

    first = plan_config(compose(base_overrides(folder, model, method, GPUS[0])))
    assert first is not None, "the published configs are written before planning"
    cells = {}
    for gpus in GPUS:
        cfg = compose(base_overrides(folder, model, method, gpus))
        check_config(cfg)  # a base the launch refuses would make every change look refused
        cells[gpus] = dataclasses.replace(first, cfg=cfg, plan=first.again(cfg))
    return cells


def build(folder: Path) -> tuple[list[list[str]], list[str]]:
    """The table's rows and its generated notes (the activation estimates the cells rest on)."""
    from sdcluster.plan.budget import GIB

    for name, _ in MODELS.values():
        write_config_folder(name, folder / name)
    rows, notes = [], []
    for model, (_, resolution) in MODELS.items():
        for method in METHODS:
            planned = plan_cells(folder, model, method)
            for gpus, base in planned.items():
                cells = [cheapest_in_cell(base, (gib - HEADROOM_GIB) * GIB) for gib in CARDS_GIB]
                rows.append([model, method, str(gpus), *(c.text() for c in cells)])
            one = planned[GPUS[0]]
            if method == next(iter(METHODS)):
                notes.append(_activation_note(model, resolution, one))
    return rows, notes


def _activation_note(model: str, resolution: int, planned: Planned) -> str:
    """The plan's activation bytes for ``model`` with gradient checkpointing off and on."""
    from sdcluster.plan.budget import GIB

    parts = []
    for on in (False, True):
        train = dataclasses.replace(planned.cfg.train, gradient_checkpointing=on)
        acts = planned.again(dataclasses.replace(planned.cfg, train=train)).activations
        how = "with" if on else "without"
        parts.append(f"{acts.bytes / GIB:.2f} GiB {how} gradient checkpointing ({acts.basis})")
    return f"{model} at {resolution} px: " + "; ".join(parts)


def render(rows: list[list[str]], notes: list[str]) -> str:
    """The Markdown block between the doc's markers."""
    header = ["model", "method", "GPUs", *(f"{gib} GiB GPU" for gib in CARDS_GIB)]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", "Activations per micro-step, as the plan estimates them:", ""]
    lines += [f"- {note}" for note in notes]
    return "\n".join(lines)


def write_doc(block: str, doc: Path = DOC) -> None:
    """Replace what is between the markers of ``doc`` with ``block``."""
    text = doc.read_text()
    head, sep, rest = text.partition(BEGIN)
    _, sep2, tail = rest.partition(END)
    if not sep or not sep2:
        raise SystemExit(f"{doc}: the markers {BEGIN!r} and {END!r} are missing")
    doc.write_text(f"{head}{BEGIN}\n{block}\n{END}{tail}")


def doc_block(doc: Path = DOC) -> str:
    """What is between the markers of ``doc`` now."""
    return doc.read_text().partition(BEGIN)[2].partition(END)[0].strip("\n")


def table() -> str:
    with tempfile.TemporaryDirectory() as folder:
        return render(*build(Path(folder)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.recipe_table", description=__doc__)
    parser.add_argument("--write", action="store_true", help=f"also write it into {DOC.name}")
    args = parser.parse_args(argv)
    block = table()
    print(block)
    if args.write:
        write_doc(block)
        print(f"wrote {DOC}", file=sys.stderr)


if __name__ == "__main__":
    main()
