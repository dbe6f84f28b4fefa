"""A prompt program's per-template ``width`` and ``height`` (any multiples of 8, e.g. an aspect-ratio bucket's
size) reach the pipeline: each image has its template's size, a template without one keeps generate's."""

from __future__ import annotations

import pytest
from PIL import Image

from sdcluster.config import ConfigError
from sdcluster.generate import records
from sdcluster.generate.job import generate_images
from sdcluster.generate.prompts import load_program
from tests.generate.conftest import program_cfg, write_program

PROGRAM = """
templates:
  - text: "a pair of jeans, portrait"
    width: 48
    height: 80
  - text: "a pair of jeans, landscape"
    width: 80
    height: 48
  - text: "a pair of jeans, square"
"""


@pytest.mark.slow
def test_each_template_makes_images_of_its_own_size(tiny_model, tmp_path):
    program = write_program(tmp_path, PROGRAM)
    result = generate_images(program_cfg(tmp_path / "out", tiny_model, program, batch_size=4))
    assert (result.generated, result.total) == (3, 3)
    sizes = {}
    for record in records.read_image_manifest(result.out_dir):
        with Image.open(result.out_dir / record["file"]) as image:
            assert image.size == (record["width"], record["height"])
            sizes[record["prompt"].split(", ")[1]] = image.size
    assert sizes == {"portrait": (48, 80), "landscape": (80, 48), "square": (64, 64)}


def test_a_template_size_that_is_not_a_multiple_of_8_is_refused(tiny_model, tmp_path):
    program = write_program(tmp_path, 'templates:\n  - text: "jeans"\n    width: 60\n')
    with pytest.raises(ConfigError, match="width must be a multiple of 8, got 60"):
        load_program(program_cfg(tmp_path / "out", tiny_model, program).generate)
