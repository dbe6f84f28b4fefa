"""train.method=lora under train.strategy=fsdp: the frozen base is sharded with its adapters, only the
adapters are trained, checkpointed and averaged; two CPU ranks train as DDP does, resume bit-exact, and the
export is the usual LoRA file holding the adapters gathered from the shards.

Two-rank runs as in :mod:`tests.train.test_fsdp` (its helpers start them).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.train.test_fsdp import RUN, _assert_bitwise, _base, _newest, _ranks, _sharded_state

pytestmark = pytest.mark.slow

LORA = [
    *RUN,
    "train.method=lora",
    "optim.lr=5e-2",
    "train.max_steps=4",
    "train.export_formats=[diffusers,kohya]",
]


def _as_exported(adapters: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """peft's tensors of the denoiser under the names ``pytorch_lora_weights.safetensors`` gives them:
    the adapter's name dropped (as peft's own state dict does), diffusers' layer names, ``unet.``."""
    from diffusers.utils import convert_state_dict_to_diffusers

    plain = {name.replace(".default", ""): value for name, value in adapters.items()}
    return {f"unet.{name}": value for name, value in convert_state_dict_to_diffusers(plain).items()}


def test_lora_trains_sharded_like_ddp_resumes_bit_exact_and_exports_the_gathered_adapters(make_cfg, tmp_path):
    fsdp = [*LORA, "train.strategy=fsdp"]
    ddp = _ranks(tmp_path, 2, [*_base(make_cfg, "ddp"), *LORA])
    straight = _ranks(tmp_path, 2, [*_base(make_cfg, "a"), *fsdp])
    assert [s for s, _ in straight["losses"]] == [1, 2, 3, 4]
    for (_, a), (_, b) in zip(ddp["losses"], straight["losses"], strict=True):
        assert b == pytest.approx(a, rel=1e-5, abs=0)  # float32 sums in another order, as in test_fsdp

    end = _newest(straight["run_dir"])
    state = _sharded_state(end, tmp_path)
    # what the method trains and no more: the frozen base is reloaded from the model, not checkpointed
    assert state["model"] and all(".lora_" in name for name in state["model"])
    assert state["ema"].keys() == state["model"].keys()

    # the export: the EMA adapters gathered from the shards, bit for bit, in the usual file and formats
    lora_dir = Path(straight["model_dir"])
    exported = load_file(str(lora_dir / "pytorch_lora_weights.safetensors"))
    expected = _as_exported(state["ema"])
    assert exported.keys() == expected.keys()
    assert all(torch.equal(exported[name], expected[name]) for name in expected)
    assert (lora_dir / "README.md").is_file()
    assert list(lora_dir.glob("*_kohya.safetensors"))

    first = _ranks(tmp_path, 2, [*_base(make_cfg, "b"), *fsdp], stop=2)
    assert first["interrupted"] and first["step"] == 2
    second = _ranks(tmp_path, 2, [*_base(make_cfg, "b"), *fsdp])
    assert "resumed from" in second["log"] and second["step"] == 4
    assert second["losses"] == [pair for pair in straight["losses"] if pair[0] > 2]
    _assert_bitwise(state, _sharded_state(_newest(second["run_dir"]), tmp_path))
