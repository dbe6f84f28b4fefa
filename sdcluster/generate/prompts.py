"""Prompt programs: slots and templates in a YAML file, expanded into the prompts a generation renders.

``generate.prompts`` and a plain ``generate.prompts_file`` (one prompt a line) are programs too: every line
is a template without slots, with the ``generate`` settings. A ``.yaml``/``.yml`` file adds ``slots:`` (value
lists, or ``value: weight`` mappings) and ``templates:`` that name them as ``{slot}``, each with optional
``images``, ``count``, ``negative``, ``guidance_scale``, ``steps``, ``width`` and ``height``
(docs/reference/generation.md: "Prompt
programs and synthetic datasets").

Without ``count`` a template makes the full product of the slots it uses (each value once, so weights do not
matter there). Expansion is a pure function of the program and ``generate.seed``: draws come from sha256
(never ``hash()``, which is salted per process, nor a shared random stream, whose state would depend on
what was drawn before), so the prompts do not depend on shards, batch size or the Python version.
"""

from __future__ import annotations

import itertools
import math
import string
from bisect import bisect_right
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdcluster.config.checks import ConfigError
from sdcluster.config.generate import is_program_file
from sdcluster.derive import derive_unit

if TYPE_CHECKING:
    from sdcluster.config import GenerateConfig

TEMPLATE_KEYS = frozenset(
    {"text", "images", "count", "negative", "guidance_scale", "steps", "width", "height"}
)
# Columns of the exported dataset that a slot must not shadow (see dataset_export).
RESERVED_SLOTS = frozenset({"file_name", "text", "image", "template"})


@dataclass(frozen=True)
class Sampling:
    """The per-template pipeline settings: images that share them can share a pipeline call."""

    negative_prompt: str | None
    guidance_scale: float
    steps: int
    width: int | None = None  # pixels, a multiple of 8; None: generate.width (or the model's default)
    height: int | None = None


@dataclass(frozen=True)
class Template:
    """One template; ``None`` settings fall back to ``generate``'s. ``literal`` text is used as is."""

    text: str
    slots: tuple[str, ...] = ()
    images: int | None = None
    count: int | None = None
    negative: str | None = None
    has_negative: bool = False  # `negative: null` (none) differs from no key (generate.negative_prompt)
    guidance_scale: float | None = None
    steps: int | None = None
    literal: bool = False
    width: int | None = None
    height: int | None = None


@dataclass(frozen=True)
class Program:
    """Slots (value -> weight, in file order) and templates, as read and checked from the file."""

    slots: dict[str, dict[str, float]]
    templates: tuple[Template, ...]


@dataclass(frozen=True)
class Prompt:
    """One expanded prompt: its text, where it came from, how many images and with which settings."""

    text: str
    template_index: int
    labels: tuple[tuple[str, str], ...]
    images: int
    sampling: Sampling


def load_program(gen: GenerateConfig) -> Program:
    """``generate.prompts`` as literal templates, then the prompts file (lines, or a YAML program)."""
    templates = [Template(text=p, literal=True) for p in gen.prompts]
    slots: dict[str, dict[str, float]] = {}
    if gen.prompts_file:
        path = Path(gen.prompts_file)
        if not path.is_file():
            raise ConfigError(
                f"generate.prompts_file: {path} does not exist. Fix: give a text or YAML file path"
            )
        if is_program_file(path):
            program = parse_program(path)
            slots, templates = program.slots, templates + list(program.templates)
        else:
            lines = (line.strip() for line in path.read_text().splitlines())
            templates += [Template(text=line, literal=True) for line in lines if line]
    return Program(slots=slots, templates=tuple(templates))


