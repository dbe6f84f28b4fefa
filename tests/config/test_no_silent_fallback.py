"""Nothing the user typed is silently ignored, and nothing is written before the checks (issues 19 and 26).

A key or group the schema lacks is refused with or without ``+`` (Hydra's own advice for an unknown key),
with the key that was meant; SLURM settings without ``+cluster=slurm`` are refused; a real training about to
run on a SLURM login node needs ``+cluster=local``; a sweep refused for a token writes nothing first.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sdcluster.config import ConfigError, check_config
from tests.conftest import compose

TOKEN = "hf_SweepSentinelNotRealButShapedLikeOne42"


def _launch(
    tmp: Path, *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m sdcluster.launch ... launch.dry_run=true`` with every root under ``tmp``; by default on
    a machine without SLURM's clients (PATH holds only an empty folder)."""
    flags = [a for a in args if a.startswith("-")]
    roots = [f"output_root={tmp / 'outputs'}", f"jobs_root={tmp / 'jobs'}", f"cache_root={tmp / 'cache'}"]
    command = [sys.executable, "-m", "sdcluster.launch", *flags, "launch.dry_run=true", *roots]
    command += [a for a in args if not a.startswith("-")]
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    base |= {"PATH": str(tmp / "empty-bin"), "SDCLUSTER_HOME": str(tmp / "home")}
    return subprocess.run(
        command, capture_output=True, text=True, cwd=cwd or tmp, timeout=300, env={**base, **(env or {})}
    )


def _files_holding(folder: Path, needle: str) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and needle.encode() in p.read_bytes()]


# -- 1. a sweep refused for a token wrote it first (Hydra's multirun.yaml) ---------------------------------


@pytest.mark.parametrize("cluster", ["+cluster=slurm", "+cluster=local"])
def test_a_sweep_refused_for_a_token_in_site_settings_writes_nothing(tmp_path, cluster):
    site = tmp_path / "conf" / "local" / "generate.yaml"
    site.parent.mkdir(parents=True)
    site.write_text(f"negative_prompt: {TOKEN}\n")
    proc = _launch(tmp_path, "-m", cluster, "optim.lr=1e-4,5e-5")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "generate.negative_prompt: looks like a secret token" in proc.stderr
    assert TOKEN not in proc.stdout + proc.stderr
    assert _files_holding(tmp_path, TOKEN) == [site], "the token was written before the check"
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()) == [
        Path("conf/local/generate.yaml")
    ]


def test_a_sweep_refused_for_a_token_on_the_command_line_writes_nothing(tmp_path):
    proc = _launch(
        tmp_path, "-m", "+cluster=slurm", "optim.lr=1e-4,5e-5", f"generate.negative_prompt={TOKEN}"
    )
    assert proc.returncode == 2 and "looks like a secret token on the command line" in proc.stderr
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_a_sweep_dry_run_writes_no_hydra_folders(tmp_path):
    """Hydra's sweeper wrote ``<output_root>/.hydra/sweeps/<time>/multirun.yaml`` (and a folder per point)."""
    proc = _launch(tmp_path, "-m", "optim.lr=1e-4,5e-5")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("# resolved config") == 2, "both points went through their dry run"
    assert not [p for p in tmp_path.rglob("*") if p.name != "empty-bin"]


# -- 2. keys and groups the schema lacks ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("+train.max_stpes=100", r"train\.max_stpes: is not a key.*Did you mean train\.max_steps\?.*"),
        ("+optim.learning_rate=1e-5", r"optim\.learning_rate: .*Did you mean optim\.lr\?"),
        ("++train.lora.rnak=8", r"train\.lora\.rnak: .*Did you mean train\.lora\.rank\?"),
        ("+modle=sd15", r"modle: .*Did you mean model\?.*Fix: choose the config group with model=sd15"),
        ("+clsuter=slurm", r"clsuter: .*Did you mean cluster\?.*Fix: choose the config group with \+cluster"),
        ("+experimnet=sd15_full", r"experimnet: .*Did you mean experiment\?"),
        ("+trian.max_steps=3", r"trian: .*Did you mean train\?"),
        ("+model.foo=1", r"model\.foo: .*Fix: remove it \(the keys of model: name, path,"),
    ],
)
def test_a_key_added_with_plus_is_checked_against_the_schema(override, message):
    with pytest.raises(ConfigError, match=message):
        compose([override])


def test_keys_under_a_dict_field_and_appended_groups_still_pass():
    cfg = compose(["+cluster=slurm", "+cluster.additional_parameters.mail-type=END"])
    assert cfg.cluster.name == "slurm" and cfg.cluster.additional_parameters == {"mail-type": "END"}


@pytest.mark.parametrize(
    ("overrides", "key", "needle"),
    [
        # Hydra's own error advises +train.max_stpes=100; the launcher answers with the key meant
        (
            ["train.max_stpes=100"],
            "train.max_stpes",
            "Did you mean train.max_steps? Fix: use train.max_steps=100",
        ),
        (["+train.max_stpes=100"], "train.max_stpes", "Fix: use train.max_steps=100"),
        (["-m", "optim.learning_rate=1e-5,5e-6"], "optim.learning_rate", "Fix: use optim.lr=1e-5,5e-6"),
        (["+clsuter=slurm", "cluster.partition=gpu"], "clsuter", "Did you mean cluster?"),
    ],
)
def test_the_launcher_refuses_unknown_keys_with_the_one_meant(tmp_path, overrides, key, needle):
    proc = _launch(tmp_path, *overrides)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"sdcluster: configuration error: {key}: is not a key of the config" in proc.stderr
    assert needle in proc.stderr
    assert not (tmp_path / "jobs").exists() and not (tmp_path / "outputs").exists()


