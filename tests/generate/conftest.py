"""Shared generation test material: a small prompt program and the folder it makes on the tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdcluster.config import Config, GenerateConfig
from sdcluster.generate.job import generate_images

PROGRAM = """
slots:
  wash: [light, dark]
  view: [front, back]
templates:
  - text: "a pair of {wash} denim jeans, viewed from the {view}"
    images: 1
    negative: "blurry, text"
  - text: "{wash} denim, folded"
    count: 2
    guidance_scale: 3.0
    steps: 3
"""


def write_program(folder: Path, text: str = PROGRAM, name: str = "program.yaml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def program_cfg(root: Path, model: Path, program: Path, **gen: object) -> Config:
    """The small program on the tiny model: 4 + 2 images, 2 steps (template 1: 3), 64 px."""
    settings: dict = dict(prompts=[], prompts_file=str(program), num_images=1, steps=2, height=64, width=64)
    settings.update(gen)
    return Config(generate=GenerateConfig(model=str(model), **settings), output_root=str(root))


@pytest.fixture(scope="module")
def program(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_program(tmp_path_factory.mktemp("program"))


@pytest.fixture(scope="module")
def made(tiny_model: Path, program: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The program at the default batch size (4), one shard: what the other tests compare against."""
    result = generate_images(program_cfg(tmp_path_factory.mktemp("made"), tiny_model, program))
    assert (result.generated, result.total) == (6, 6)
    return result.out_dir
