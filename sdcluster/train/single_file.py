"""Single-file checkpoints: an exported pipeline as one ``.safetensors`` in the original SD layout.

ComfyUI, AUTOMATIC1111/Forge and InvokeAI load a full model as one file whose keys are those of the
original (LDM) code: ``model.diffusion_model.`` (UNet), ``first_stage_model.`` (VAE),
``cond_stage_model.`` (SD 1.x/2.x's text encoder) or ``conditioner.embedders.0.`` / ``.1.`` (SDXL's two).
diffusers only reads that layout (``from_single_file``, ``diffusers.loaders.single_file_utils``); its
writer lives in diffusers' ``scripts/`` (``convert_diffusers_to_original_stable_diffusion.py`` and
``..._sdxl.py``), outside the library, and hard-codes SD's block counts. So the renames are written here,
from each component's own config (block counts, layers per block), following those scripts; what they get
wrong is fixed and said where it is. The tests check the result against what the library loads:
``from_single_file(file, config=<the exported folder>)`` gives back every weight bit for bit.

The file is made from the diffusers folder the export has just written (:func:`write_single_file`), so
both hold the same tensors.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from sdcluster.models.family import family_of_folder
from sdcluster.models.single_file import CHECKPOINT_SUFFIX, TEXT_PREFIXES

log = logging.getLogger("sdcluster")

Tensors = dict[str, Any]
_TEXT_MODEL = "text_model."


def _unet_block_renames(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(diffusers prefix, LDM prefix) of each UNet block. LDM numbers its blocks in one sequence:
    ``input_blocks.0`` is ``conv_in``, then per down block ``layers_per_block`` (resnet ``.0``, attention
    ``.1``) and one downsampler; ``output_blocks`` hold ``layers_per_block + 1`` per up block, the upsampler
    after the attention (``.2``) or in its place (``.1``). The scripts fix 4 blocks (3 for SDXL); counted
    here from the config, so the tiny models and any other shape map the same way."""
    per = config["layers_per_block"]
    if not isinstance(per, int):  # a per-block list: the original UNet has one count for every block
        if len(set(per)) != 1:
            raise ValueError(f"unet: layers_per_block={per} has no original Stable Diffusion layout")
        per = per[0]
    blocks = len(config["down_block_types"])
    up_attentions = ["CrossAttn" in kind for kind in config["up_block_types"]]
    renames = [
        ("mid_block.resnets.0.", "middle_block.0."),
        ("mid_block.attentions.0.", "middle_block.1."),
        ("mid_block.resnets.1.", "middle_block.2."),
    ]
    for i in range(blocks):
        for j in range(per):
            renames.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{i * (per + 1) + j + 1}.0."))
            renames.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{i * (per + 1) + j + 1}.1."))
        renames.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(i + 1) * (per + 1)}.0.op."))
        for j in range(per + 1):
            renames.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{i * (per + 1) + j}.0."))
            renames.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{i * (per + 1) + j}.1."))
        upsampler = f"output_blocks.{i * (per + 1) + per}.{2 if up_attentions[i] else 1}."
        renames.append((f"up_blocks.{i}.upsamplers.0.", upsampler))
    return renames


