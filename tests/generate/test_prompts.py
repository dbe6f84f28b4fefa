"""Prompt programs: expansion, weighted draws, login-node errors, per-template settings, records and remake.

The whole-job tests run a 6-image program on the tiny model (2 steps, 64 px). Across shard counts the bytes
must match; across batch sizes the records must match and the pixels agree up to batched-kernel rounding
(see test_generate.py's docstring).
"""

from __future__ import annotations

import json
import shlex
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sdcluster
from sdcluster.cluster.preflight import check_generation_inputs
from sdcluster.config import Config, ConfigError, GenerateConfig
from sdcluster.generate import records
from sdcluster.generate.batches import cut_batches, shard
from sdcluster.generate.job import generate_images
from sdcluster.generate.plan import plan_items
from sdcluster.generate.prompts import Sampling, check_program, expand, load_program
from sdcluster.generate.render import load_pipeline, render
from tests.conftest import compose
from tests.generate.conftest import PROGRAM, program_cfg, write_program


def gen_of(tmp_path: Path, text: str, **gen: object) -> GenerateConfig:
    return GenerateConfig(prompts=[], prompts_file=str(write_program(tmp_path, text)), **gen)


def test_full_product_labels_and_template_settings(tmp_path: Path) -> None:
    gen = gen_of(tmp_path, PROGRAM, negative_prompt="ugly", guidance_scale=7.0, steps=9, num_images=2)
    prompts = expand(load_program(gen), gen)
    assert [p.text for p in prompts[:4]] == [
        f"a pair of {w} denim jeans, viewed from the {v}"
        for w in ("light", "dark")
        for v in ("front", "back")
    ]
    assert [dict(p.labels) for p in prompts[:2]] == [
        {"wash": "light", "view": "front"},
        {"wash": "light", "view": "back"},
    ]
    assert [p.template_index for p in prompts] == [0, 0, 0, 0, 1, 1]
    assert {p.sampling for p in prompts[:4]} == {Sampling("blurry, text", 7.0, 9)}
    assert {p.sampling for p in prompts[4:]} == {Sampling("ugly", 3.0, 3)}  # negative inherited
    assert [p.images for p in prompts] == [1, 1, 1, 1, 2, 2]  # `images` per template, else num_images
    assert all(dict(p.labels).keys() == {"wash"} for p in prompts[4:])  # only the slots a template uses

    items = plan_items(Config(generate=gen))
    assert [i.file for i in items[-4:]] == [
        "p0004-i0000.png",
        "p0004-i0001.png",
        "p0005-i0000.png",
        "p0005-i0001.png",
    ]


def test_the_shipped_example_program_expands() -> None:
    example = Path(sdcluster.__file__).parent / "assets" / "prompts" / "jeans.yaml"
    gen = GenerateConfig(prompts=[], prompts_file=str(example))
    items = plan_items(Config(generate=gen))
    assert len(items) == 16 and {i.template_index for i in items} == {0, 1}
    assert {dict(i.labels)["view"] for i in items if i.template_index == 0} == {"front", "back"}


def test_plain_prompts_and_text_file_are_literal_templates(tmp_path: Path) -> None:
    lines = tmp_path / "prompts.txt"
    lines.write_text("braces {kept} as written\n\nsecond\n")
    gen = GenerateConfig(prompts=["first"], prompts_file=str(lines), negative_prompt="n")
    prompts = expand(load_program(gen), gen)
    assert [(p.text, p.template_index, p.labels) for p in prompts] == [
        ("first", 0, ()),
        ("braces {kept} as written", 1, ()),
        ("second", 2, ()),
    ]
    assert {p.sampling for p in prompts} == {Sampling("n", 7.5, 20)}


def test_null_negative_overrides_the_default(tmp_path: Path) -> None:
    gen = gen_of(tmp_path, "templates:\n  - {text: plain, negative: null}\n  - other\n", negative_prompt="n")
    assert [p.sampling.negative_prompt for p in expand(load_program(gen), gen)] == [None, "n"]


WEIGHTED = """
slots:
  wash: {light: 3, dark: 1}
  view: [front, back]
templates:
  - text: "{wash} jeans"
    count: 400
"""


def test_weighted_draws_are_deterministic_and_follow_the_weights(tmp_path: Path) -> None:
    def draws(text: str, seed: int) -> list[str]:
        gen = gen_of(tmp_path, text, seed=seed)
        return [dict(p.labels)["wash"] for p in expand(load_program(gen), gen)]

    first = draws(WEIGHTED, 0)
    assert len(first) == 400 and first == draws(WEIGHTED, 0)
    share = Counter(first)["light"] / 400
    assert 0.68 < share < 0.82, share  # 3:1 weights; deterministic draws, so this never flakes
    assert draws(WEIGHTED, 1) != first  # generate.seed picks other draws
    # another slot used by the template gets its own draws and leaves these alone
    both = WEIGHTED.replace('"{wash} jeans"', '"{wash} jeans, {view}"')
    assert draws(both, 0) == first


