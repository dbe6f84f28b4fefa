"""A generation is counted, bounded and sharded without expanding it (issue 19, fail 3; issue 26, item 5).

The launch counts a plan's images by arithmetic on the program, prints them per template, per shard and in
total, and refuses a plan above ``generate.max_images`` before anything is queued. The plan itself is an
index -> item mapping: a 10^12-image program is counted, sharded and sampled in a few hundred kilobytes.
The lazy plan is checked against the eager expansion it replaced (kept below as the oracle), so the images,
seeds, names and batches of existing programs stay what they were.
"""

from __future__ import annotations

import itertools
import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from sdcluster.cluster.submit_and_wait import describe_outputs, launch
from sdcluster.config import Config, ConfigError, GenerateConfig
from sdcluster.generate.batches import batch_of, cut_batches, shard
from sdcluster.generate.manifest_index import file_key
from sdcluster.generate.plan import Item, item_seed, plan_items
from sdcluster.generate.plan_count import check_plan_size, count_plan
from sdcluster.generate.prompts import _draw, _unit, load_program, sampling_of
from tests.generate.conftest import write_program

TWELVE_SLOTS = "slots:\n" + "".join(f"  s{n}: [{', '.join(map(str, range(10)))}]\n" for n in range(12))
MIXED = """
slots:
  wash: {light: 3, dark: 1, faded: 1}
  view: [front, back]
  size: [small, big]
templates:
  - text: "{wash} jeans, {view}, {size}"
    images: 2
  - text: "{wash} jeans folded"
    count: 5
  - text: "{view} of {wash} denim"
    images: 3
    guidance_scale: 3.0
  - text: "no slots at all"
  - text: "{size} {wash}"
    count: 3
    images: 4
    steps: 4
"""


def eager_items(gen: GenerateConfig) -> list[Item]:
    """The plan as it was made before it became lazy: every prompt expanded, every item listed."""
    program, items, p = load_program(gen), [], 0
    for index, template in enumerate(program.templates):
        if template.count is None:
            combos = [
                tuple(zip(template.slots, values, strict=True))
                for values in itertools.product(*(program.slots[s] for s in template.slots))
            ]
        else:
            combos = [
                tuple((s, _draw(program.slots[s], _unit(gen.seed, index, k, s))) for s in template.slots)
                for k in range(template.count)
            ]
        for labels in combos:
            text = template.text if template.literal else template.text.format_map(dict(labels))
            for i in range(template.images or gen.num_images):
                seed = item_seed(gen.seed, p, i)
                items.append(Item(p, i, text, seed, index, labels, sampling_of(template, gen)))
            p += 1
    return items


def eager_batches(items: list[Item], batch_size: int) -> list[list[Item]]:
    batches: list[list[Item]] = []
    for _, run in itertools.groupby(items, key=lambda item: item.sampling):
        group = list(run)
        batches += [group[i : i + batch_size] for i in range(0, len(group), batch_size)]
    return batches


def test_the_lazy_plan_is_the_eager_expansion_it_replaced(tmp_path: Path) -> None:
    path = write_program(tmp_path, MIXED)
    gen = GenerateConfig(prompts=["a literal {brace}"], prompts_file=str(path), num_images=3, seed=11)
    plan, eager = plan_items(Config(generate=gen)), eager_items(gen)
    assert plan.total == len(eager) == 3 + 12 * 2 + 5 * 3 + 6 * 3 + 3 + 3 * 4
    assert list(plan) == eager and plan[7] == eager[7] and plan[-2:] == eager[-2:]
    for size in (1, 3, 4, 7):
        batches = eager_batches(eager, size)
        assert list(cut_batches(plan, size)) == batches
        for count in (1, 2, 3, 5):
            dealt = [shard(plan, k, count, size) for k in range(count)]
            assert [list(d) for d in dealt] == [batches[k::count] for k in range(count)]
            counted = count_plan(GenerateConfig(**{**gen.__dict__, "batch_size": size, "shards": count}))
            assert counted.shards == [sum(map(len, batches[k::count])) for k in range(count)]
        for item in eager[::5]:
            batch, found = batch_of(plan, item.id, size)
            assert found == item and batch == next(b for b in batches if item in b)
    keys = np.array([file_key(i.file) for i in eager], dtype=np.int64)
    assert plan.count_keys(keys) == plan.total and plan.count_keys(keys[1:]) == plan.total - 1
    outside = np.array([file_key("p0000-i0003.png"), file_key("p9999-i0000.png")], dtype=np.int64)
    assert plan.count_keys(np.concatenate([keys[1:], outside])) == plan.total - 1