# -- 3. SLURM settings without SLURM -------------------------------------------------------------------


@pytest.mark.parametrize(
    "override", ["cluster.partition=gpu", "cluster.account=proj", "cluster.mem_gb=64", "cluster.name=slurm"]
)
def test_slurm_settings_without_choosing_slurm_are_refused(tmp_path, override):
    from sdcluster.cluster.choice import check_choice

    cfg = compose([override])
    with pytest.raises(ConfigError, match=r"is a SLURM setting, but no executor was chosen.*\+cluster=slurm"):
        check_choice(cfg, None, environ={})
    check_choice(compose(["+cluster=slurm", override]), "slurm", environ={})  # chosen: fine


@pytest.mark.parametrize("sweep", [[], ["-m", "optim.lr=1e-4,5e-5"]], ids=["launch", "sweep"])
def test_the_launcher_refuses_a_partition_without_slurm(tmp_path, sweep):
    proc = _launch(tmp_path, *sweep, "cluster.partition=gpu")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "cluster.partition: is a SLURM setting" in proc.stderr and "add +cluster=slurm" in proc.stderr
    assert "local executor: no sbatch script" not in proc.stdout


# -- 4. a real training on a login node -----------------------------------------------------------------


def _login_node(tmp: Path) -> dict[str, str]:
    """A machine that looks like a SLURM login node: an executable ``sbatch`` on PATH, a readable config."""
    bin_dir = tmp / "slurm-bin"
    bin_dir.mkdir()
    sbatch = bin_dir / "sbatch"
    sbatch.write_text("#!/bin/sh\necho 'sbatch: not for this test' >&2\nexit 1\n")
    sbatch.chmod(0o755)
    conf = tmp / "slurm.conf"
    conf.write_text("ClusterName=test\n")
    return {"PATH": str(bin_dir), "SLURM_CONF": str(conf)}


def test_a_heavy_local_job_on_a_login_node_needs_cluster_local(tmp_path):
    env = _login_node(tmp_path)
    proc = _launch(tmp_path, "train.max_steps=1000", env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "looks like a SLURM login node" in proc.stderr and "train.max_steps=1000 > 40" in proc.stderr
    assert "+cluster=slurm" in proc.stderr and "+cluster=local" in proc.stderr
    proc = _launch(tmp_path, "model=sd15", "experiment=sd15_full", "data.path=/nowhere", env=env)
    assert proc.returncode == 2 and "model.path=stable-diffusion-v1-5/stable-diffusion-v1-5" in proc.stderr

    chosen = _launch(tmp_path, "+cluster=local", "train.max_steps=1000", env=env)
    assert chosen.returncode == 0, chosen.stderr[-2000:]
    in_a_job = _launch(tmp_path, "train.max_steps=1000", env={**env, "SLURM_JOB_ID": "42"})
    assert in_a_job.returncode == 0, in_a_job.stderr[-2000:]


def test_the_demo_still_runs_on_a_login_node(tmp_path):
    proc = _launch(tmp_path, env=_login_node(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "local executor: no sbatch script" in proc.stdout


# -- 5. a model's native resolution and the recipes made for it ----------------------------------------


def test_a_model_alone_does_not_keep_the_tiny_models_resolution():
    with pytest.raises(
        ConfigError,
        match=r"train\.resolution=64, but model sd15 \(stable-diffusion-v1-5/.*\) was trained at 512 px.*"
        r"experiment=sd15_full \(or sd15_lora\) data\.path=DIR",
    ):
        check_config(compose(["model=sd15"]))
    with pytest.raises(ConfigError, match=r"model sdxl \(.*\) was trained at 1024 px.*experiment=sdxl_lora"):
        check_config(compose(["model=sdxl"]))
    with pytest.raises(ConfigError, match=r"experiment=sd15_full \(or sd15_lora\) model=sd14 data\.path"):
        check_config(compose(["model=sd14"]))
    check_config(compose(["model=sd15", "train.resolution=512"]))
    check_config(compose(["model=sd15", "model.native_resolution=null"]))  # another size on purpose
    check_config(compose(["model=sd15", "task=generate", "generate.model=/m"]))  # no training


@pytest.mark.parametrize(
    ("recipe", "model", "method", "size"),
    [
        ("sd15_full", "sd15", "full", 512),
        ("sd15_lora", "sd15", "lora", 512),
        ("sdxl_lora", "sdxl", "lora", 1024),
    ],
)
def test_each_generic_recipe_needs_only_a_data_path(recipe, model, method, size):
    with pytest.raises(ConfigError, match=r"^data\.path: has no value\. Fix: set data\.path="):
        compose([f"experiment={recipe}"])
    cfg = compose([f"experiment={recipe}", "data.path=/scratch/me/images"])
    assert (cfg.model.name, cfg.train.method, cfg.train.resolution) == (model, method, size)
    assert (cfg.data.name, cfg.data.path) == ("imagefolder", "/scratch/me/images")
    assert cfg.model.native_resolution == size
    check_config(cfg)  # the recipe passes the cross-group checks, resolution included


def test_a_recipe_takes_another_model_of_its_size():
    cfg = compose(["experiment=sd15_full", "model=sd14", "data.path=/d"])
    assert (cfg.model.name, cfg.train.resolution) == ("sd14", 512)
    check_config(cfg)


def test_the_launcher_names_the_missing_data_path_of_a_recipe(tmp_path):
    proc = _launch(tmp_path, "experiment=sd15_lora")
    assert proc.returncode == 2 and "data.path: has no value. Fix: set data.path=" in proc.stderr