def parse_program(path: Path) -> Program:
    """Read and check a YAML program; every error names the file, the template and the fix."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{at} ({problem}). Fix: correct the file's syntax") from None
    where = f"generate.prompts_file {path}"
    if not isinstance(data, dict):
        raise ConfigError(
            f"{where}: expected a mapping with `templates:` (and `slots:`). "
            "Fix: see docs/reference/generation.md"
        )
    unknown = set(data) - {"slots", "templates"}
    _require(
        not unknown, where, f"unknown key(s) {sorted(map(str, unknown))}", "use only slots and templates"
    )
    slots = _parse_slots(data.get("slots") or {}, where)
    raw = data.get("templates")
    _require(isinstance(raw, list) and raw, where, "no `templates:` list", "add at least one template")
    templates = tuple(_parse_template(t, slots, f"{where}, template {n}") for n, t in enumerate(raw))
    return Program(slots=slots, templates=templates)


def _require(ok: bool, where: str, problem: str, fix: str) -> None:
    if not ok:
        raise ConfigError(f"{where}: {problem}. Fix: {fix}")


def _parse_slots(raw: Any, where: str) -> dict[str, dict[str, float]]:
    _require(
        isinstance(raw, dict),
        where,
        "`slots:` must be a mapping of name -> values",
        "see docs/reference/generation.md",
    )
    slots: dict[str, dict[str, float]] = {}
    for name, values in raw.items():
        at = f"{where}, slot {name!r}"
        _require(isinstance(name, str) and name.isidentifier(), at, "bad slot name", "use letters, digits, _")
        _require(name not in RESERVED_SLOTS, at, "is a dataset column name", "rename the slot")
        values = [] if values is None else values
        _require(
            isinstance(values, dict | list),
            at,
            "must be a list or a value: weight mapping",
            "see docs/reference/generation.md",
        )
        pairs = values.items() if isinstance(values, dict) else ((v, 1) for v in values)
        weighted: dict[str, float] = {}
        for value, weight in pairs:
            _require(
                isinstance(value, str | int | float) and not isinstance(value, bool),
                at,
                f"value {value!r} is not text",
                "quote values YAML reads as booleans or null (yes, no, on, off, null)",
            )
            _require(
                isinstance(weight, int | float)
                and not isinstance(weight, bool)
                and 0 < weight < float("inf"),
                at,
                f"weight {weight!r} of {value!r} is not a positive number",
                "give each value a weight > 0, e.g. {light: 2, dark: 1}",
            )
            _require(str(value) not in weighted, at, f"value {value!r} is listed twice", "keep one")
            weighted[str(value)] = float(weight)
        _require(bool(weighted), at, "has no values", "list at least one value, or remove the slot")
        slots[name] = weighted
    return slots


def _template_slots(text: str, where: str, slots: dict[str, dict[str, float]]) -> tuple[str, ...]:
    """The slots ``text`` uses, in order of first use; only plain ``{name}`` fields are allowed."""
    try:
        fields = list(string.Formatter().parse(text))
    except ValueError as err:
        raise ConfigError(f"{where}: {err} in {text!r}. Fix: write literal braces as {{{{ and }}}}") from None
    used: list[str] = []
    for _, name, spec, conversion in fields:
        if name is None:
            continue
        _require(
            name.isidentifier() and not spec and not conversion,
            where,
            f"{{{name}}} is not a slot reference",
            "write {slot_name}; literal braces as {{ and }}",
        )
        _require(
            name in slots, where, f"unknown slot {name!r}", f"define it under slots: (have {sorted(slots)})"
        )
        if name not in used:
            used.append(name)
    return tuple(used)


def _positive_int(raw: dict[str, Any], key: str, where: str) -> int | None:
    value = raw.get(key)
    ok = value is None or (isinstance(value, int) and not isinstance(value, bool) and value > 0)
    _require(ok, where, f"{key} must be a whole number > 0, got {value!r}", f"e.g. {key}: 2")
    return value


def _parse_template(raw: Any, slots: dict[str, dict[str, float]], where: str) -> Template:
    if isinstance(raw, str):  # a bare string is a template with only `text`
        raw = {"text": raw}
    _require(
        isinstance(raw, dict), where, "must be a mapping with `text:`", "see docs/reference/generation.md"
    )
    unknown = set(raw) - TEMPLATE_KEYS
    _require(
        not unknown, where, f"unknown key(s) {sorted(map(str, unknown))}", f"use {sorted(TEMPLATE_KEYS)}"
    )
    text = raw.get("text")
    _require(isinstance(text, str) and text.strip() != "", where, "no `text:`", "give the prompt text")
    negative = raw.get("negative")
    _require(negative is None or isinstance(negative, str), where, "negative must be text", "quote it")
    guidance = raw.get("guidance_scale")
    _require(
        guidance is None
        or (isinstance(guidance, int | float) and not isinstance(guidance, bool) and guidance >= 0),
        where,
        f"guidance_scale must be a number >= 0, got {guidance!r}",
        "e.g. guidance_scale: 7.5",
    )
    return Template(
        text=text,
        slots=_template_slots(text, where, slots),
        images=_positive_int(raw, "images", where),
        count=_positive_int(raw, "count", where),
        negative=negative,
        has_negative="negative" in raw,
        guidance_scale=None if guidance is None else float(guidance),
        steps=_positive_int(raw, "steps", where),
        width=_multiple_of_8(raw, "width", where),
        height=_multiple_of_8(raw, "height", where),
    )


def _multiple_of_8(raw: dict, key: str, where: str) -> int | None:
    """A template's image side: the pipeline's VAE scales by 8, so any multiple of 8 (an aspect-ratio
    bucket's size, e.g. 832 x 1216) works."""
    value = _positive_int(raw, key, where)
    _require(
        value is None or value % 8 == 0,
        where,
        f"{key} must be a multiple of 8, got {value}",
        f"e.g. {key}: 832",
    )
    return value


def _unit(*parts: object) -> float:
    """A uniform number in [0, 1) from sha256 of ``parts``: the same on every machine and Python."""
    return derive_unit("sdcluster-slot", *parts)


def _draw(values: dict[str, float], u: float) -> str:
    names, weights = list(values), list(values.values())
    bounds = list(itertools.accumulate(weights))
    return names[min(bisect_right(bounds, u * bounds[-1]), len(names) - 1)]


def template_prompts(program: Program, index: int) -> int:
    """How many prompts template ``index`` makes, without making them: ``count``, or the product of the sizes
    of the slots it uses (1 for a template without slots)."""
    template = program.templates[index]
    if template.count is not None:
        return template.count
    return math.prod(len(program.slots[s]) for s in template.slots)


def labels_at(program: Program, index: int, number: int, seed: int) -> tuple[tuple[str, str], ...]:
    """The slot values of template ``index``'s prompt ``number``, computed alone.

    The full product is ``number`` read as a mixed-radix numeral, one digit a slot, the last slot the
    fastest (``itertools.product``'s order, which programs have always been expanded in). With ``count``,
    each draw of each slot has its own hash input (seed, template, draw, slot), so adding a template or a
    slot to a program leaves the draws of the others as they were.
    """
    template = program.templates[index]
    if template.count is not None:
        return tuple((s, _draw(program.slots[s], _unit(seed, index, number, s))) for s in template.slots)
    values: list[tuple[str, str]] = []
    for slot in reversed(template.slots):
        names = program.slots[slot]
        number, digit = divmod(number, len(names))
        values.append((slot, next(itertools.islice(names, digit, None))))
    return tuple(reversed(values))


def sampling_of(template: Template, gen: GenerateConfig) -> Sampling:
    """A template's pipeline settings, ``generate``'s where it sets none."""
    return Sampling(
        negative_prompt=template.negative if template.has_negative else gen.negative_prompt,
        guidance_scale=gen.guidance_scale if template.guidance_scale is None else template.guidance_scale,
        steps=template.steps or gen.steps,
        width=template.width or gen.width,
        height=template.height or gen.height,
    )


def prompt_at(program: Program, gen: GenerateConfig, index: int, number: int) -> Prompt:
    """Prompt ``number`` of template ``index``, made alone (a plan never holds all its prompts)."""
    template = program.templates[index]
    labels = labels_at(program, index, number, gen.seed)
    text = template.text if template.literal else template.text.format_map(dict(labels))
    return Prompt(text, index, labels, template.images or gen.num_images, sampling_of(template, gen))


def expand(program: Program, gen: GenerateConfig) -> list[Prompt]:
    """Every prompt of the program in order, as a list: for small programs and tests (a job's plan,
    :class:`~sdcluster.generate.plan.Plan`, makes each prompt when it needs it)."""
    return [
        prompt_at(program, gen, index, number)
        for index in range(len(program.templates))
        for number in range(template_prompts(program, index))
    ]


def check_program(gen: GenerateConfig) -> None:
    """On the login node (from the launch's preflight): a program file parses and fits the rest.

    A missing file is left to the preflight check, which says so with the fix.
    """
    if not is_program_file(gen.prompts_file) or not Path(str(gen.prompts_file)).is_file():
        slots: dict[str, dict[str, float]] = {}
    else:
        slots = parse_program(Path(str(gen.prompts_file))).slots
    if gen.only:
        _check_only(gen, load_program(gen))
    split = gen.split
    if split.by == "slot" and split.slot not in slots:
        raise ConfigError(
            f"generate.split.slot: {split.slot!r} is not a slot of generate.prompts_file "
            f"({gen.prompts_file}; slots: {sorted(slots)}). Fix: name one of its slots, or split by fraction"
        )
    if split.by == "slot":
        unknown = sorted(set(split.validation) - set(slots[split.slot]))
        _require(
            not unknown,
            "generate.split.validation",
            f"{unknown} are not values of slot {split.slot!r}",
            f"use values from {list(slots[split.slot])}",
        )


def _check_only(gen: GenerateConfig, program: Program) -> None:
    p, i = (int(part[1:]) for part in str(gen.only).removesuffix(".png").split("-"))
    ends = list(itertools.accumulate(template_prompts(program, t) for t in range(len(program.templates))))
    t = bisect_right(ends, p)  # the template of prompt p, found by counting, not expanding
    images = (program.templates[t].images or gen.num_images) if t < len(ends) else 0
    _require(
        i < images,
        "generate.only",
        f"{gen.only} is not in this plan ({ends[-1] if ends else 0} prompts)",
        "copy the remake command of the image's record, which carries the settings that planned it",
    )
