"""Every journey guide in docs/guides/ runs as written (docs/architecture.md: "How the guides are tested")."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.docs.guide_runner import GUIDES, MAX_SKIPS, blocks, reader_home, run_guide, substitute

ON_SLURM = {"finetune-sd15.md", "sweep-learning-rates.md"}
"""Guides whose promise is the cluster itself: run on the suite's SLURM sandbox; the rest run locally."""

LOCAL = sorted(p.name for p in GUIDES.glob("*.md") if p.name not in ON_SLURM)


def test_every_guide_has_commands_and_few_skips() -> None:
    guides = sorted(GUIDES.glob("*.md"))
    assert len(guides) >= 6, "one guide per journey"
    assert {p.name for p in guides} >= ON_SLURM
    skips = []
    for guide in guides:
        found = blocks(guide)
        assert [b for b in found if not b.skip], f"{guide.name} has no ```bash block the suite runs"
        skips += [f"{guide.name}: {b.skip}" for b in found if b.skip]
    assert len(skips) <= MAX_SKIPS, f"too many untested blocks: {skips}"


def test_substitution_shrinks_every_launch_and_keeps_what_a_line_sets() -> None:
    code = (
        "sdcluster launch +cluster=slurm experiment=sd15_full train.max_steps=4 \\\n"
        "    optim.lr=1e-5  # a comment\nsdcluster logs\n"
    )
    local = substitute(code, slurm=False, dry_run=True)
    first, second = local.splitlines()
    assert "+cluster=slurm" not in first and "model=tiny" in first
    assert "train.max_steps=4" in first and "train.max_steps=2" not in first  # the guide's own value
    assert first.index("launch.dry_run=true") < first.index("# a comment")  # not swallowed by the comment
    assert second == "sdcluster logs"
    on_slurm = substitute(code, slurm=True, dry_run=False)
    assert "+cluster=slurm" in on_slurm and "launch.wait=true" in on_slurm and "dry_run" not in on_slurm


@pytest.mark.slow
@pytest.mark.parametrize("name", LOCAL)
def test_guide_runs_on_the_local_executor(
    name: str, tmp_path: Path, cache_root: Path, tiny_model: Path
) -> None:
    run_guide(GUIDES / name, reader_home(tmp_path, cache_root))


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ON_SLURM))
def test_guide_runs_on_the_cluster(
    name: str, tmp_path: Path, cache_root: Path, tiny_model: Path, slurm_cluster: object
) -> None:
    run_guide(GUIDES / name, reader_home(tmp_path, cache_root), slurm=True)