def test_counts_per_template_and_shard(tmp_path: Path) -> None:
    path = write_program(tmp_path, MIXED)
    gen = GenerateConfig(prompts=[], prompts_file=str(path), num_images=3, batch_size=4, shards=3)
    count = count_plan(gen)
    assert [(t.prompts, t.images, t.total) for t in count.templates] == [
        (12, 2, 24),
        (5, 3, 15),
        (6, 3, 18),
        (1, 3, 3),
        (3, 4, 12),
    ]
    assert count.total == 72 == sum(count.shards) and count.shards == [
        26,
        24,
        22,
    ]  # 19 batches in 4 runs of settings


@pytest.mark.parametrize(
    ("program", "overrides", "total", "top"),
    [  # the cases: a huge count, a huge images, a huge num_images, and a plain big product
        (TWELVE_SLOTS + "templates:\n  - text: '{s0}'\n    count: 1000000000000\n", [], 2 * 10**12, 0),
        ("templates: [a, {text: b, images: 1000000000000}]", [], 10**12 + 2, 1),
        (None, ["generate.num_images=1000000000"], None, 0),
        ("slots: {a: [x, y, z]}\ntemplates: [one, '{a}']", ["generate.num_images=4000000"], 16 * 10**6, 1),
    ],
)
def test_launch_refuses_a_plan_above_max_images_before_anything_is_queued(
    make_cfg, tmp_path: Path, program: str | None, overrides: list[str], total: int | None, top: int
) -> None:
    flags = ["task=generate", "launch.dry_run=true", *overrides]
    if program is not None:
        flags += ["generate.prompts=[]", f"generate.prompts_file={write_program(tmp_path, program)}"]
    cfg, said = make_cfg(flags), []
    total = total or len(cfg.generate.prompts) * 10**9  # the default prompts, each 10^9 times
    with pytest.raises(ConfigError) as err:
        launch(cfg, said.append)
    message = str(err.value)
    assert message.startswith(f"generate.max_images: this launch would make {total:,} images")
    assert "more than the limit of 10,000,000" in message
    assert f"template {top} (" in message and "makes the most" in message
    assert "Fix: raise generate.max_images" in message and "split the program" in message
    assert said == [] and not (tmp_path / "jobs").exists() and not (tmp_path / "outputs").exists()


def test_image_names_bound_the_plan_even_with_a_raised_limit(tmp_path: Path) -> None:
    path = write_program(
        tmp_path, TWELVE_SLOTS + "templates: ['" + "".join(f"{{s{n}}}" for n in range(12)) + "']"
    )
    gen = GenerateConfig(prompts=[], prompts_file=str(path), max_images=10**15)
    with pytest.raises(ConfigError, match=r"1,000,000,000,000 prompts.*Fix: lower count"):
        check_plan_size(gen)
    assert count_plan(gen).total == 2 * 10**12  # counted all the same


def test_a_remake_of_one_image_of_a_big_plan_is_not_refused(tmp_path: Path) -> None:
    path = write_program(tmp_path, "templates: [{text: a, images: 20000000}]")
    assert check_plan_size(GenerateConfig(prompts=[], prompts_file=str(path), only="p0000-i19999999")).total
    with pytest.raises(ConfigError, match=r"generate\.max_images"):
        check_plan_size(GenerateConfig(prompts=[], prompts_file=str(path)))