_UNET_LAYERS = {  # the top-level layers, as single_file_utils.DIFFUSERS_TO_LDM_MAPPING["unet"] names them
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
    "add_embedding.linear_1.": "label_emb.0.0.",  # SDXL's size/crop and pooled-text embedding
    "add_embedding.linear_2.": "label_emb.0.2.",
}
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3"}
_RESNET |= {"time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}


def _rename_prefix(
    key: str, renames: list[tuple[str, str]] | Mapping[str, str], resnet: Mapping[str, str] | None = None
) -> str | None:
    """``key`` with the first matching (old, new) prefix replaced; None when none matches. ``resnet``: the
    renames of a resnet's own layers (the UNet's; the VAE's resnets keep their names)."""
    pairs = renames.items() if isinstance(renames, Mapping) else renames
    for old, new in pairs:
        if key.startswith(old):
            rest = key[len(old) :]
            if resnet and ".resnets." in old:  # an attention keeps its layers' names
                layer, _, tail = rest.partition(".")
                rest = f"{resnet.get(layer, layer)}.{tail}"
            return new + rest
    return None


def unet_state(state: Tensors, config: Mapping[str, Any]) -> Tensors:
    """A diffusers UNet's weights under LDM's ``UNetModel`` names (``model.diffusion_model.`` added)."""
    blocks = _unet_block_renames(config)
    out: Tensors = {}
    for key, tensor in state.items():
        new = _rename_prefix(key, _UNET_LAYERS) or _rename_prefix(key, blocks, _RESNET)
        if new is None:
            raise ValueError(f"unet: no original Stable Diffusion name for {key}")
        out["model.diffusion_model." + new] = tensor
    return out


def _vae_renames(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(diffusers prefix, LDM prefix) of the VAE's blocks: LDM numbers the decoder's up blocks from the
    bottom (``up.{n-1-i}``), diffusers from the top."""
    n = len(config["down_block_types"])
    renames = [
        (f"{side}.mid_block.resnets.{k}.", f"{side}.mid.block_{k + 1}.")
        for side in ("encoder", "decoder")
        for k in range(2)
    ]
    renames += [(f"{side}.mid_block.attentions.0.", f"{side}.mid.attn_1.") for side in ("encoder", "decoder")]
    renames += [(f"{side}.conv_norm_out.", f"{side}.norm_out.") for side in ("encoder", "decoder")]
    for i in range(n):
        renames.append((f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block."))
        renames.append((f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."))
        renames.append((f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{n - 1 - i}.block."))
        renames.append((f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{n - 1 - i}.upsample."))
    return renames


_VAE_ATTENTION = {
    "group_norm.": "norm.",
    "to_q.": "q.",
    "to_k.": "k.",
    "to_v.": "v.",
    "to_out.0.": "proj_out.",
}


def vae_state(state: Tensors, config: Mapping[str, Any]) -> Tensors:
    """A diffusers VAE's weights under LDM's ``AutoencoderKL`` names (``first_stage_model.`` added). The
    mid-block attention's linear layers are 1x1 convolutions there: their weights get two trailing dims
    (``single_file_utils.conv_attn_to_linear`` removes them again)."""
    renames = _vae_renames(config)
    out: Tensors = {}
    for key, tensor in state.items():
        new = _rename_prefix(key, renames) or key  # conv_in/out, quant_conv, post_quant_conv keep their names
        new = new.replace("conv_shortcut", "nin_shortcut")
        if ".mid.attn_1." in new:
            head, leaf = new.split(".mid.attn_1.")
            leaf = _rename_prefix(leaf, _VAE_ATTENTION) or leaf
            new = f"{head}.mid.attn_1.{leaf}"
            if tensor.ndim == 2:
                tensor = tensor.reshape(*tensor.shape, 1, 1)
        out["first_stage_model." + new] = tensor
    return out


def _with_text_model(state: Tensors) -> Tensors:
    """CLIP's weights under ``text_model.``: transformers 5 dropped that module from ``CLIPTextModel``, but
    the original checkpoints (and ``single_file_utils``, which strips it again for such models) have it."""
    keep = ("text_model.", "text_projection.")
    return {k if k.startswith(keep) else _TEXT_MODEL + k: v for k, v in state.items()}


def clip_state(state: Tensors, prefix: str) -> Tensors:
    """An OpenAI CLIP text encoder: the original files keep transformers' own names, under ``prefix``."""
    return {prefix + k: v for k, v in _with_text_model(state).items()}


_OPEN_CLIP = [  # transformers' CLIP names -> OpenCLIP's (DIFFUSERS_TO_LDM_MAPPING["openclip"], reversed)
    ("text_model.embeddings.position_embedding.weight", "positional_embedding"),
    ("text_model.embeddings.token_embedding.weight", "token_embedding.weight"),
    ("text_model.final_layer_norm.", "ln_final."),
    ("text_model.encoder.layers.", "transformer.resblocks."),
]
_OPEN_CLIP_LAYER = {
    ".layer_norm1.": ".ln_1.",
    ".layer_norm2.": ".ln_2.",
    ".mlp.fc1.": ".mlp.c_fc.",
    ".mlp.fc2.": ".mlp.c_proj.",
    ".self_attn.out_proj.": ".attn.out_proj.",
}
_QKV = re.compile(r"^(?P<layer>.*)\.self_attn\.(?P<which>[qkv])_proj\.(?P<kind>weight|bias)$")


def open_clip_state(state: Tensors, prefix: str) -> Tensors:
    """An OpenCLIP text encoder (SD 2.x's, SDXL's second) under OpenCLIP's names and ``prefix``.

    OpenCLIP's attention holds q, k and v in one ``in_proj_weight``/``in_proj_bias`` (q first), and its
    ``text_projection`` is a matrix applied as ``x @ P``: the transpose of transformers' linear layer. The
    SDXL script writes ``text_projection.weight`` untransposed, a key no loader reads; fixed here.
    """
    import torch

    out: Tensors = {}
    qkv: dict[tuple[str, str], dict[str, Any]] = {}
    for key, tensor in _with_text_model(state).items():
        if key == "text_projection.weight":
            out[prefix + "text_projection"] = tensor.T.contiguous()
            continue
        found = _QKV.match(key)
        if found:
            qkv.setdefault((found["layer"], found["kind"]), {})[found["which"]] = tensor
            continue
        new = _rename_prefix(key, _OPEN_CLIP)
        if new is None:
            raise ValueError(f"text encoder: no OpenCLIP name for {key}")
        for old, replacement in _OPEN_CLIP_LAYER.items():
            new = new.replace(old, replacement)
        out[prefix + new] = tensor
    for (layer, kind), parts in qkv.items():
        name = _rename_prefix(layer, _OPEN_CLIP)
        out[f"{prefix}{name}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def _sd_text_encoder(state: Tensors, config: Mapping[str, Any]) -> Tensors:
    """SD 1.x's text encoder is OpenAI's CLIP (``quick_gelu``), kept under ``cond_stage_model.transformer.``;
    SD 2.x's is OpenCLIP's (``gelu``), under ``cond_stage_model.model.`` in OpenCLIP's names, as its
    published files have it. The activation is what tells the two apart in a diffusers folder (the
    script's test, a 23rd layer, fails on any smaller model)."""
    if config.get("hidden_act") == "gelu":
        return open_clip_state(state, "cond_stage_model.model.")
    return clip_state(state, "cond_stage_model.transformer.")


ComponentWriter = Callable[[Tensors, Mapping[str, Any]], Tensors]

LAYOUTS: dict[str, dict[str, ComponentWriter]] = {
    "StableDiffusionPipeline": {
        "unet": unet_state,
        "vae": vae_state,
        "text_encoder": _sd_text_encoder,
    },
    "StableDiffusionXLPipeline": {
        "unet": unet_state,
        "vae": vae_state,
        "text_encoder": lambda state, _: clip_state(state, "conditioner.embedders.0.transformer."),
        "text_encoder_2": lambda state, _: open_clip_state(state, "conditioner.embedders.1.model."),
    },
}
"""Pipeline class (a family's ``pipeline_name``) -> each weighted component's writer into the original
layout. The one place that knows the layouts; a family missing here has no single-file form."""


def _component(folder: Path) -> tuple[Tensors, dict[str, Any]]:
    """A component folder's weights (every shard of its safetensors index, or its one file) and config."""
    from safetensors.torch import load_file

    indexes = list(folder.glob("*.safetensors.index.json"))
    if indexes:
        shards = sorted(set(json.loads(indexes[0].read_text())["weight_map"].values()))
        files = [folder / shard for shard in shards]
    else:
        files = list(folder.glob("*.safetensors"))
        if len(files) != 1:
            raise ValueError(f"{folder}: expected one .safetensors file, found {len(files)}")
    state: Tensors = {}
    for file in files:
        state.update(load_file(str(file)))
    return state, json.loads((folder / "config.json").read_text())


def single_file_state(export: Path, half: bool = False) -> Tensors:
    """The pipeline folder ``export`` as one state dict in the original layout; ``half``: floating-point
    tensors in fp16 (half the size; what most shared checkpoints are), else as saved."""
    import torch

    family = family_of_folder(export)
    layout = LAYOUTS.get(family.pipeline_name)
    if layout is None:
        raise ValueError(f"{family.pipeline_name} has no single-file layout (known: {', '.join(LAYOUTS)})")
    state: Tensors = {}
    for component, writer in layout.items():
        state.update(writer(*_component(export / component)))
    if half:
        state = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in state.items()}
    missing = [p for p in TEXT_PREFIXES[family.pipeline_name] if not any(k.startswith(p) for k in state)]
    if missing:  # the reader's check (models.single_file) would refuse the file
        raise ValueError(f"{export}: the single file lacks {missing}")
    return state


def write_single_file(export: Path, name: str, half: bool = False) -> Path:
    """Write ``<name>.safetensors`` (the original layout of the pipeline in ``export``) into ``export``."""
    from safetensors.torch import save_file

    state = single_file_state(export, half)
    dest = export / f"{name}{CHECKPOINT_SUFFIX}"
    save_file({k: v.contiguous() for k, v in state.items()}, str(dest), {"format": "pt"})
    log.info("exported the model as one file in the original Stable Diffusion layout: %s", dest.name)
    return dest


def write_run_single_file(export: Path, run_root: Path) -> Path | None:
    """Write the single file when the run in ``run_root`` asked for it (``train.export_formats``, from its
    ``config.yaml``, and ``train.export_fp16``) into the staging folder ``export``, named after the run."""
    from sdcluster.config.export_formats import MODEL_FORMATS
    from sdcluster.train.model_card import run_config

    cfg = run_config(run_root)
    if cfg is None or not any(fmt in MODEL_FORMATS for fmt in cfg.train.export_formats):
        return None
    return write_single_file(export, run_root.name, cfg.train.export_fp16)
