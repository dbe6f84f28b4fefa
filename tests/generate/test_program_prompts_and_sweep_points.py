"""A prompt program replaces the demo's default prompts (typed prompts still join it), and a sweep's dry run
lists every point with its folders and image count."""

from __future__ import annotations

from pathlib import Path

from sdcluster import paths
from sdcluster.config.data import SAMPLE_PROMPTS
from sdcluster.generate.plan_count import count_plan
from sdcluster.sweep.points import Point, submit_sweep
from tests.conftest import compose

PROGRAM = "slots: {colour: [red, blue]}\ntemplates: ['a {colour} shirt']\n"


def test_a_program_replaces_the_default_prompts_and_typed_prompts_join_it(tmp_path: Path) -> None:
    program = tmp_path / "program.yaml"
    program.write_text(PROGRAM)
    alone = compose([f"generate.prompts_file={program}", "generate.num_images=1"])
    assert alone.generate.prompts == []
    assert count_plan(alone.generate).total == 2, "the program's two prompts, no jeans"
    typed = compose([f"generate.prompts_file={program}", "generate.prompts=[a hat]", "generate.num_images=1"])
    assert typed.generate.prompts == ["a hat"] and count_plan(typed.generate).total == 3
    lines = tmp_path / "prompts.txt"  # a plain list of lines is not a program: it still adds to the defaults
    lines.write_text("a hat\n")
    listed = compose([f"generate.prompts_file={lines}"])
    assert listed.generate.prompts == list(SAMPLE_PROMPTS)


def test_a_sweep_dry_run_lists_every_point_with_its_folders_and_images(tmp_path: Path) -> None:
    roots = [f"output_root={tmp_path / 'out'}", f"jobs_root={tmp_path / 'jobs'}", "launch.dry_run=true"]
    data = "data.path=" + str(Path(__file__).resolve().parents[2] / "sdcluster/assets/sample_data")
    swept = [("optim.lr=1e-4", "generate.num_images=1"), ("optim.lr=5e-5", "generate.num_images=3")]
    points = [Point(compose([*roots, data, "generate.shards=2", *o]), list(o)) for o in swept]
    said: list[str] = []
    assert submit_sweep(points, said.append) == 0
    text = "\n".join(said)
    prompts = len(SAMPLE_PROMPTS)
    for i, (point, images) in enumerate(zip(points, (1, 3), strict=True)):
        assert f"point {i} {{'generate.num_images': '{images}', 'optim.lr': '{swept[i][0][9:]}'}}" in said
        assert f"  run folder: {paths.run_dir(point.cfg)}" in said
        assert f"{paths.generation_dir(point.cfg)} ({prompts * images:,} images over 2 shards)" in text
    assert not (tmp_path / "jobs").exists() and not (tmp_path / "out").exists()
