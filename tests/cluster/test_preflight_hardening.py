"""Careless or hostile input is refused on the login node, naming the key and the fix, before anything is
queued: values that would break the job script's shape, resume targets that do not exist, empty datasets,
pickled weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdcluster.cluster import backends
from sdcluster.cluster.preflight import check_scripts, preflight
from sdcluster.config import ClusterConfig, Config, ConfigError
from sdcluster.data.metadata import validate
from sdcluster.paths import sample_data_dir
from tests.conftest import compose

SLURM = ["+cluster=slurm", "task=train"]


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("cluster.account='proj\n#SBATCH --qos=free'", "cluster.account"),
        ("cluster.qos='a\rb'", "cluster.qos"),
        ("cluster.constraint='a100\tb'", "cluster.constraint"),
        ("cluster.partition='gpu\n'", "cluster.partition"),
        ("cluster.setup=['module load cuda\nsqueue']", r"cluster.setup\[0\]"),
        (
            "+cluster.additional_parameters.mail-type='END\nrm -rf ~'",
            "cluster.additional_parameters.mail-type",
        ),
        ("jobs_root='/tmp/jobs\n#SBATCH --x'", "jobs_root"),
    ],
)
def test_control_characters_never_reach_the_job_script(override, key):
    with pytest.raises(ConfigError, match=rf"^{key}: contains the control character .* Fix: remove it"):
        compose([*SLURM, override])


@pytest.mark.parametrize("option", ["x y", "--gres", "Gres", "mail_type", "a;b", "gres\n"])
def test_additional_parameters_keys_are_sbatch_option_names(option):
    """Keys come from YAML too (``conf/local/cluster.yaml``), where any string can be a key."""
    slurm = backends.get("slurm")
    with pytest.raises(ConfigError, match=r"is not an sbatch option name.*e\.g\. mail-type"):
        slurm.check_config(Config(cluster=ClusterConfig(name="slurm", additional_parameters={option: 1})))
    slurm.check_config(
        Config(
            cluster=ClusterConfig(name="slurm", additional_parameters={"mail-type": "END", "gres": "gpu:2"})
        )
    )


def test_a_setup_line_that_breaks_the_script_is_refused_before_submission(tmp_path):
    cfg = compose([*SLURM, f"jobs_root={tmp_path / 'jobs'}", "cluster.setup=['echo \"unbalanced']"])
    with pytest.raises(ConfigError, match=r"^cluster.setup: the train job script would not parse .*quotes"):
        check_scripts([cfg])
    check_scripts([compose([*SLURM, "cluster.setup=['module load cuda', 'echo \"ok\"']"])])  # fine ones pass
    assert not (tmp_path / "jobs").exists()


def test_a_missing_resume_target_is_refused_before_the_queue(make_cfg, tmp_path):
    cfg = make_cfg(["task=train", f"train.resume={tmp_path / 'no' / 'such'}"])
    with pytest.raises(
        ConfigError, match=r"^train.resume: .*no/such does not exist. Fix: use train.resume=auto"
    ):
        preflight(cfg)


def _sample(dest: Path) -> Path:
    shutil.copytree(sample_data_dir(), dest)
    return dest


def test_an_empty_metadata_file_is_a_problem_and_a_byte_order_mark_is_not(make_cfg, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metadata.jsonl").write_text("\n")
    (problem,) = validate(empty)
    assert problem.kind == "empty" and "lists no images" in problem.message and "prepare" in problem.message
    with pytest.raises(ConfigError, match="lists no images"):
        preflight(make_cfg(["task=train", "data=imagefolder", f"data.path={empty}"]))

    bom = _sample(tmp_path / "bom")
    meta = bom / "metadata.jsonl"
    meta.write_bytes(b"\xef\xbb\xbf" + meta.read_bytes())  # what some Windows editors write
    assert validate(bom) == []
    preflight(make_cfg(["task=train", "data=imagefolder", f"data.path={bom}"]))


def test_pickled_weights_are_refused_by_name(make_cfg, tiny_model, tmp_path):
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model, pickled)
    weights = pickled / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(str(weights)), weights.with_suffix(".bin"))  # a .bin is a pickle: it can run code
    weights.unlink()
    with pytest.raises(ConfigError, match=r"^model.path: .*pickled/unet has no .safetensors weights"):
        preflight(make_cfg(["task=train", f"model.path={pickled}"]))
    gen = make_cfg(["task=generate", f"generate.model={pickled}"])
    with pytest.raises(ConfigError, match=r"^generate.model: .*pickled/unet has no .safetensors weights"):
        preflight(gen)
    assert json.loads((pickled / "model_index.json").read_text())["unet"]  # still a pipeline folder otherwise


TOKEN = "hf_SentinelTokenNotRealButShapedLikeOne42"
WANDB = "0123456789abcdef0123456789abcdef01234567"


@pytest.mark.parametrize(
    "line",
    [
        f"export WANDB_API_KEY={WANDB}",
        f"wandb login {WANDB}",
        "export MY_SERVICE_TOKEN=s3cr3tvalue",
        f"HF_TOKEN={TOKEN} python -c pass",
    ],
)
def test_keys_pasted_into_setup_lines_are_refused_with_the_fix(line):
    with pytest.raises(ConfigError, match=r"^cluster.setup\[1\]: looks like a secret token.*environment"):
        preflight(compose([*SLURM, f"cluster.setup=['module load cuda', '{line}']"]))


def test_setup_lines_that_pass_a_variable_on_are_fine(make_cfg, monkeypatch, tmp_path):
    cfg = make_cfg([*SLURM, "cluster.setup=['export WANDB_API_KEY=$WANDB_API_KEY', 'module load cuda/12']"])
    # no controller, whether or not an earlier test started the sandbox: the next check after the secrets
    monkeypatch.setenv("SLURM_CONF", str(tmp_path / "no-cluster.conf"))
    with pytest.raises(ConfigError, match=r"SLURM controller|not on PATH"):  # got past the secret check
        preflight(cfg)


def test_a_token_on_the_command_line_is_refused_before_anything_is_written(tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO

    args = [sys.executable, "-m", "sdcluster.launch", f"generate.negative_prompt={TOKEN}"]
    args += [f"output_root={tmp_path / 'outputs'}", f"jobs_root={tmp_path / 'jobs'}"]
    proc = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2 and "generate.negative_prompt: looks like a secret token" in proc.stderr
    assert TOKEN not in proc.stderr
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "jobs").exists()


@pytest.mark.parametrize(
    ("overrides", "key", "value", "allowed"),
    [
        (["cluster.nodes=0"], "cluster.nodes", "0", ">= 1"),
        (["cluster.gpus_per_node=-1"], "cluster.gpus_per_node", "-1", ">= 0"),
        (["cluster.tasks_per_node=0"], "cluster.tasks_per_node", "0", ">= 1"),
        (["cluster.cpus_per_task=0"], "cluster.cpus_per_task", "0", ">= 1"),
        (["cluster.mem_gb=-5"], "cluster.mem_gb", "-5.0", "> 0"),
        # sbatch reads --mem=0 as "all the node's memory", not as the default: null is the default
        (["cluster.mem_gb=0"], "cluster.mem_gb", "0.0", "> 0"),
        (["cluster.mem_gb=0.0001"], "cluster.mem_gb", "0.0001", "> 0"),  # rounds down to --mem=0MB
        (["cluster.mem_gb=nan"], "cluster.mem_gb", "nan", "> 0"),
        (["cluster.mem_gb=inf"], "cluster.mem_gb", "inf", "> 0"),
        (["cluster.timeout_min=0"], "cluster.timeout_min", "0", ">= 1"),
        (["cluster.array_parallelism=0"], "cluster.array_parallelism", "0", ">= 1"),
        (["cluster.signal_delay_s=-1"], "cluster.signal_delay_s", "-1", ">= 0"),
        (["cluster.signal_delay_s=70000"], "cluster.signal_delay_s", "70000", "<= 65535"),
        (["cluster.max_requeues=-1"], "cluster.max_requeues", "-1", ">= 0"),
        (["cluster.max_timeouts=-2"], "cluster.max_timeouts", "-2", ">= 0"),
    ],
)
def test_every_numeric_cluster_value_is_range_checked_with_the_value_and_the_fix(
    overrides, key, value, allowed
):
    """On any executor, before the dry run prints anything: sbatch would die with a traceback on some of
    these, and the rest (array_parallelism=0, a signal after the end) queue jobs that never do their work."""
    for cluster in ("+cluster=slurm", "task=train"):  # the local executor gets the same checks
        with pytest.raises(ConfigError, match=rf"^{key}: got {value}, must be {allowed}.*\. Fix: \S"):
            compose([cluster, *overrides])


def test_a_warning_signal_after_the_time_limit_is_refused_where_slurm_sends_it():
    """SLURM sends the warning ``signal_delay_s`` before the limit; the local executor sends none, so a short
    local run keeps the default delay (and could not change it without choosing SLURM)."""
    below = r"^cluster.signal_delay_s: got 120, must be below the time limit \(cluster.timeout_min=2: 120 s\)"
    cfg = compose(["+cluster=slurm", "cluster.timeout_min=2"])
    with pytest.raises(ConfigError, match=rf"{below}.*\. Fix: \S"):
        backends.of(cfg).check_config(cfg)  # preflight asks it first
    assert compose(["task=train", "cluster.timeout_min=2"]).cluster.signal_delay_s == 120


def test_the_edges_of_every_range_are_allowed():
    edges = ClusterConfig(
        name="slurm",
        nodes=1,
        gpus_per_node=0,
        tasks_per_node=1,
        cpus_per_task=1,
        mem_gb=1 / 1024,
        timeout_min=2,
        array_parallelism=1,
        signal_delay_s=119,
        max_requeues=0,
        max_timeouts=0,
    )
    assert edges.world_size == 1
    assert ClusterConfig(timeout_min=2000, signal_delay_s=65535).signal_delay_s == 65535
    assert ClusterConfig(mem_gb=None, cpus_per_task=None).mem_gb is None  # null: the partition's default
