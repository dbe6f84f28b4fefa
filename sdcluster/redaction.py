"""Keep tokens out of configs, job folders and logs.

Tokens belong in the environment (``HF_TOKEN``, ``WANDB_API_KEY``) where the libraries read them; they are
never config values. A config value that looks like a token is refused at launch, and text written to
``jobs/`` or ``outputs/`` passes through :func:`redact`, which masks the value of any secret-named variable
of the current environment (the seed's script wrote the hub token into TensorBoard's ``hparams.yml``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

from sdcluster.config import ConfigError

_SECRET_NAME = re.compile(r"(TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|ACCESS_KEY|PRIVATE_KEY)", re.IGNORECASE)
# No \b around a token: `_` is a word character, so `xhf_...`, `my_hf_...` or `hf_..._x` would escape it.
# `sk-`, `ghs_`, `AKIA` also end or start ordinary words (`task-...`, `highs_...`), so a letter or digit may
# not precede them.
_TOKEN_VALUE = re.compile(
    r"hf_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,}|xox[abp]-[A-Za-z0-9-]{10,}"
    r"|(?<![A-Za-z0-9])(?:gh[pousr]_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_-]{20,}|AKIA[0-9A-Z]{16})"
)
# the variables the libraries read their keys from, given a value anywhere (`=$NAME` passes one on: fine)
_NAMED_SECRET = re.compile(r"\b(WANDB_API_KEY|HF_TOKEN|HUGGING_FACE_HUB_TOKEN)=(?![$\s])[^\s,;'\"]+")
# `NAME_TOKEN=value`, `export MY_KEY=value` in a shell line or an sbatch option (`--export=ALL,X_TOKEN=...`)
_SECRET_ASSIGNMENT = re.compile(
    r"\b[A-Za-z0-9_]*(TOKEN|SECRET|PASSWORD|PASSWD|KEY)[A-Za-z0-9_]*=(?![$])\S+", re.IGNORECASE
)
_SHELL_KEYS = ("cluster.setup", "cluster.additional_parameters")  # values written into the sbatch script
_WANDB_KEY = re.compile(r"(?<![0-9a-f])[0-9a-f]{40}(?![0-9a-f])")  # W&B API keys: 40 hex digits
MASK = "***"


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of secret-named environment variables, longest first (so overlaps mask fully)."""
    environ = os.environ if environ is None else environ
    values = {v for k, v in environ.items() if _SECRET_NAME.search(k) and len(v) >= 6}
    return sorted(values, key=len, reverse=True)


def redact(text: str, environ: Mapping[str, str] | None = None) -> str:
    for value in secret_values(environ):
        text = text.replace(value, MASK)
    text = _NAMED_SECRET.sub(lambda m: f"{m.group(1)}={MASK}", text)
    return _TOKEN_VALUE.sub(MASK, text)


def _walk(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, Mapping):
        for key, value in node.items():
            yield from _walk(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}[{i}]")
    else:
        yield path, node


def _looks_secret(key: str, value: str, known: list[str]) -> bool:
    """Recognised by its shape, not only by the environment: a key pasted here may be in no variable."""
    if _TOKEN_VALUE.search(value) or _NAMED_SECRET.search(value) or any(s in value for s in known):
        return True
    if not key.startswith(_SHELL_KEYS):  # elsewhere `monkey=...` is a prompt, 40 hex digits a commit
        return False
    # Shell lines (cluster.setup) are where keys get pasted: `export X_TOKEN=...`, `wandb login <key>`.
    bare_key = key.startswith("cluster.setup") and _WANDB_KEY.search(value)
    return bool(_SECRET_ASSIGNMENT.search(value) or bare_key)


def reject_secrets(config: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> None:
    """Refuse a config that carries a token: it would be written into job folders and the sbatch script."""
    known = secret_values(environ)
    for key, value in _walk(config):
        if isinstance(value, str) and _looks_secret(key, value, known):
            raise ConfigError(
                f"{key}: looks like a secret token. Fix: remove it from the config and export it in the "
                "environment instead (e.g. HF_TOKEN=... for the hub, WANDB_API_KEY=... for W&B: jobs inherit "
                "the environment of the shell that submits them); sdcluster never writes it to files"
            )


def reject_secrets_in_arguments(arguments: list[str], environ: Mapping[str, str] | None = None) -> None:
    """The command line, checked before Hydra composes it: Hydra writes overrides into its output folders."""
    known = secret_values(environ)
    for argument in arguments:
        key = argument.split("=", 1)[0].lstrip("+~")
        if _looks_secret(key, argument, known):
            raise ConfigError(
                f"{key}: looks like a secret token on the command line. Fix: remove it and export it in the "
                "environment instead (e.g. HF_TOKEN=...); sdcluster never writes it to files"
            )


def config_yaml(cfg: Any) -> str:
    """A resolved config as YAML (``jobs/<id>/config.yaml``, the run folder's), secrets masked."""
    import dataclasses

    from omegaconf import OmegaConf

    # Masked value by value, before dumping: a mask put into the YAML text would be read back as an
    # alias (`revision: ***`), and the next attempt, the rerun script and the model card read this file.
    return OmegaConf.to_yaml(OmegaConf.create(_redacted(dataclasses.asdict(cfg))))


def _redacted(node: Any) -> Any:
    if isinstance(node, Mapping):
        return {key: _redacted(value) for key, value in node.items()}
    if isinstance(node, (list, tuple)):
        return [_redacted(value) for value in node]
    return redact(node) if isinstance(node, str) else node
