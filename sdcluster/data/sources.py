"""Several sources (``data.sources``): folders and hub datasets, each with its repeats and caption column.

A run reads one table of rows: each source's rows (sorted by file name, as one folder's always are), source
after source in the listed order, so row numbers, the sampler's stream and the latent cache work as with one
folder. A config without ``data.sources`` is read as one source (``data.path`` or ``data=hub``), through the
very calls it always made, so its rows, cache keys and run folders are what they were.

* **Repeats** (kohya's ``num_repeats``) are not rows: the latent cache and the table hold each image once,
  and the sampler's epoch lists a row ``repeats`` times (:func:`stream_rows`), so an epoch of a product set of
  10 images with ``repeats: 3`` and 40 regularisation images reads 70 examples, each pass of an image with a
  crop of its own, deterministically from ``train.seed`` and the same on every rank.
* **Holdout** is drawn per source (:func:`split_rows`): each keeps ``holdout`` (or ``data.holdout``) of its
  own images out of training, by the seed-free split of :mod:`sdcluster.data.split`, so adding a source never
  moves another's held-out images. ``data.max_samples`` then keeps the first N training rows in table order.
* **Checks** (:func:`source_problems`) run every source through the one validator and name the source.
* **Hub sources** are staged at launch, one :func:`~sdcluster.data.hub.stage_dataset` call each
  (:func:`stage_sources_for_launch`), and read as the folder it writes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sdcluster.config import Config, ConfigError, DataConfig
from sdcluster.config.data import SourceConfig
from sdcluster.data.reader import Problem, Row, scan
from sdcluster.data.split import holdout_split

SOURCE_COLUMN = "source"
"""The table's column that says which source a row came from (only with ``data.sources``)."""


def sources_of(data: DataConfig) -> list[SourceConfig]:
    """``data.sources``, or the one source a config without them names (``data.path`` or its hub dataset)."""
    if data.sources:
        return list(data.sources)
    fields = ("name", "path", "caption_column", "hub", "revision", "commit", "split", "image_column")
    return [SourceConfig(**{key: getattr(data, key) for key in fields})]


def holdout_of(data: DataConfig, source: SourceConfig) -> int:
    """Images of ``source`` held out of training: its own ``holdout``, else ``data.holdout``."""
    return data.holdout if source.holdout is None else source.holdout


def _label(data: DataConfig, index: int) -> str | None:
    """How errors name source ``index``; None for a config without ``data.sources`` (as before them)."""
    return data.sources[index].label(index) if data.sources else None


def split_rows(data: DataConfig, counts: Sequence[int]) -> tuple[list[int], list[int]]:
    """(training rows, held-out rows) of the table whose sources have ``counts`` rows each: every source's
    own seed-free holdout split, its rows offset to where the source starts; the training rows cut to the
    first ``data.max_samples``. Raises ValueError naming the source a holdout leaves empty."""
    train: list[int] = []
    held: list[int] = []
    first = 0
    for index, (source, count) in enumerate(zip(sources_of(data), counts, strict=True)):
        try:
            kept, out = holdout_split(count, holdout_of(data, source))
        except ValueError as err:
            label = _label(data, index)
            raise ValueError(f"{label}: {err}" if label else str(err)) from None
        train += [first + row for row in kept]
        held += [first + row for row in out]
        first += count
    return (train if data.max_samples is None else train[: data.max_samples]), held


def row_repeats(data: DataConfig, counts: Sequence[int], rows: Sequence[int]) -> list[int]:
    """The ``repeats`` of each of ``rows`` (table rows of sources with ``counts`` rows each)."""
    per_row = [s.repeats for s, count in zip(sources_of(data), counts, strict=True) for _ in range(count)]
    return [per_row[row] for row in rows]


def stream_rows(repeats: Sequence[int]) -> list[int] | None:
    """What the sampler's epoch lists: row ``i`` of the training rows ``repeats[i]`` times, in row order
    (the sampler shuffles it); None when every row is read once, so the stream is the rows themselves, as
    it has always been."""
    if all(r == 1 for r in repeats):
        return None
    return [row for row, times in enumerate(repeats) for _ in range(times)]


def row_counts(cfg: Config) -> list[int]:
    """Rows each source contributes: those the job's reader accepts (:func:`~sdcluster.data.reader.scan`,
    no pixel decoded), or those the launch pinned (``data.snapshot``)."""
    from sdcluster.data import snapshot

    pinned = snapshot.rows(cfg)
    if pinned is not None:
        return list(pinned.snapshot.counts)
    return [len(scan(Path(s.path), s.caption_column)[0]) for s in sources_of(cfg.data)]


def _training_split(cfg: Config, counts: list[int]) -> list[int]:
    try:
        train, _ = split_rows(cfg.data, counts)
    except ValueError as err:  # the holdout leaves nothing: its message names the source and the fix
        raise ConfigError(str(err)) from None
    return train


