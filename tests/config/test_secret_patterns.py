"""Tokens are recognised by their shape wherever they are pasted, not only when the same value happens to be
in the environment: glued to a word (``xhf_...``, ``hf_..._x``), or a W&B key after ``WANDB_API_KEY=``."""

from __future__ import annotations

import pytest

from sdcluster.config import ConfigError
from sdcluster.redaction import MASK, redact, reject_secrets_in_arguments
from tests.conftest import compose

HF = "hf_SentinelTokenNotRealButShapedLikeOne42"
WANDB = "0123456789abcdef0123456789abcdef01234567"
GLUED = [f"x{HF}", f"my_{HF}", f"{HF}_x", f"WANDB_API_KEY={WANDB}"]


@pytest.fixture(autouse=True)
def _no_keys_in_the_environment(monkeypatch):
    """The shapes alone must be enough: nothing to compare against in the environment."""
    for name in ("WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("value", GLUED)
def test_a_token_in_any_config_value_is_refused(value):
    with pytest.raises(ConfigError, match=r"^generate.negative_prompt: looks like a secret token"):
        compose([f"generate.negative_prompt='{value}'"])


@pytest.mark.parametrize("value", GLUED)
def test_a_token_on_the_command_line_is_refused(value):
    with pytest.raises(ConfigError, match=r"^run_name: looks like a secret token on the command line"):
        reject_secrets_in_arguments([f"run_name={value}"], environ={})


@pytest.mark.parametrize("export", [f"ALL,WANDB_API_KEY={WANDB}", "ALL,MY_SERVICE_TOKEN=s3cr3tvalue"])
def test_a_key_exported_through_an_sbatch_option_is_refused(export):
    """``--export=ALL,X=...`` writes the value into the sbatch script like a setup line would."""
    with pytest.raises(ConfigError, match=r"^cluster.additional_parameters.export: looks like a secret"):
        compose(["+cluster=slurm", f"+cluster.additional_parameters.export='{export}'"])


@pytest.mark.parametrize(
    "line", [f"wandb login {WANDB}_x", f"echo x{WANDB} > key", f"WANDB_API_KEY={WANDB}_ python t.py"]
)
def test_a_wandb_key_glued_in_a_setup_line_is_refused(line):
    with pytest.raises(ConfigError, match=r"^cluster.setup\[0\]: looks like a secret token"):
        compose(["+cluster=slurm", f"cluster.setup=['{line}']"])


def test_lookalikes_are_not_secrets():
    """Words that contain a prefix (``task-``, ``laughs_``), a commit (40 hex digits) outside shell lines,
    a prompt with ``key=`` in it, and passing a variable on are all fine."""
    cfg = compose(
        [
            "+cluster=slurm",
            "run_name=task-generate_images_for_the_demo_run",
            f"generate.negative_prompt='a monkey=happy, {WANDB}, laughs_AtTheSeasideInSummerTime'",
            "cluster.setup=['export WANDB_API_KEY=$WANDB_API_KEY']",
            "+cluster.additional_parameters.export='ALL,HF_TOKEN=$HF_TOKEN'",
        ]
    )
    assert cfg.run_name == "task-generate_images_for_the_demo_run"


def test_written_text_masks_every_shape():
    text = redact(f"a x{HF} b {HF}_x c WANDB_API_KEY={WANDB} d HF_TOKEN=$HF_TOKEN", environ={})
    assert HF not in text and WANDB not in text
    assert f"WANDB_API_KEY={MASK}" in text and "HF_TOKEN=$HF_TOKEN" in text


def test_a_masked_config_file_reads_back_as_the_same_config(monkeypatch):
    """The mask goes into values, not into the YAML text: ``revision: ***`` would read back as an alias."""
    import yaml

    from sdcluster.redaction import config_yaml

    cfg = compose([])
    cfg.model.revision = HF  # past the launch's check, as a job's later write would see it
    cfg.generate.negative_prompt = "blurry, *, &anchor"  # YAML's own punctuation stays a plain string
    text = config_yaml(cfg)
    assert HF not in text
    loaded = yaml.safe_load(text)
    assert loaded["model"]["revision"] == MASK
    assert loaded["generate"]["negative_prompt"] == "blurry, *, &anchor"
    assert loaded["train"]["max_steps"] == cfg.train.max_steps and loaded["optim"]["lr"] == cfg.optim.lr