def test_batches_keep_one_setting_and_do_not_depend_on_shards(tmp_path: Path) -> None:
    gen = gen_of(tmp_path, PROGRAM, num_images=3)
    items = plan_items(Config(generate=gen))
    batches = cut_batches(items, 4)
    assert [len(b) for b in batches] == [4, 4, 2]  # 4 images of template 0, then 2 x 3 of template 1
    assert all(len({i.sampling for i in b}) == 1 for b in batches)
    dealt = [b for k in range(3) for b in shard(items, k, 3, 4)]
    assert sorted(map(tuple, dealt), key=str) == sorted(map(tuple, batches), key=str)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "slots: {wash: [a]}\ntemplates: ['{colour} jeans']",
            r"template 0: unknown slot 'colour'.*Fix: define it",
        ),
        ("slots: {wash: []}\ntemplates: ['{wash}']", r"slot 'wash': has no values.*Fix"),
        ("slots: {wash: {a: 0}}\ntemplates: ['{wash}']", r"weight 0 of 'a' is not a positive number.*Fix"),
        ("slots: {wash: {a: x}}\ntemplates: ['{wash}']", r"weight 'x'.*Fix"),
        ("slots: {wash: [yes]}\ntemplates: ['{wash}']", r"value True is not text.*Fix: quote"),
        ("slots: {text: [a]}\ntemplates: ['{text}']", r"dataset column name.*Fix: rename"),
        ("templates: [{text: a, imgs: 2}]", r"template 0: unknown key\(s\) \['imgs'\].*Fix: use"),
        ("template: [a]", r"unknown key\(s\) \['template'\]"),
        ("templates: [{text: a}, {text: b, count: 0}]", r"template 1: count must be a whole number > 0"),
        ("templates: [{text: '{wash:>3}'}]", r"not a slot reference.*Fix"),
        ("templates: [{text: 'a'}", r"not valid YAML.*Fix: correct"),
        ("slots: {}\n", r"no `templates:` list"),
    ],
)
def test_program_errors_name_file_template_and_fix(tmp_path: Path, text: str, expected: str) -> None:
    path = write_program(tmp_path, text, "bad.yml")
    with pytest.raises(ConfigError, match=expected) as err:
        check_program(GenerateConfig(prompts=[], prompts_file=str(path)))
    assert str(path) in str(err.value) and "Fix:" in str(err.value)


def login_checks(overrides: list[str]) -> None:
    """Composed as the launcher composes it, then the launch's own check of the generation inputs."""
    check_generation_inputs(compose(overrides))


def test_login_node_refuses_a_bad_program_split_or_image_id(tmp_path: Path) -> None:
    bad = write_program(tmp_path, "templates: ['{nope}']", "bad.yaml")
    with pytest.raises(ConfigError, match=r"unknown slot 'nope'"):
        login_checks([f"generate.prompts_file={bad}"])
    good = write_program(tmp_path)
    with pytest.raises(ConfigError, match=r"generate.split.slot: 'colour' is not a slot"):
        login_checks(
            [f"generate.prompts_file={good}", "generate.split={by: slot, slot: colour, validation: [a]}"]
        )
    with pytest.raises(ConfigError, match=r"\['side'\] are not values of slot 'view'"):
        login_checks(
            [f"generate.prompts_file={good}", "generate.split={by: slot, slot: view, validation: [side]}"]
        )
    with pytest.raises(ConfigError, match=r"generate.only: 'p3-i1' is not an image id"):
        login_checks(["generate.only=p3-i1"])
    with pytest.raises(ConfigError, match=r"generate.only: p0006-i0000 is not in this plan"):
        login_checks([f"generate.prompts_file={good}", "generate.prompts=[]", "generate.only=p0006-i0000"])


# ---- on the tiny model ---------------------------------------------------------------------------------


def png_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in records.image_files(folder)}


def pixels(data: Path | bytes) -> np.ndarray:
    with Image.open(data) as image:
        return np.asarray(image.convert("RGB")).astype(np.int16)


