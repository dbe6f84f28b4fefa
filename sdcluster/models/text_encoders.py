"""A model's text encoders, each loaded the first time something runs it, with dtypes known before that.

A cached run (``data.cache``: the latent cache holds every caption's encodings, the text store the held-out
captions' and validation prompts', :mod:`sdcluster.data.text_store`) never runs its text encoders. For SD 3.5
and FLUX.1 one of them is T5-XXL: 4.7B parameters, 9.4 GB in bf16, read from disk and held on the GPU for
nothing. So :func:`sdcluster.models.load.load_components` hands out a :class:`TextEncoders` that loads an
encoder on first use (a cache build, a step that encodes, a prompt the store lacks) and says so in the log.

The latent cache's key holds the encoders' dtypes, so they must be known without loading: a frozen encoder
runs in the half type under mixed precision (:func:`sdcluster.models.load.prepare_frozen` casts it), else in
the dtype ``from_pretrained`` gives it, which in transformers 5 is the checkpoint's own (``dtype="auto"``:
the config's ``dtype``). An encoder whose config names none is loaded to find out.

    encoders = TextEncoders({"text_encoder": load_clip}, {"text_encoder": torch.float32})
    encoders.dtype("text_encoder")     # no load
    encoders["text_encoder"]           # loads (and prepares) it, once
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

log = logging.getLogger("sdcluster")


class TextEncoders(Mapping[str, Any]):
    """The text encoders by pipeline component name (``text_encoder``, ``text_encoder_2``, ...).

    Reading one (``encoders[name]``, ``.values()``, ``.items()``) loads it; the names (iteration, ``in``,
    ``len``) and :meth:`dtype` do not. :meth:`prepare` sets what is done to each one as it loads (frozen,
    moved to the device, cast) and does it to those loaded already.
    """

    def __init__(
        self, loaders: Mapping[str, Callable[[], Any]], dtypes: Mapping[str, torch.dtype | None]
    ) -> None:
        self._loaders = dict(loaders)
        self._dtypes = dict(dtypes)  # as loaded; None: the config names none (found by loading)
        self._loaded: dict[str, Any] = {}
        self.ever_loaded: list[str] = []  # every load, in order (a cached run's stays empty)
        # False once the steps read their outputs from the latent cache: then what loads them (a prompt the
        # text store lacked) lets go of them after (sdcluster.train.validation.run_validation)
        self.steps_run_them = True
        self._prepare: Callable[[Any], None] | None = None
        self._half: torch.dtype | None = None

    def __getitem__(self, name: str) -> Any:
        if name not in self._loaded:
            if name not in self._loaders:
                raise KeyError(name)
            started = time.perf_counter()
            encoder = self._loaders[name]()
            if self._prepare is not None:
                self._prepare(encoder)
            self._loaded[name] = encoder
            self.ever_loaded.append(name)
            log.info(
                "text encoder %s loaded: %s, %.1fM parameters, %s, in %.1f s",
                name,
                type(encoder).__name__,
                sum(p.numel() for p in encoder.parameters()) / 1e6,
                _dtype_of(encoder),
                time.perf_counter() - started,
            )
        return self._loaded[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._loaders)

    def __len__(self) -> int:
        return len(self._loaders)

    def __contains__(self, name: object) -> bool:
        return name in self._loaders

    def loaded(self) -> dict[str, Any]:
        """The encoders in memory now, loading none."""
        return dict(self._loaded)

    def dtype(self, name: str) -> torch.dtype:
        """What ``name`` computes in once prepared: the half type :meth:`prepare` casts to, else its own
        (loaded to find out only when its config names none)."""
        if self._half is not None:
            return self._half
        if name in self._loaded:
            return _dtype_of(self._loaded[name])
        own = self._dtypes.get(name)
        return own if own is not None else _dtype_of(self[name])

    def dtypes(self) -> dict[str, torch.dtype]:
        """:meth:`dtype` of every encoder, in component order."""
        return {name: self.dtype(name) for name in self}

    def prepare(self, prepare: Callable[[Any], None], half: torch.dtype | None) -> None:
        """Apply ``prepare`` to each encoder loaded now and to each one loaded later; ``half``: the type it
        casts them to (None: it leaves their dtype alone)."""
        self._prepare, self._half = prepare, half
        for encoder in self._loaded.values():
            prepare(encoder)

    def release(self) -> list[str]:
        """Let go of every loaded encoder (a cache build is done with them); the names released. A later
        read loads it again."""
        names = list(self._loaded)
        self._loaded.clear()
        if names:
            log.info("text encoders released: %s (the latent cache and text store hold their outputs)", names)
        return names


def _dtype_of(encoder: Any) -> torch.dtype:
    """The first parameter's dtype: what ``PreTrainedModel.dtype`` reports, without walking every module."""
    return next(encoder.parameters()).dtype


def config_dtype(config: Any) -> torch.dtype | None:
    """The dtype a transformers config names (``dtype``; ``torch_dtype`` in older files), or None."""
    named = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(named, str):
        named = getattr(torch, named, None)
    return named if isinstance(named, torch.dtype) else None
