"""A job's config pickled by an earlier sdcluster (submitit pickles the callable when it queues the job and
unpickles it at every start, requeues included) loads after an upgrade with the fields added since."""

from __future__ import annotations

import dataclasses
import pickle

from sdcluster.config import ClusterConfig, Config
from sdcluster.config.checks import Schema
from sdcluster.config.cluster import GenerationResources


def test_a_config_pickled_before_a_field_existed_loads_with_its_default():
    cfg = Config()
    cfg.cluster.partition = "gpu"
    # the shape an older sdcluster pickled: no cluster.generate, no train.lora
    del cfg.cluster.__dict__["generate"]
    del cfg.train.__dict__["lora"]
    loaded = pickle.loads(pickle.dumps(cfg))
    assert loaded.cluster.partition == "gpu"  # what was pickled is kept
    assert loaded.cluster.generate == GenerationResources()  # a default_factory field
    assert loaded.train.lora == Config().train.lora
    assert dataclasses.asdict(loaded) == dataclasses.asdict(Config(cluster=ClusterConfig(partition="gpu")))


def test_every_schema_class_fills_missing_fields():
    """Every dataclass reachable from Config has the base that fills them (a new group must too)."""
    missing = []

    def visit(obj: object) -> None:
        if "__setstate__" not in vars(Schema):  # pragma: no cover - the base itself lost it
            missing.append("Schema")
        if not isinstance(obj, Schema):
            missing.append(type(obj).__name__)
        for f in dataclasses.fields(obj):  # type: ignore[arg-type]
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                visit(value)

    visit(Config())
    assert not missing, missing