def training_size(cfg: Config) -> int:
    """Examples in one epoch: the training rows (after each source's holdout and ``data.max_samples``),
    each counted ``repeats`` times; what ``train.epochs`` counts."""
    counts = row_counts(cfg)
    return sum(row_repeats(cfg.data, counts, _training_split(cfg, counts)))


def training_sizes(cfg: Config) -> tuple[list[tuple[int, int]], list[int]]:
    """Each training row's upright image size and its ``repeats``, in table order: as the launch pinned them
    (``data.snapshot``), else from the sources' metadata (:func:`~sdcluster.data.reader.scan`, as
    :func:`training_size` counts them) and the image-facts index (which this fills for the job's start)."""
    from sdcluster.data import snapshot
    from sdcluster.data.file_facts import facts_of

    pinned = snapshot.rows(cfg)
    if pinned is not None:
        counts = pinned.snapshot.counts
        train = _training_split(cfg, counts)
        return pinned.select(train).facts()[1], row_repeats(cfg.data, counts, train)
    scanned = [(Path(s.path), scan(Path(s.path), s.caption_column)[0]) for s in sources_of(cfg.data)]
    counts = [len(rows) for _, rows in scanned]
    train = _training_split(cfg, counts)
    files = [folder / row.file_name for folder, rows in scanned for row in rows]
    facts = facts_of([files[row] for row in train], cfg.cache_root)
    return [fact.upright for fact in facts], row_repeats(cfg.data, counts, train)


def load_rows(cfg: Config, cache_dir: Path | str | None = None) -> Any:
    """Every source's rows as one ``datasets.Dataset`` (``image``, ``data.caption_column``, ``file_name``
    and, with ``data.sources``, the source's number in :data:`SOURCE_COLUMN`)."""
    import datasets

    from sdcluster.data.dataset import load_captioned_images

    clean = (cfg.cache_root, cfg.data.max_pixels)  # what the launch's check decoded and found clean
    if not cfg.data.sources:  # exactly the table one folder has always been read as
        return load_captioned_images(cfg.data.path, cfg.data.caption_column, cache_dir, clean)
    parts = []
    for index, source in enumerate(cfg.data.sources):
        part = load_captioned_images(source.path, source.caption_column, cache_dir, clean)
        if source.caption_column != cfg.data.caption_column:  # one caption column for the whole table
            part = part.rename_column(source.caption_column, cfg.data.caption_column)
        parts.append(part.add_column(SOURCE_COLUMN, [index] * len(part)))
    return datasets.concatenate_datasets(parts)


def every_row(cfg: Config) -> Any:
    """Every row of the run's data (held-out ones included): as the launch pinned them (``data.snapshot``,
    no file read), else the folders read now (:func:`load_rows`)."""
    from sdcluster.data import snapshot
    from sdcluster.paths import datasets_cache

    pinned = snapshot.rows(cfg)
    return pinned if pinned is not None else load_rows(cfg, datasets_cache(cfg))


FALLBACK_IMAGES = 4  # with data.holdout=0: the first images of the (training) set, said so in the log


def loss_rows(cfg: Config) -> tuple[Any, list[int], bool]:
    """(the rows, which of them the validation loss is measured on, whether those are held out): each
    source's held-out images, or the first ``FALLBACK_IMAGES`` when nothing is held out. With
    ``data.snapshot`` the rows are the pinned ones (:func:`~sdcluster.data.snapshot.readable` reads their
    images)."""
    dataset = every_row(cfg)
    _, held = split_rows(cfg.data, counts_of(cfg, dataset))
    return dataset, held or list(range(min(FALLBACK_IMAGES, len(dataset)))), bool(held)


def loss_captions(cfg: Config) -> list[str]:
    """The captions of the validation loss's images, in their order (what the text store holds for it)."""
    dataset, indices, _ = loss_rows(cfg)
    return list(column(dataset.select(indices), cfg.data.caption_column))


def column(rows: Any, name: str) -> list[Any]:
    """Column ``name`` of ``rows`` (a ``datasets.Dataset``, or a mapping of columns) as a list, read in one
    Arrow slice: ``rows[name]`` is a lazy column in datasets 4+, read row by row (2 s at 100,000 rows, at
    every job start)."""
    if hasattr(rows, "select_columns"):
        return rows.select_columns([name])[:][name]
    return list(rows[name])


def _from_sources(rows: Any) -> bool:
    """Whether ``rows`` (a ``datasets.Dataset`` or a mapping of columns) came from ``data.sources``."""
    return SOURCE_COLUMN in getattr(rows, "column_names", rows)


def counts_of(cfg: Config, table: Any) -> list[int]:
    """Rows of each source in ``table`` (:func:`load_rows`)."""
    if not _from_sources(table):
        return [len(table)]
    sources = column(table, SOURCE_COLUMN)
    return [sources.count(index) for index in range(len(cfg.data.sources))]


def repeats_of(cfg: Config, rows: Any) -> list[int]:
    """The ``repeats`` of each row of ``rows`` (a selection of :func:`load_rows`): its source's."""
    if not _from_sources(rows):
        return [1] * len(rows)
    return [cfg.data.sources[s].repeats for s in column(rows, SOURCE_COLUMN)]


