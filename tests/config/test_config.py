"""Every config group and recipe composes; bad input fails at launch with the key and the fix."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from sdcluster.config import ConfigError
from tests.conftest import CONF, REPO, compose


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("model", _options("model"))
def test_every_model_composes(model):
    cfg = compose([f"model={model}"])
    assert cfg.model.name == model and cfg.model.path


@pytest.mark.parametrize("cluster", _options("cluster"))
def test_every_cluster_appends(cluster):
    cfg = compose([f"+cluster={cluster}"])
    assert cfg.cluster.name == cluster


def test_default_is_the_embedded_tiny_run():
    cfg = compose()
    assert (cfg.task, cfg.model.path, cfg.data.name, cfg.cluster.name) == (
        "train_generate",
        "tiny",
        "sample",
        "local",
    )
    assert Path(cfg.data.path).is_dir() and Path(cfg.output_root).is_absolute()


def test_imagefolder_needs_a_path():
    with pytest.raises(ConfigError, match=r"data\.path: has no value. Fix: set data\.path="):
        compose(["data=imagefolder"])
    assert compose(["data=imagefolder", "data.path=/tmp/x"]).data.path == "/tmp/x"


def test_seed_recipe_matches_the_seed_job():
    cfg = compose(["experiment=jeans_sd14"])
    assert cfg.model.path == "CompVis/stable-diffusion-v1-4"
    t = cfg.train
    assert (t.resolution, t.batch_size, t.grad_accum, t.use_ema, t.random_flip) == (512, 1, 4, True, True)
    assert (t.gradient_checkpointing, t.mixed_precision, t.checkpoints_keep) == (True, "fp16", 2)
    assert (cfg.optim.lr, cfg.optim.lr_schedule, cfg.optim.max_grad_norm) == (1e-5, "constant", 1.0)


def test_debug_twin_is_short():
    assert compose(["debug=fast"]).train.max_steps < compose().train.max_steps


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("train.resolution=60", "train.resolution: must be a positive multiple of 8.*use 64"),
        ("train.batch_size=0", "train.batch_size: must be > 0"),
        ("train.grad_accum=0", "train.grad_accum: must be > 0"),
        ("optim.lr=-1", "optim.lr: must be > 0"),
        ("train.mixed_precision=fp32", "train.mixed_precision: got 'fp32'.*no, fp16, bf16"),
        ("generate.scheduler=foo", "generate.scheduler: got 'foo'"),
        ("train.checkpoints_keep=1", "train.checkpoints_keep: must be >= 2"),
        ("task=finetune", "task: got 'finetune'"),
    ],
)
def test_impossible_values_name_key_and_fix(override, needle):
    with pytest.raises(ConfigError, match=needle):
        compose([override])


def test_misspelled_key_and_wrong_type_are_rejected():
    with pytest.raises(ConfigCompositionException, match="max_step"):
        compose(["train.max_step=3"])
    with pytest.raises((ValidationError, ConfigCompositionException, ConfigKeyError), match="batch_size"):
        compose(["train.batch_size=abc"])


def _launch(*overrides: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    args = [
        sys.executable,
        "-m",
        "sdcluster.launch",
        f"output_root={tmp}/out",
        f"jobs_root={tmp}/jobs",
        *overrides,
    ]
    return subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=120)


def test_launch_rejects_bad_input_before_any_job_exists(tmp_path):
    proc = _launch("train.batch_size=0", tmp=tmp_path)
    assert proc.returncode == 2
    assert "train.batch_size: must be > 0" in proc.stderr
    assert not (tmp_path / "jobs").exists()


def test_launch_rejects_broken_dataset_listing_problems(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "metadata.jsonl").write_text('{"file_name": "missing.png", "text": "x"}\n{oops\n')
    proc = _launch("data=imagefolder", f"data.path={data}", tmp=tmp_path)
    assert proc.returncode == 2
    assert "missing.png" in proc.stderr and "line 2" in proc.stderr
    assert "python -m sdcluster.data validate" in proc.stderr
    assert not (tmp_path / "jobs").exists()


def test_launch_rejects_a_token_in_the_config(tmp_path):
    proc = _launch("generate.negative_prompt=hf_abcdefghijklmnopqrstuvwxyz123456", tmp=tmp_path)
    assert proc.returncode == 2
    assert "generate.negative_prompt: looks like a secret token" in proc.stderr
    assert "hf_abcdefghijklmnopqrstuvwxyz123456" not in proc.stderr


def test_launch_rejects_missing_local_model(tmp_path):
    proc = _launch(f"model.path={tmp_path}/nowhere", tmp=tmp_path)
    assert proc.returncode == 2 and "model.path" in proc.stderr and "model_index.json" not in proc.stdout


def test_cluster_must_be_appended_with_plus():
    with pytest.raises(ConfigCompositionException, match=r"\+cluster=slurm"):
        compose(["cluster=slurm"])


@pytest.mark.parametrize(
    ("model", "guidance", "steps"),
    [
        ("tiny", 7.5, 20),  # SD 1.x/SDXL: the schema's defaults, so their image folders keep their names
        ("sdxl", 7.5, 20),
        ("flux_dev", 3.5, 28),  # FluxPipeline's own defaults: guidance is the embedded value, not CFG
        ("flux_schnell", 0.0, 4),  # distilled: no guidance, a few steps
        ("sd35_medium", 4.5, 40),  # the model cards' settings
        ("sd35_large", 3.5, 28),
        ("tiny_flux", 3.5, 20),  # the test-size ones sample like their families, at the quick step count
        ("tiny_sd3", 7.0, 20),
    ],
)
def test_each_family_is_sampled_with_its_own_guidance_unless_told_otherwise(model, guidance, steps):
    """7.5 classifier-free guidance, right for SD 1.x, burns a FLUX.1-dev image (its guidance is an embedded
    value, 3.5 by default); the model option sets the family's generation defaults, and what the command line
    or an experiment says still wins."""
    gen = compose([f"model={model}"]).generate
    assert (gen.guidance_scale, gen.steps) == (guidance, steps)
    told = compose([f"model={model}", "generate.guidance_scale=2", "generate.steps=9"]).generate
    assert (told.guidance_scale, told.steps) == (2.0, 9)
    assert compose(["experiment=jeans_sd35_lora"]).generate.guidance_scale == 7.0  # the recipe's own value


def test_cache_shards_without_a_cache_are_refused_not_ignored():
    """``data.cache_shards`` > 1 queues a cache array ahead of training: with ``data.cache=false`` there is
    nothing to build, and the setting would silently do nothing. Refused by the launch's checks (as
    ``task=cache`` without a cache is), before anything is queued."""
    from sdcluster.config import check_config

    with pytest.raises(ConfigError, match=r"data.cache_shards=4 builds the latent cache.*Fix: data.cache="):
        check_config(compose(["task=train", "data.cache_shards=4", "data.cache=false"]))
    with pytest.raises(ConfigError, match=r"task=cache builds the latent cache, but data.cache=false"):
        check_config(compose(["task=cache", "data.cache=false"]))
    check_config(compose(["task=generate", "data.cache_shards=4", "data.cache=false"]))  # nothing to build
    check_config(compose(["task=train", "data.cache=false"]))  # one shard (the default): no array
