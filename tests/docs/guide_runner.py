"""Run a guide's commands as a reader would, by the convention of docs/architecture.md ("How the guides
are tested").

A guide is Markdown; each ```bash block runs with ``bash -e`` in one folder per guide, after the
substitutions below shrink it to the tiny models. An HTML comment right before a block (invisible on the site)
says what the reader will see: ``expect: REGEX`` lines, ``file: GLOB`` lines, ``dry-run``, ``skip: REASON``.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import REPO, copy_sample

GUIDES = REPO / "docs" / "guides"
MAX_SKIPS = 2
"""Blocks that only make sense on a real site; more would let guides go untested."""

_TINY = (
    "train.resolution=64 generate.height=64 generate.width=64"
    " train.mixed_precision=no generate.mixed_precision=no"
)
SUBSTITUTIONS = {
    "experiment=sd15_full": f"experiment=sd15_full model=tiny {_TINY}",
    "experiment=sd15_lora": f"experiment=sd15_lora model=tiny {_TINY}",
    "experiment=sdxl_lora": f"experiment=sdxl_lora model=tiny_sdxl model.variant=null {_TINY}",
}
"""Hub models at their true size -> the tiny ones at 64 px in fp32 (CPU): docs/architecture.md's table."""

SHRINK = {"train.max_steps": "2", "generate.steps": "2", "generate.num_images": "1"}
ON_SLURM = {"launch.wait": "true", "cluster.timeout_min": "20"}

_BLOCK = re.compile(r"(?:<!--\s*test\s*\n(?P<notes>.*?)-->\s*\n)?```bash\n(?P<code>.*?)```", re.DOTALL)
_LAUNCH = re.compile(r"^\s*(sdcluster (launch|generate)|python3? -m sdcluster\.launch)\b")


@dataclass
class Block:
    """One ```bash block of a guide and the notes before it."""

    code: str
    expect: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    dry_run: bool = False
    skip: str = ""


def blocks(guide: Path) -> list[Block]:
    """The guide's ```bash blocks in page order, each with its ``<!-- test ... -->`` notes."""
    found = []
    for match in _BLOCK.finditer(guide.read_text()):
        block = Block(match["code"])
        for line in (match["notes"] or "").splitlines():
            key, _, value = line.strip().partition(":")
            if key == "expect":
                block.expect.append(value.strip())
            elif key == "file":
                block.files.append(value.strip())
            elif key == "dry-run":
                block.dry_run = True
            elif key == "skip":
                block.skip = value.strip() or "no reason given"
            elif key:
                raise ValueError(f"{guide.name}: unknown test note {line!r} (expect:, file:, dry-run, skip:)")
        found.append(block)
    return found


def _with_overrides(line: str, extra: dict[str, str]) -> str:
    """``line`` with each ``key=value`` of ``extra`` the line does not set itself, before any comment."""
    command, hash_, comment = line.partition("  #")  # guides put two spaces before a trailing comment
    missing = [f"{k}={v}" for k, v in extra.items() if not re.search(rf"(^|\s){re.escape(k)}=", command)]
    return " ".join([command.rstrip(), *missing]) + (f"  {hash_}{comment}" if hash_ else "")


def substitute(code: str, slurm: bool, dry_run: bool) -> str:
    """The block as the test runs it: substitutions, then shrinking overrides on every launch line."""
    code = code.replace("\\\n", " ")  # one line per command, so overrides land at its end
    for old, new in SUBSTITUTIONS.items():
        code = code.replace(old, new)
    if not slurm:  # the job runs on the local executor instead of the sandbox
        code = code.replace(" +cluster=slurm", "")
    extra = {**SHRINK, **(ON_SLURM if slurm else {}), **({"launch.dry_run": "true"} if dry_run else {})}
    lines = [_with_overrides(ln, extra) if _LAUNCH.match(ln) else ln for ln in code.splitlines()]
    return "\n".join(lines) + "\n"


def reader_home(folder: Path, cache_root: Path) -> Path:
    """The folder a guide runs in, as the reader's: ``my_images/`` and the suite's cache at cache_root."""
    copy_sample(folder / "my_images")
    (folder / ".cache").mkdir()
    (folder / ".cache" / "sdcluster").symlink_to(cache_root)
    return folder


def run_guide(guide: Path, folder: Path, slurm: bool = False) -> list[str]:
    """Run every block of ``guide`` in ``folder``; fail naming the block and what it did not show.

    Returns the skip reasons, so the caller can count them against MAX_SKIPS.
    """
    env = {**os.environ, "HOME": str(folder), "SDCLUSTER_HOME": str(folder / ".sdcluster")}
    skipped = []
    for number, block in enumerate(blocks(guide), 1):
        if block.skip:
            skipped.append(f"{guide.name} block {number}: {block.skip}")
            continue
        script = substitute(block.code, slurm, block.dry_run)
        proc = subprocess.run(
            ["bash", "-e", "-c", script], cwd=folder, env=env, capture_output=True, text=True, timeout=600
        )
        output = proc.stdout + proc.stderr
        where = f"{guide.relative_to(REPO)} block {number}:\n{block.code}\nran as:\n{script}\n"
        where += f"output:\n{output}"
        assert proc.returncode == 0, f"exit {proc.returncode} in {where}"
        for pattern in block.expect:
            assert re.search(pattern, output), f"no {pattern!r} in the output of {where}"
        for pattern in block.files:
            assert list(folder.glob(pattern)), f"no {pattern} after {where}"
    return skipped