def image_files(cfg: Config, rows: Any) -> list[Path]:
    """The image file of each row of ``rows`` (a selection of :func:`load_rows`), read from its source's
    folder (headers and bytes for the latent cache and the buckets, without decoding the ``image``
    column)."""
    names = column(rows, "file_name")
    if not _from_sources(rows):
        folder = Path(cfg.data.path)
        return [folder / name for name in names]
    folders = [Path(source.path) for source in cfg.data.sources]
    return [folders[s] / name for s, name in zip(column(rows, SOURCE_COLUMN), names, strict=True)]


def source_problems(
    cfg: Config, remember: bool = False, scanned: list[list[Row] | None] | None = None
) -> list[tuple[str, Problem]]:
    """Every problem of every source, as ``(the source's name, problem)``: its folder, captions and images
    (:func:`~sdcluster.data.metadata.validate`, decoding every image not decoded cleanly before, unchanged
    since; ``remember``: record those decoded cleanly now, for a launch that submits) and a holdout that
    leaves it empty. ``scanned``: filled with each source's rows as read (None for one not checked)."""
    from sdcluster.data.metadata import checked_rows

    found = []
    for index, source in enumerate(cfg.data.sources):
        if scanned is not None:
            scanned.append(None)
        if source.hub and not _here(source):
            continue  # not staged (a dry run): :func:`unstaged` names it among what was not checked
        label = source.label(index)
        if not Path(source.path).is_dir():  # the reader's message names data.path, the one-folder key
            msg = f"{source.path} is not a folder; fix its path (a folder of images + metadata.jsonl)"
            found.append((label, Problem("no_folder", msg)))
            continue
        rows, problems = checked_rows(
            source.path, cfg.data.max_pixels, source.caption_column, cfg.cache_root, remember
        )
        if not problems:
            if scanned is not None:
                scanned[-1] = rows
            count = len(rows)
            holdout = holdout_of(cfg.data, source)
            if holdout >= count:
                fix = f"give the source holdout: N with N < {count} (or 0), or lower data.holdout"
                msg = f"holdout={holdout} leaves nothing of its {count} images to train on; {fix}"
                problems = [Problem("holdout", msg)]
        found += [(label, problem) for problem in problems]
    return found


def check_sources(cfg: Config, remember: bool = False) -> list[list[Row] | None]:
    """Refuse, before anything is queued, the sources :func:`source_problems` finds fault with; each
    source's rows as read (None for a hub source a dry run did not stage)."""
    scanned: list[list[Row] | None] = []
    problems = source_problems(cfg, remember, scanned)
    if not problems:
        return scanned
    listing = "\n  ".join(f"{label}: {problem}" for label, problem in problems[:20])
    more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
    first = problems[0][0]
    captions = any(problem.kind == "no_caption" for _, problem in problems)
    column = "A source's captions under another key: caption_column: KEY in its entry. " if captions else ""
    raise ConfigError(
        f"data.sources: {len(problems)} problem(s), the first in {first}:\n  {listing}{more}\n{column}"
        "Fix them, then check with: python -m sdcluster.data validate data=sources 'data.sources=[...]' "
        "(the same overrides as the launch)"
    )


def stage_sources_for_launch(
    cfg: Config, dry_run: bool = False, say: Callable[[str], None] = print
) -> Config:
    """``cfg`` with each hub source pinned to its commit and its ``path`` set to the staged folder (one
    :func:`~sdcluster.data.hub.stage_dataset` each, as ``data=hub``); ``cfg`` itself is left as it was."""
    if not any(source.hub for source in cfg.data.sources):
        return cfg
    from sdcluster.data.hub import HubDataSpec, stage_dataset

    download = not dry_run or cfg.train.epochs is not None  # as data=hub: epochs count the images
    staged_sources = []
    for index, source in enumerate(cfg.data.sources):
        if source.hub:
            spec = HubDataSpec(
                source.name,
                source.revision,
                source.commit,
                source.split,
                source.image_column,
                source.caption_column,
                cfg.data.cache_dir,
                key=f"data.sources[{index}]",
            )
            staged = stage_dataset(spec, download=download, say=say)
            say(f"{source.label(index)}: {staged.repo_id} -> commit {staged.commit}: {staged.folder}")
            source = dataclasses.replace(source, commit=staged.commit, path=str(staged.folder))
        staged_sources.append(source)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, sources=staged_sources))


def unstaged(cfg: Config) -> list[str]:
    """Hub sources whose images are not here yet (a dry run downloads nothing): their checks wait."""
    return [s.label(i) for i, s in enumerate(cfg.data.sources) if s.hub and not _here(s)]


def _here(source: SourceConfig) -> bool:
    """Whether the source's folder is on this machine (an empty path, a hub source not staged yet, is not
    the working directory)."""
    return bool(source.path) and Path(source.path).is_dir()