@pytest.mark.slow
def test_records_carry_template_labels_and_what_remakes_the_bytes(made: Path, program: Path) -> None:
    rows = records.read_image_manifest(made)
    assert [r["file"] for r in rows] == [f"p000{p}-i0000.png" for p in range(6)]
    first, folded = rows[1], rows[4]
    assert (
        first["template_index"] == 0
        and first["template"] == "a pair of {wash} denim jeans, viewed from the {view}"
    )
    assert first["labels"] == {"wash": "light", "view": "back"}
    assert first["prompt"] == "a pair of light denim jeans, viewed from the back"
    assert (first["negative_prompt"], first["guidance_scale"], first["steps"]) == ("blurry, text", 7.5, 2)
    assert (folded["template_index"], folded["template"]) == (1, "{wash} denim, folded")
    assert (folded["negative_prompt"], folded["guidance_scale"], folded["steps"]) == (None, 3.0, 3)
    assert (first["scheduler"], first["width"], first["height"], first["generator"]) == (
        "ddim",
        64,
        64,
        "cpu",
    )
    device = f"cuda ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else "cpu"
    threads = torch.get_num_threads()
    assert (first["device"], first["dtype"], first["torch_threads"]) == (device, "float32", threads)
    assert set(first["versions"]) == {"torch", "diffusers", "transformers"}
    assert first["versions"]["torch"] == torch.__version__
    assert first["remake"].startswith("python -m sdcluster.launch task=generate ")
    assert "generate.only=p0001-i0000" in first["remake"] and str(program) in first["remake"]
    with Image.open(made / "p0004-i0000.png") as image:
        assert json.loads(image.text["sdcluster"]) == folded  # a copied image still says how it was made


@pytest.mark.slow
def test_template_settings_reach_the_pipeline(
    made: Path, tiny_model: Path, program: Path, tmp_path: Path
) -> None:
    """Template 1's two images, rendered as text prompts with its settings, give the job's pixels."""
    cfg = program_cfg(tmp_path, tiny_model, program)
    rows = records.read_image_manifest(made)[4:]
    pipe = load_pipeline(cfg)
    again = render(
        pipe,
        [r["prompt"] for r in rows],
        [r["seed"] for r in rows],
        cfg.generate,
        None,
        Sampling(None, 3.0, 3),
    )
    for row, image in zip(rows, again, strict=True):
        assert np.array_equal(np.asarray(image).astype(np.int16), pixels(made / row["file"]))
    other = render(pipe, [rows[0]["prompt"]] * 2, [rows[0]["seed"], rows[1]["seed"]], cfg.generate)
    assert not np.array_equal(np.asarray(other[0]).astype(np.int16), pixels(made / rows[0]["file"]))


@pytest.mark.slow
def test_two_shards_same_bytes_other_batch_same_images(
    made: Path, tiny_model: Path, program: Path, tmp_path: Path
) -> None:
    cfg = program_cfg(tmp_path / "shards", tiny_model, program, shards=2)
    first, second = generate_images(cfg, 0, 2), generate_images(cfg, 1, 2)
    assert first.generated + second.generated == 6
    # the last shard merged
    assert records.read_image_manifest(second.out_dir) == records.read_image_manifest(made)
    assert png_bytes(second.out_dir) == png_bytes(made)  # whole batches are dealt, so the bytes match

    two = generate_images(program_cfg(tmp_path / "batch2", tiny_model, program, batch_size=2)).out_dir
    assert two.name == made.name and records.read_image_manifest(two) == records.read_image_manifest(made)
    for name in png_bytes(two):
        diff = np.abs(pixels(made / name) - pixels(two / name))
        assert diff.max() <= 2 and (diff > 0).mean() < 0.01, (name, diff.max())


@pytest.mark.slow
def test_remake_command_reproduces_the_bytes(made: Path, tmp_path: Path, cache_root: Path) -> None:
    record = records.read_image_manifest(made)[5]
    words = shlex.split(record["remake"])
    assert words[:3] == ["python", "-m", "sdcluster.launch"]
    cfg = compose([*words[3:], f"output_root={tmp_path}", f"cache_root={cache_root}"])
    assert (cfg.task, cfg.generate.only) == ("generate", "p0005-i0000")
    result = generate_images(cfg)
    assert result.out_dir != made and (result.generated, result.total) == (1, 1)
    assert [p.name for p in records.image_files(result.out_dir)] == [record["file"]]
    assert (result.out_dir / record["file"]).read_bytes() == (made / record["file"]).read_bytes()
    assert records.read_image_manifest(result.out_dir) == [record]


def test_remake_command_survives_quotes_and_interpolation_syntax(tmp_path: Path, tiny_model: Path) -> None:
    from sdcluster.generate.plan import remake_command

    prompts = ['a "quoted" prompt, with a comma', "back\\slash and ${oc.env:HOME} and it's"]
    cfg = Config(generate=GenerateConfig(prompts=prompts, model=str(tiny_model), negative_prompt="x'\""))
    command = remake_command(cfg, plan_items(cfg)[3])
    back = compose(shlex.split(command)[3:])
    assert back.generate.prompts == prompts and back.generate.negative_prompt == "x'\""
    assert back.generate.only == "p0001-i0001" and back.generate.model == str(tiny_model)
