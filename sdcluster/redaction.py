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
_TOKEN_VALUE = re.compile(
    r"\b(hf_[A-Za-z0-9]{20,}|ghp_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_-]{20,}|xox[abp]-[A-Za-z0-9-]{10,}"
    r"|AKIA[0-9A-Z]{16})\b"
)
MASK = "***"


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of secret-named environment variables, longest first (so overlaps mask fully)."""
    environ = os.environ if environ is None else environ
    values = {v for k, v in environ.items() if _SECRET_NAME.search(k) and len(v) >= 6}
    return sorted(values, key=len, reverse=True)


def redact(text: str, environ: Mapping[str, str] | None = None) -> str:
    for value in secret_values(environ):
        text = text.replace(value, MASK)
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


def reject_secrets(config: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> None:
    """Refuse a config that carries a token: it would be written into job folders and the sbatch script."""
    known = secret_values(environ)
    for key, value in _walk(config):
        if isinstance(value, str) and (_TOKEN_VALUE.search(value) or any(s in value for s in known)):
            raise ConfigError(
                f"{key}: looks like a secret token. Fix: remove it from the config and export it in the "
                "environment instead (e.g. HF_TOKEN=... for the hub); sdcluster never writes it to files"
            )


def config_yaml(cfg: Any) -> str:
    """A resolved config as YAML (``jobs/<id>/config.yaml``, the run folder's), secrets masked."""
    import dataclasses

    from omegaconf import OmegaConf

    return redact(OmegaConf.to_yaml(OmegaConf.structured(dataclasses.asdict(cfg))))
