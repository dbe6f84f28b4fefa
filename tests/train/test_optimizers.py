"""``optim=NAME``: each optimizer has its own schema and identity, builds from the method's groups, costs
what its schema says, and an interrupted run resumes bit-exact with it (AdamW's: tests/train/test_loop.py)."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException

from sdcluster.config import ConfigError, store
from sdcluster.config.optim import OPTIMIZERS as SCHEMAS
from sdcluster.identity import run_hash, semantic_train_config
from sdcluster.runtime.step_events import stop_at
from sdcluster.train import optimizers, step_folders
from sdcluster.train.loop import train
from tests.conftest import compose
from tests.train.test_loop import FAST, _assert_bitwise_equal, _final_weights

ADAMW_KEYS = {
    *("name", "lr", "betas", "weight_decay", "eps", "scale_lr", "lr_schedule", "warmup_steps"),
    *("max_grad_norm", "fused"),
}
"""The keys every run folder made so far was hashed with (``optim=adamw``)."""


def test_every_optimizer_has_a_schema_a_builder_and_a_yaml():
    assert set(SCHEMAS) == set(optimizers.OPTIMIZERS) == set(store.options("optim"))


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_each_option_composes_into_its_own_schema(name):
    cfg = compose([f"optim={name}"])
    assert type(cfg.optim) is SCHEMAS[name]
    assert cfg.optim.name == name


def test_adamw_keeps_the_keys_its_runs_were_hashed_with_and_each_optimizer_is_another_run():
    assert set(semantic_train_config(compose([]))["optim"]) == ADAMW_KEYS
    assert run_hash(compose([])) == run_hash(compose(["optim=adamw"]))
    hashes = {run_hash(compose([f"optim={name}"])) for name in SCHEMAS}
    assert len(hashes) == len(SCHEMAS)
    prodigy = run_hash(compose(["optim=prodigy"]))
    assert run_hash(compose(["optim=prodigy", "optim.d_coef=0.5"])) != prodigy  # its settings count too


def test_a_key_of_another_optimizer_is_refused_and_its_own_passes_the_command_line_check():
    from sdcluster.launch import check_override_keys

    with pytest.raises(ConfigCompositionException, match=r"optim\.betas"):
        compose(["optim=adafactor", "optim.betas=[0.5,0.5]"])
    assert compose(["optim=adafactor", "optim.beta1=0.9"]).optim.beta1 == 0.9
    check_override_keys(["optim=adafactor", "optim.beta1=0.9"])  # known: a key of one of the options
    with pytest.raises(ConfigError, match=r"Did you mean optim\.beta1\?"):
        check_override_keys(["optim=adafactor", "optim.beta_1=0.9"])


def test_optim_name_alone_does_not_switch_the_optimizer():
    with pytest.raises(
        ConfigError, match=r"optim\.name: .*Fix: choose the optimizer as a config group, optim=prodigy"
    ):
        compose(["optim.name=prodigy"])


@pytest.mark.parametrize("lr", ["1e-5", "100"])
def test_prodigy_refuses_a_step_size_as_its_lr(lr):
    with pytest.raises(ConfigError, match=r"optim\.lr: .*Fix: use optim\.lr=1\.0"):
        compose(["optim=prodigy", f"optim.lr={lr}"])
    with pytest.raises(ConfigError, match=r"optim\.scale_lr: "):
        compose(["optim=prodigy", "optim.scale_lr=true"])


def test_a_missing_package_is_named_with_its_install_command_before_anything_runs(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # the import system's "not installed"
    with pytest.raises(
        ConfigError, match=r"optim=adamw8bit: needs .*bitsandbytes.*pip install 'sdcluster\[adamw8bit\]'"
    ):
        compose(["optim=adamw8bit"])


def test_a_sweep_point_of_another_optimizer_is_rebuilt_from_its_ledger():
    from sdcluster.sweep.ledger import point_config

    cfg = compose(["optim=prodigy", "optim.d_coef=0.5"])
    again = point_config({"config": dataclasses.asdict(cfg)})
    assert again.optim == cfg.optim and run_hash(again) == run_hash(cfg)


def _state_bytes(state: dict) -> int:
    """Bytes of every tensor in one parameter's optimizer state (bitsandbytes nests some in a dict)."""
    total = 0
    for value in state.values():
        if isinstance(value, dict):
            total += _state_bytes(value)
        elif torch.is_tensor(value):
            total += value.numel() * value.element_size()
    return total


