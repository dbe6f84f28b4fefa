"""The table in docs/performance.md that says which recipe fits which GPU: each cell is the memory plan of its
config, and the doc holds what ``python -m benchmarks.recipe_table`` prints now (it cannot go stale)."""

from __future__ import annotations

from pathlib import Path

from benchmarks.published_configs import parameter_counts, write_config_folder
from benchmarks.recipe_table import (
    HEADROOM_GIB,
    base_overrides,
    cheapest_in_cell,
    doc_block,
    plan_cells,
    table,
)
from sdcluster.plan.budget import GIB
from sdcluster.plan.fit import plan_config
from tests.conftest import compose


def _row(model: str, method: str, gpus: int) -> list[str]:
    """The cells of one row of the doc's table, by column."""
    head = f"| {model} | {method} | {gpus} |"
    line = next(line for line in doc_block().splitlines() if line.startswith(head))
    return [cell.strip() for cell in line.strip("|").split("|")][3:]


def test_the_published_configs_have_the_published_sizes(tmp_path: Path) -> None:
    """Counted on the meta device: SDXL base 1.0's UNet, CLIP-L and OpenCLIP-bigG as published."""
    counts = parameter_counts(write_config_folder("sdxl", tmp_path / "sdxl"))
    millions = {part: round(n / 1e6, 1) for part, n in counts.items()}
    assert millions == {"unet": 2567.5, "vae": 83.7, "text_encoder": 123.1, "text_encoder_2": 694.7}


def test_a_cell_is_the_plan_of_its_config_with_the_changes_it_names(tmp_path: Path) -> None:
    """Full SDXL on 4 GPUs of 24 GiB: the cell's changes, composed as a user would type them, plan to the
    bytes the cell shows, fit the budget, and the config without them does not; the doc says the same."""
    write_config_folder("sdxl", tmp_path / "sdxl")
    budget = (24 - HEADROOM_GIB) * GIB
    base = plan_cells(tmp_path, "SDXL", "full")[4]
    cell = cheapest_in_cell(base, budget)
    assert base.plan.peak > budget and cell.overrides, "the cell needs a change to fit"
    planned = plan_config(compose(base_overrides(tmp_path, "SDXL", "full", 4) + list(cell.overrides)))
    assert planned is not None and planned.cfg.cluster.world_size == 4
    assert planned.plan.parts == cell.plan.parts
    assert planned.plan.peak <= budget
    assert _row("SDXL", "full", 4)[0] == cell.text()
    assert f"({planned.plan.peak / GIB:.1f} GiB)" in cell.text()


def test_the_doc_holds_the_table_the_script_prints_now() -> None:
    assert doc_block() == table(), (
        "docs/performance.md's recipe table is stale: python -m benchmarks.recipe_table --write"
    )