def test_a_trillion_images_are_counted_sharded_and_sampled_in_little_memory(tmp_path: Path) -> None:
    six = "slots:\n" + "".join(f"  s{n}: [{', '.join(f'v{n}{k}' for k in range(10))}]\n" for n in range(6))
    text = "".join(f"{{s{n}}} " for n in range(6)).strip()
    path = write_program(tmp_path, six + f"templates:\n  - text: '{text}'\n    images: 1000000\n")
    gen = GenerateConfig(prompts=[], prompts_file=str(path), max_images=10**12, shards=1000, batch_size=8)
    tracemalloc.start()
    try:
        count = check_plan_size(gen)
        plan = plan_items(Config(generate=gen))
        mine = shard(plan, 999, 1000, 8)
        first, last = mine[:2], mine[-2:]
        middle = plan[plan.total // 2]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20, f"peak {peak / 2**20:.1f} MiB: the plan was listed"
    assert count.total == plan.total == 10**12 and sum(count.shards) == 10**12
    assert len(mine) == 10**12 // 8 // 1000 and count.shards[999] == len(mine) * 8
    assert [i.file for i in first[0][:2]] == ["p0000-i7992.png", "p0000-i7993.png"]
    assert last[-1][-1] == plan[-1] and plan[-1].file == "p999999-i999999.png"
    assert plan[-1].prompt == "v09 v19 v29 v39 v49 v59" and plan[-1].seed == item_seed(0, 999999, 999999)
    assert middle.prompt_index == 500000 and middle.prompt == "v05 v10 v20 v30 v40 v50"


def test_dry_run_and_summary_print_counts(make_cfg, tiny_model: Path, tmp_path: Path) -> None:
    path = write_program(tmp_path, MIXED)
    flags = [f"generate.prompts_file={path}", "generate.prompts=[]", f"generate.model={tiny_model}"]
    flags += ["task=generate", "generate.num_images=3", "generate.shards=3", "generate.batch_size=4"]
    said: list[str] = []
    assert launch(make_cfg([*flags, "launch.dry_run=true"]), said.append) == 0
    printed = "\n".join(said)
    assert "making 72 images" in printed  # the job header of the dry run
    assert "images made:  72 in total (generate.max_images=10,000,000)" in printed
    assert "  template 0: 24 = 12 prompts x 2 images  '{wash} jeans, {view}, {size}'" in printed
    assert "  template 4: 12 = 3 prompts x 4 images  '{size} {wash}'" in printed
    assert "  per shard:  26, 24, 22 (generate.shards=3)" in printed
    summary: list[str] = []
    describe_outputs(make_cfg(flags), summary.append)  # what the launch prints after submitting
    assert [line for line in summary if line.startswith("images made")] == [said[-7]]


def test_settings_of_a_big_plan_keep_a_digest_and_still_refuse_other_prompts(tmp_path: Path) -> None:
    """Resume bookkeeping: past LISTED_PROMPTS prompts, settings.json keeps their count and digest."""
    from sdcluster.generate import job, records

    values = ", ".join(f"v{k}" for k in range(101))
    path = write_program(tmp_path, f"slots:\n  a: [{values}]\n  b: [x{values}]\ntemplates: ['{{a}} {{b}}']\n")
    cfg = Config(generate=GenerateConfig(prompts=[], prompts_file=str(path), model=str(tmp_path)))
    out = tmp_path / "out"
    out.mkdir()
    job._write_settings(cfg, out, plan_items(cfg))
    settings = json.loads((out / records.SETTINGS).read_text())
    assert "resolved_prompts" not in settings and settings["resolved_prompts_count"] == 101 * 101
    job._write_settings(cfg, out, plan_items(cfg))  # the same prompts: a resume goes on
    path.write_text(path.read_text().replace("v100]", "v100, v101]", 1))
    with pytest.raises(ConfigError, match="made from other prompts"):
        job._write_settings(cfg, out, plan_items(cfg))