@pytest.mark.parametrize(
    "overrides",
    [
        ["optim=adamw"],
        ["optim=adamw8bit"],
        ["optim=adafactor"],
        ["optim=adafactor", "optim.beta1=0.9"],
        ["optim=prodigy"],
        ["optim=prodigy", "optim.slice_p=11"],
    ],
    ids=lambda o: "-".join(x.split("=")[1] for x in o),
)
@pytest.mark.parametrize("shape", [(512, 1024), (64, 32, 3, 3), (320,)], ids=str)
def test_a_step_moves_the_weights_and_keeps_the_state_its_schema_says(overrides, shape):
    """What the memory plan sums (``state_bytes`` of each trained tensor) is what the optimizer holds after a
    step: a matrix (quantized by 8-bit AdamW, factored by Adafactor), a conv kernel, a vector."""
    cfg = compose(overrides)
    weight = torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(0)))
    before = weight.detach().clone()
    lr = cfg.optim.lr
    optimizer = optimizers.build_optimizer(cfg.optim, [{"params": [weight], "lr": lr}], lr)
    weight.grad = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    optimizer.step()
    assert not torch.equal(weight.detach(), before)
    assert _state_bytes(optimizer.state[weight]) == cfg.optim.state_bytes(shape, 4)


def test_the_state_per_parameter_of_a_large_matrix_is_what_the_memory_plan_expects():
    per_param = {name: compose([f"optim={name}"]).optim.state_bytes_per_param(4) for name in SCHEMAS}
    assert per_param["adamw"] == pytest.approx(8)
    assert per_param["adamw8bit"] == pytest.approx(2, abs=0.05)
    assert per_param["adafactor"] == pytest.approx(0, abs=0.01)
    assert per_param["prodigy"] == pytest.approx(16)


def _optimizer_state_dtypes(checkpoint: Path) -> set[torch.dtype]:
    state = torch.load(checkpoint / "optimizer.bin", weights_only=True)["state"]
    found: set[torch.dtype] = set()

    def visit(node: dict) -> None:
        for value in node.values():
            if isinstance(value, dict):
                visit(value)
            elif torch.is_tensor(value):
                found.add(value.dtype)

    for per_param in state.values():
        visit(per_param)
    return found


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [
        ["optim=adamw8bit", "optim.min_8bit_size=16"],  # the tiny model's tensors are small: quantize them
        ["optim=adafactor", "optim.beta1=0.9"],
        ["optim=prodigy", "optim.safeguard_warmup=true"],
    ],
    ids=lambda extra: extra[0].split("=")[1],
)
def test_an_interrupted_run_resumes_bitwise_with_each_optimizer(make_cfg, tmp_path, extra):
    """Stop at step 2, resume, and end where an uninterrupted run ends: the optimizer's state (8-bit moments,
    factored moments, Prodigy's step-size estimate) came back exactly from the checkpoint."""
    stop = 2
    overrides = [*FAST, "task=train", "train.max_steps=4", "optim.lr_schedule=cosine", "optim.warmup_steps=1"]
    overrides += [*extra, *(["optim.lr=1e-3"] if "optim=prodigy" not in extra else [])]
    straight = train(make_cfg([*overrides, f"output_root={tmp_path / 'a'}"]))

    cfg = make_cfg([*overrides, f"output_root={tmp_path / 'b'}"])
    with stop_at(lambda step: step == stop):
        first = train(cfg)
    assert first.interrupted and first.step == stop
    checkpoint = step_folders.complete_checkpoints(first.run_dir / "checkpoints")[0]
    if "optim=adamw8bit" in extra:
        assert torch.uint8 in _optimizer_state_dtypes(checkpoint)  # the moments are saved in 8 bits
    second = train(cfg)
    assert not second.interrupted and second.step == 4

    _assert_bitwise_equal(_final_weights(straight.run_dir), _final_weights(second.run_dir))
    assert second.losses == [pair for pair in straight.losses if pair[0] > stop]
