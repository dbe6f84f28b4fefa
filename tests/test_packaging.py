"""Installed as a user installs it: a built wheel in a fresh virtual environment, run from another directory.

The venv sees the packages of the interpreter running the tests (torch & co., so nothing is downloaded),
whether that is the system's Python or a venv of its own, but sdcluster itself only from the wheel: each
command checks that the module it ran was imported from the venv, not from this checkout. The wheel is built
from a copy of the checkout, so the build writes nothing (``build/``, ``*.egg-info``) into the checkout.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import tomllib

from tests.conftest import REPO

pytestmark = pytest.mark.slow

# What a build neither needs nor may see: state and caches of the checkout, and what a build leaves there.
_NOT_SOURCES = (".git", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".venv", "outputs", "jobs")


def _run(python: Path, cwd: Path, *args: str, home: Path | None = None) -> subprocess.CompletedProcess[str]:
    home = home or cwd
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(home),
        "SDCLUSTER_HOME": str(home / "index"),
        "HF_HUB_OFFLINE": "1",
    }
    return subprocess.run([str(python), *args], capture_output=True, text=True, cwd=cwd, timeout=600, env=env)


def _outer_site_dirs() -> list[str]:
    """The site directories the interpreter running the tests imports from, in its order.

    Not ``--system-site-packages``: that shows the base installation's packages, and when the tests run
    inside a venv those are not the ones installed (``No module named 'hydra'``). ``sys.path`` also holds
    what ``.pth`` files added (a venv that reuses the system's packages); the checkout itself is left out.
    """
    named = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    found = [p for p in sys.path if p in named or Path(p).name in ("site-packages", "dist-packages")]
    return [p for p in dict.fromkeys(found) if Path(p).is_dir() and Path(p).resolve() != REPO]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The venv's python, with the wheel built from (a copy of) this checkout installed."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    shutil.copytree(REPO, source, symlinks=True, ignore=shutil.ignore_patterns(*_NOT_SOURCES))
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(root)]
    subprocess.run([*build, "."], check=True, cwd=source, capture_output=True, timeout=300)
    (wheel,) = root.glob("sdcluster-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.strip()
    # Plain path lines: the venv's own site-packages (the wheel) comes first, and the .pth files of those
    # folders (the checkout's editable install among them) are not run.
    (Path(site) / "_tests_outer_site.pth").write_text("".join(f"{d}\n" for d in _outer_site_dirs()))
    # --ignore-installed: the checkout's own (editable) sdcluster's metadata is visible through those folders.
    install = [str(python), "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed", str(wheel)]
    subprocess.run(install, check=True, timeout=300, env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    return python


def test_package_list_names_every_package():
    """pyproject lists packages by hand (for the hydra_plugins namespace): a new wing must be listed."""
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {
        ".".join(init.parent.relative_to(REPO).parts)
        for top in ("sdcluster", "hydra_plugins")
        for init in (REPO / top).rglob("__init__.py")
    }
    assert on_disk == listed


def test_wheel_runs_the_default_launch_from_any_directory(installed, tmp_path, cache_root, tiny_model):
    where = _run(
        installed,
        tmp_path,
        "-c",
        "import sdcluster, hydra_plugins.sdcluster_launcher as p; "
        "print(sdcluster.__file__); print(p.__file__)",
    )
    assert where.returncode == 0, where.stderr
    assert all(str(installed.parents[1]) in line for line in where.stdout.split()), where.stdout
    proc = _run(installed, tmp_path, "-m", "sdcluster.launch", "debug=fast", f"cache_root={cache_root}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    model = Path(re.search(r"^model:\s+(\S+)", proc.stdout, re.M).group(1))
    images = Path(re.search(r"^images:\s+(\S+)", proc.stdout, re.M).group(1))
    assert model.is_relative_to(tmp_path / "outputs") and (model / "model_index.json").is_file()
    assert len(list(images.glob("p*-i*.png"))) == 2 and (images / "manifest.jsonl").is_file()

    listed = _run(
        installed, tmp_path / "outputs", "-m", "sdcluster.logs", home=tmp_path
    )  # found by the index
    assert listed.returncode == 0 and len(re.findall(r"COMPLETED", listed.stdout)) == 2, listed.stdout
    data = _run(installed, tmp_path, "-m", "sdcluster.data", "validate", str(model.parents[3] / "missing"))
    assert data.returncode == 1 and "is not a folder" in data.stdout
    merged = _run(installed, tmp_path, "-m", "sdcluster.generate", "merge", str(images))
    assert merged.returncode == 0 and "2 records" in merged.stdout, merged.stderr
    sweep = _run(installed, tmp_path, "-m", "sdcluster.sweep", "report", "nosuch")
    assert sweep.returncode == 2 and "no sweep at 'nosuch'" in sweep.stderr


@pytest.mark.parametrize("where", ["checkout", "wheel"])
def test_site_settings_in_conf_local_apply_and_the_command_line_wins(where, installed, tmp_path):
    """``conf/local/cluster.yaml`` of the working directory refines the cluster option; overrides win."""
    (tmp_path / "conf" / "local").mkdir(parents=True)
    (tmp_path / "conf" / "local" / "cluster.yaml").write_text("partition: gpu\naccount: site\nqos: long\n")
    (tmp_path / "conf" / "local" / "train.yaml").write_text("log_every: 7\n")
    python = installed if where == "wheel" else Path(sys.executable)
    args = [
        "-m",
        "sdcluster.launch",
        "+cluster=slurm",
        "launch.dry_run=true",
        "task=train",
        "cluster.qos=cli",
    ]
    proc = _run(python, tmp_path, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "#SBATCH --partition=gpu" in proc.stdout and "#SBATCH --account=site" in proc.stdout
    assert "#SBATCH --qos=cli" in proc.stdout, "the command line wins over conf/local"
    assert re.search(r"^  log_every: 7$", proc.stdout, re.M)
    elsewhere = _run(python, tmp_path / "conf", *args)  # no conf/local/ in this working directory
    assert elsewhere.returncode == 0 and "--partition=gpu" not in elsewhere.stdout
