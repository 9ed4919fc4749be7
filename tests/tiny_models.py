"""Tiny random-weight models for every checkpoint conversion mapping registered in transformers.

`conversion_keys()` lists the registry keys (model types and class names, read at run time), `tiny(key)` gives
the model class and a shrunk config, `inputs(model)` deterministic forward inputs, `SKIP` the keys left out.

Shrinking is data-driven: the default config is turned into a dict; in it and every sub-config dict, the
attributes named in `SIZES` / `LIST_SIZES` are replaced, the layers are cut to one of each kind (attention /
linear / dense / MoE ...), special token ids are remapped into the small vocabulary, and `OVERRIDES` (keyed by
the config's `model_type`) patch what the generic rules cannot guess.
"""

from __future__ import annotations

import importlib
import inspect
import math
from functools import partial

import torch
import transformers
from transformers import PreTrainedConfig, conversion_mapping
from transformers.models.auto import configuration_auto, modeling_auto

transformers.logging.set_verbosity_error()

VOCAB = 128
LAYER_KEYS = ("num_hidden_layers", "num_layers", "n_layer", "n_layers", "depth", "encoder_layers", "decoder_layers")
# Applied to every (sub-)config dict that has the attribute with a non-zero int value (layer counts only shrink).
SIZES = {
    **dict.fromkeys(LAYER_KEYS, 2),
    **dict.fromkeys(("hidden_size", "d_model", "n_embd", "embed_dim", "out_hidden_size", "projection_dim"), 32),
    **dict.fromkeys(("text_hidden_size", "vision_hidden_size", "audio_hidden_size", "projector_hidden_size"), 32),
    **dict.fromkeys(("intermediate_size", "encoder_ffn_dim", "decoder_ffn_dim", "mlp_dim", "ffn_dim"), 64),
    **dict.fromkeys(("moe_intermediate_size", "shared_expert_intermediate_size", "expert_ffn_hidden_size"), 32),
    **dict.fromkeys(("shared_intermediate_size", "moe_shared_expert_intermediate_size"), 32),
    **dict.fromkeys(("num_attention_heads", "n_head", "encoder_attention_heads", "decoder_attention_heads"), 2),
    **dict.fromkeys(("num_key_value_heads", "swa_num_key_value_heads"), 1),
    **dict.fromkeys(("head_dim", "v_head_dim", "qk_head_dim"), 16),
    **dict.fromkeys(("qk_nope_head_dim", "qk_rope_head_dim"), 8),
    **dict.fromkeys(("kv_lora_rank", "q_lora_rank", "o_lora_rank"), 16),
    **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"), 4),
    **dict.fromkeys(("num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_k", "zero_expert_num"), 2),
    **dict.fromkeys(("n_group", "topk_group", "num_expert_group", "n_groups", "mamba_n_groups"), 1),
    **dict.fromkeys(("linear_key_head_dim", "linear_value_head_dim", "linear_head_dim", "swa_head_dim"), 16),
    **dict.fromkeys(
        ("linear_num_key_heads", "linear_num_value_heads", "linear_num_heads", "swa_num_attention_heads"), 2
    ),
    **dict.fromkeys(("mamba_num_heads", "mamba_n_heads"), 4),
    **dict.fromkeys(("mamba_head_dim", "mamba_d_head", "ssm_state_size", "mamba_d_state"), 16),
    **dict.fromkeys(("decoder_hidden_size", "hidden_dim", "encoder_hidden_size", "ffn_hidden_size"), 32),
    **dict.fromkeys(("adapter_in_dim", "adapter_input_size", "adapter_out_dim", "condition_dim"), 32),
    **dict.fromkeys(("decoder_intermediate_size", "projection_hidden_dim"), 64),
    **dict.fromkeys(("decoder_num_hidden_layers",), 2),
    **dict.fromkeys(("decoder_num_attention_heads", "num_heads"), 2),
    **dict.fromkeys(("dim_head", "hidden_size_per_layer_input", "laurel_rank"), 16),
    **dict.fromkeys(
        ("decoder_self_attention_heads", "decoder_cross_attention_heads", "num_sliding_attention_heads"), 2
    ),
    **dict.fromkeys(("share_expert_dim", "projector_out_channels", "output_channels"), 32),
    **dict.fromkeys(("max_img_size", "max_image_size"), 64),
    **dict.fromkeys(("base_channels", "downsample_hidden_size", "min_image_size"), 8),
    **dict.fromkeys(("index_head_dim", "output_dim"), 16),
    "index_n_heads": 2,
    **dict.fromkeys(("encoder_hidden_dim", "fpn_feature_size", "mask_feature_size", "fpn_hidden_size"), 32),
    **dict.fromkeys(("fusion_hidden_size", "memory_attention_hidden_size", "memory_encoder_hidden_size"), 32),
    **dict.fromkeys(("mask_downsampler_embed_dim", "memory_fuser_embed_dim"), 32),
    **dict.fromkeys(("memory_attention_feed_forward_hidden_size", "memory_fuser_intermediate_dim"), 64),
    "memory_encoder_output_channels": 16,
    "context_length": 64,
    "max_source_positions": 32,
    "num_mel_bins": 16,
    **dict.fromkeys(("n_shared_experts", "num_key_value_attention_heads"), 1),
    "codebook_size": 64,
    "vocab_size_per_layer_input": VOCAB,
    "num_queries": 8,
    "unpadded_vocab_size": VOCAB,
    "vocab_size": VOCAB,
    "max_position_embeddings": 64,
    "image_size": 32,
    "patch_size": 8,
    "num_channels": 3,
    "num_frames": 4,
    "num_patches": 16,
    "max_length": 64,
}
# Also set where the default config leaves them None (a checkpoint would fill them in).
FILL_NONE = {"num_experts_per_tok", "head_dim", "n_routed_experts", "n_shared_experts", "vocab_size"}
# List-valued attributes (stages of hierarchical backbones, per-layer sizes): every element replaced,
# `*hidden_sizes` doubling per stage.
LIST_SIZES = {
    "neck_hidden_sizes": 16,
    "intermediate_size": 64,
    "decoder_in_channels": 32,
    "moe_intermediate_size": 32,
    "downsample_channels": 32,
    "num_key_value_heads_per_layer": 1,
    "depths": 1,
    "num_heads": 1,
    "num_attention_heads": 1,
    "hidden_sizes": 16,
    "mlp_ratios": 2,
}
_RESNET = {  # a tiny transformers ResNet instead of the default timm backbone (timm is not installed)
    "backbone_config": {
        "model_type": "resnet",
        "embedding_size": 8,
        "hidden_sizes": [8, 8, 16, 16],
        "depths": [1, 1, 1, 1],
        "out_features": ["stage1", "stage2", "stage3", "stage4"],
    }
}
# Per-model-type overrides, applied to every (sub-)config of that type after the generic shrinking.
OVERRIDES: dict[str, dict] = {
    **dict.fromkeys(
        ("detr", "conditional_detr"), {**_RESNET, "encoder_attention_heads": 8, "decoder_attention_heads": 8}
    ),
    "deformable_detr": _RESNET,
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention"]},
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1},
    "glm5_next": {"num_key_value_heads": 2},
    "glm5_next_text": {"num_key_value_heads": 2},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},
    "dots3_note_text": {"head_dim": 16},
    "glm4v_moe_text": {
        "rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5, "mrope_section": [2, 1, 1]}
    },
    "paddleocr_vl_text": {"rope_parameters": {"rope_type": "default", "mrope_section": [4, 2, 2]}},
    "qwen2_5_omni_thinker": {"vision_start_token_id": 100},
    "qwen3_omni_moe_thinker": {"vision_start_token_id": 100},
    "emu3": {"vocabulary_map": {"<image>": 100, "<|extra_200|>": 101}},
    "gemma3n_text": {"num_kv_shared_layers": 2},
    "step3p5": {"sliding_window": 16},
    "deepseek_ocr2_text": {"mlp_layer_types": ["dense", "sparse"]},
    "lw_detr_vit": {"num_windows": 4, "num_windows_side": 2},
    "molmo2_adapter": {"vision_feature_layer": [-1, -2]},
    "dory": {  # serialized with every layer doubled (attention block, mlp block)
        "num_hidden_layers": 6,
        "n_input_layers": 2,
        "n_recurrent_layers": 2,
        "n_output_layers": 2,
        "layer_types": ["sliding_attention", "mlp", "full_attention", "mlp", "sliding_attention", "mlp"],
    },
    "emu3_vqgan": {"base_channels": 32, "channel_multiplier": [1, 1], "num_res_blocks": 1},
    "ernie4_5_vl_moe_text": {"rope_parameters": {"rope_type": "default", "mrope_section": [3, 3, 2]}},
    "esm": {"pad_token_id": 1, "mask_token_id": 2},
    "hgnet_v2": {
        "stem_channels": [3, 8, 8],
        "stage_in_channels": [8, 16, 32, 64],
        "stage_mid_channels": [8, 8, 16, 16],
        "stage_out_channels": [16, 32, 64, 128],
        "stage_num_blocks": [1, 1, 1, 1],
        "stage_numb_of_layers": [2, 2, 2, 2],
    },
    "swin": {"patch_size": 2, "window_size": 2},
    "beit": {"num_hidden_layers": 4, "out_indices": [1, 2, 3, 4]},  # the segmentation head wants 4 feature maps
    "hrm_text": {"num_hidden_layers": 2, "num_layers_per_stack": None},  # post-init inflates it per cycle
    "tipsv2_dpt": {"backbone_config": {"num_hidden_layers": 4, "out_indices": [1, 2, 3, 4]}},
    "t5gemma2_text": {"dropout_rate": 0.0},  # normally copied in by the encoder-decoder config
    "shieldgemma2": {"yes_token_index": 100, "no_token_index": 101},  # else read with vocabulary-sized defaults
    **dict.fromkeys(
        ("mimi", "mimi_encoder", "mimi_decoder"),
        {
            "num_filters": 4,
            "upsampling_ratios": [2, 2],
            "codebook_dim": 16,
            "num_quantizers": 2,
            "vector_quantization_hidden_dimension": 16,
            "upsample_groups": 32,
        },
    ),
    "pp_doclayout_v2": {"class_thresholds": [0.5, 0.5], "class_order": [0, 1]},  # per-label lists have no default
    "pp_doclayout_v3": {"x4_feat_dim": 16},
    "qwen4_exp_text": {
        "indexer_n_heads": 2,
        "indexer_kv_heads": 1,
        "indexer_head_dim": 16,
        "indexer_budget": 8,
        "indexer_compress_ratio": 4,
        "hc_lowrank": 8,
        "ple_embed_dim": 16,
        "ngram_vocab_size_base": 256,
        "split_ngram_parts": 4,
    },
    "sam3_vision_model": {"backbone_feature_sizes": [[16, 16], [8, 8], [4, 4]]},
    "lw_detr": {"projector_scale_factors": [1.0], "num_feature_levels": 1},
    "sapiens2_head": {  # task heads have no default layout
        "use_pixel_shuffle": False,
        "upsample_out_channels": [16],
        "upsample_kernel_sizes": [4],
        "conv_out_channels": [16],
        "conv_kernel_sizes": [1],
    },
}
_DEAD = "registry alias that names no transformers class or model type"
_AUDIO = "speech model: its forward needs model-specific audio features"
SKIP: dict[str, str] = {
    **dict.fromkeys(("MtpModel", "PPChart2TableModel", "mlcd_vision", "xCLIPTextModel", "xCLIPVisionModel"), _DEAD),
    **dict.fromkeys(("cohere_asr", "dots3_note_audio_encoder", "VoxtralRealtimeModel", "voxtral_realtime"), _AUDIO),
    **dict.fromkeys(
        ("VibeVoiceAsrModel", "vibevoice_asr"), "audio tokenizer conv stacks do not shrink (171M params); needs audio"
    ),
    "MaskFormerDetrDecoder": "internal decoder sub-module without standalone inputs; its mapping runs under maskformer",
    "UnlimitedOcrVisionEncoder": "internal tower fed with SAM patch embeddings; its mapping runs under unlimited_ocr",
    "inkling_mm_model": "needs scipy, which is not installed",
    "timm_wrapper": "needs timm, which is not installed",
    "jev": "multiple-choice task head: forward needs marks / num_options / question_type_ids",
    "pi0": "robot policy: forward needs state, actions and camera images",
    "qwen3_omni_moe": "thinker+talker+code2wav; the talker default config is incomplete (thinker keys are covered)",
    "sam3_tracker_video": "forward needs a video inference session (sam3_tracker covers the image path)",
}


def conversion_keys() -> list[str]:
    """Every key of the checkpoint conversion registry (model types and class names), except "legacy"."""
    keys = set(conversion_mapping._build_checkpoint_conversion_mapping()) | set(
        conversion_mapping._MODEL_TO_CONVERSION_PATTERN
    )
    keys.discard("legacy")
    return sorted(keys)


def _class(name: str) -> type:
    if hasattr(transformers, name):
        return getattr(transformers, name)
    # not exported (a sub-module class): look in the modeling file of the model whose config name prefixes it
    for model_type, config_name in configuration_auto.CONFIG_MAPPING_NAMES.items():
        if name.startswith(config_name.removesuffix("Config")):
            module = configuration_auto.model_type_to_module_name(model_type)
            try:
                mod = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
            except ModuleNotFoundError:  # a config-only model type
                continue
            if hasattr(mod, name):
                return getattr(mod, name)
    raise KeyError(f"no transformers class or model type named {name!r}")


def model_class(key: str) -> type:
    """The class to build: for a model type its causal LM, else its image/audio-text-to-text LM, else the base model."""
    if key not in configuration_auto.CONFIG_MAPPING_NAMES:
        return _class(key)
    tables = [
        modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
        modeling_auto.MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES,
    ]
    tables += [modeling_auto.MODEL_MAPPING_NAMES] + [
        getattr(modeling_auto, n)
        for n in sorted(dir(modeling_auto))
        if n.startswith("MODEL_FOR_") and n.endswith("_NAMES")
    ]
    config_class = configuration_auto.CONFIG_MAPPING[key]
    towers = set(getattr(config_class, "sub_configs", {}).values())
    names = [t[key] for t in tables if key in t]
    classes = [_class(n[0] if isinstance(n, (list, tuple)) else n) for n in names]
    # Prefer a class made for this type's own config; else one borrowed from another architecture (exaone ->
    # LlamaForCausalLM), but never the text-only causal LM of a multimodal type (mllama -> MllamaForCausalLM).
    for cls in [c for c in classes if c.config_class is config_class] + classes:
        if cls.config_class not in towers:
            return cls
    # A sub-config type (text / vision / audio tower): the model class built from that config.
    module = importlib.import_module(config_class.__module__.replace(".configuration_", ".modeling_"))
    found = [
        c for c in vars(module).values() if isinstance(c, type) and getattr(c, "config_class", None) is config_class
    ]
    found = [c for c in found if "PreTrained" not in c.__name__]
    if not found:
        raise KeyError(f"no model class for model type {key!r}")
    return min(
        found, key=lambda c: (not c.__name__.endswith("ForCausalLM"), not c.__name__.endswith("Model"), c.__name__)
    )


THRESHOLDS = ("first_k_dense_replace", "num_dense_layers", "moe_layer_start_index", "max_window_layers")
LAYER_REFS = ("out_features", "out_indices", "_out_features", "_out_indices", "stage_names")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _layer_dict(v, old: int) -> bool:
    return (
        isinstance(v, dict)
        and v
        and all(str(k).isdigit() and int(k) < old and isinstance(x, dict) for k, x in v.items())
    )


def _pick_layers(d: dict, old: int, ids: dict) -> int:
    """Keep the first layer of every distinct kind (per-layer lists, index lists, per-layer dicts); returns the count."""
    per_layer = [
        k
        for k, v in d.items()
        if (isinstance(v, list) and "token" not in k or isinstance(v, str) and "pattern" in k) and len(v) == old
    ]
    # per-layer references to an earlier layer (KV sharing)
    refs = [k for k in per_layer if all(_is_int(x) and 0 <= x <= i for i, x in enumerate(d[k])) and max(d[k]) > 1]
    index_lists = [
        k
        for k, v in d.items()
        if isinstance(v, list)
        and 0 < len(v) < old
        and any(w in k for w in ("layer", "index", "indices"))
        and all(_is_int(i) and 0 <= i < old for i in v)
    ]
    dicts = [k for k, v in d.items() if _layer_dict(v, old)]
    thresholds = [k for k in THRESHOLDS if _is_int(d.get(k))]
    kinds: dict = {}
    for i in range(old):
        sig = tuple(d[k][i] == i if k in refs else d[k][i] for k in per_layer)
        sig += tuple(i in d[k] for k in index_lists) + tuple(i < d[k] for k in thresholds)
        sig += tuple(repr({int(j): v for j, v in d[k].items()}.get(i)) for k in dicts)
        kinds.setdefault(sig, i)
    keep = sorted(kinds.values())
    keep = sorted(keep + [i for i in range(old) if i not in keep][: max(0, 2 - len(keep))])
    new = {i: j for j, i in enumerate(keep)}
    for k in per_layer:
        v = [d[k][i] for i in keep]
        d[k] = [new.get(i, j) for j, i in enumerate(v)] if k in refs else v if isinstance(d[k], list) else "".join(v)
    for k in index_lists:
        d[k] = [new[i] for i in d[k] if i in new]
    for k in dicts:
        d[k] = {str(new[int(j)]): _shrink(v, ids) for j, v in d[k].items() if int(j) in new}
    for k in thresholds:
        d[k] = sum(i < d[k] for i in keep)
    return len(keep)


def _shrink(d: dict, ids: dict) -> dict:
    """Shrink one config dict in place (and its sub-config dicts); `ids` maps special token ids to small ones."""
    old = next((d[k] for k in LAYER_KEYS if _is_int(d.get(k))), None)
    n = _pick_layers(d, old, ids) if old and old > 2 else None
    mha = d.get("num_key_value_heads") == d.get("num_attention_heads")
    mla_sum = d.get("head_dim") == d.get("qk_nope_head_dim", 0) + d.get("qk_rope_head_dim", 0)
    for k, v in list(d.items()):
        if isinstance(v, dict) and "model_type" in v:
            d[k] = _shrink(v, ids)
        elif k in SIZES and ((_is_int(v) and v != 0) or (v is None and k in FILL_NONE)):
            d[k] = n if (k in LAYER_KEYS and n) else min(v, SIZES[k]) if k in LAYER_KEYS else SIZES[k]
        elif k in LIST_SIZES and isinstance(v, list) and all(_is_int(x) for x in v):
            d[k] = [LIST_SIZES[k] * (2**i if k.endswith("hidden_sizes") else 1) for i in range(len(v))]
        elif k in LAYER_REFS and old and old > 2:  # backbone outputs naming layers that are gone
            del d[k]
    backbone = d.get("backbone_config") or {}
    if "encoder_in_channels" in d and "hidden_sizes" in backbone and backbone.get("out_indices"):  # DETR-like
        channels = [backbone["hidden_sizes"][i - 1] for i in backbone["out_indices"]]
        d["encoder_in_channels"] = channels[-len(d["encoder_in_channels"]) :]
    if mha and _is_int(d.get("num_key_value_heads")):
        d["num_key_value_heads"] = d["num_attention_heads"]
    if _is_int(d.get("qk_rope_head_dim")):  # multi-head latent attention
        d["head_dim"] = d["qk_rope_head_dim"] + (d.get("qk_nope_head_dim", 0) if mla_sum else 0)
        d["qk_head_dim"] = d["qk_rope_head_dim"] + d.get("qk_nope_head_dim", 0)
    subs = [v for v in d.values() if isinstance(v, dict) and "model_type" in v]
    vocab = next((c["vocab_size"] for c in (d, *subs) if _is_int(c.get("vocab_size"))), None)
    for k, v in list(d.items()):  # special token ids must fit the shrunk vocabulary (same id -> same new id)
        if vocab and k.endswith(("_id", "token_index", "_token_ids")):
            small = lambda x: x if x < vocab else ids.setdefault(x, VOCAB - 1 - len(ids))  # noqa: E731
            if _is_int(v):
                d[k] = small(v)
            elif isinstance(v, list) and all(_is_int(x) for x in v):
                d[k] = [small(x) for x in v]
    # SAM-style towers (GotOcr2's, DeepseekOcr2's) default to std 1e-10: their features were ~1e-23 and
    # vanished from the outputs the tests compare. A normal std makes them reach the outputs.
    if isinstance(d.get("initializer_range"), float) and d["initializer_range"] < 1e-3:
        d["initializer_range"] = 0.02
    mapping = configuration_auto.CONFIG_MAPPING
    config_class = mapping[d["model_type"]] if d.get("model_type") in mapping else None
    rope = d.get("rope_parameters")
    if isinstance(rope, dict) and (
        "mrope_section" in rope or "mrope_section" in getattr(config_class, "ignore_keys_at_rope_validation", ())
    ):  # multimodal rope: sections must add up to half the rotary dim
        half = (d.get("qk_rope_head_dim") or d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"]) // 2
        rope["mrope_section"] = [half - 2 * (half // 3), half // 3, half // 3]
    for k, v in OVERRIDES.get(d.get("model_type"), {}).items():  # a dict for a same-type sub-config updates it
        same = isinstance(d.get(k), dict) and v.get("model_type", d[k].get("model_type")) == d[k].get("model_type")
        d[k] = {**d[k], **v} if same and "model_type" in d[k] else v
    return d


def tiny(key: str) -> tuple[type, PreTrainedConfig]:
    """The model class for a registry key and a shrunk config for it (model types keep their own config class)."""
    cls = model_class(key)
    is_type = key in configuration_auto.CONFIG_MAPPING_NAMES
    config_class = configuration_auto.CONFIG_MAPPING[key] if is_type else cls.config_class
    d = _shrink(config_class().to_dict(), {})
    d.pop("transformers_version", None)
    return cls, config_class.from_dict(d)


def _get(config, name: str):
    """An attribute of the config or, failing that, of its vision/audio/... sub-configs."""
    for c in (config, *(getattr(config, s, None) for s in getattr(config, "sub_configs", {}))):
        if c is not None and getattr(c, name, None) is not None:
            return getattr(c, name)
    return None


def is_causal_lm(model) -> bool:
    """Whether `generate()` applies: a causal LM, or a multimodal LM generating from `input_ids`."""
    return type(model).__name__ in set(modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()) or (
        model.can_generate() and model.main_input_name == "input_ids"
    )


def _pixels(model, g: torch.Generator, batch: int = 2) -> dict[str, torch.Tensor]:
    """`pixel_values` in the layout the vision tower takes (images, videos, flattened patches)."""
    config, params = model.config, inspect.signature(model.forward).parameters
    size, patch = _get(config, "image_size") or 32, _get(config, "patch_size") or 8
    size, patch = (v if _is_int(v) else v[0] for v in (size, patch))
    channels = _get(config, "num_channels") or _get(config, "in_channels") or 3
    if "grid_thw" in params:  # Qwen-VL style towers: flattened patches plus a (t, h, w) grid per image
        temporal = _get(config, "temporal_patch_size") or 1
        pixels = torch.randn(batch * 16, channels * temporal * patch * patch, generator=g)
        return {"pixel_values": pixels, "grid_thw": torch.tensor([[1, 4, 4]] * batch)}
    if "spatial_shapes" in params:  # NaFlex (Siglip2): flattened patches plus their grid
        side = math.isqrt(_get(config, "num_patches"))
        pixels = torch.randn(batch, side * side, channels * patch * patch, generator=g)
        return {
            "pixel_values": pixels,
            "pixel_attention_mask": torch.ones(batch, side * side, dtype=torch.long),
            "spatial_shapes": torch.tensor([[side, side]] * batch),
        }
    frames = _get(config, "num_frames")
    shape = (batch, frames, channels, size, size) if frames else (batch, channels, size, size)
    out = {"pixel_values": torch.randn(*shape, generator=g)}
    if "noise" in params:  # random masking (ViTMAE): fix the noise so two forwards agree
        out["noise"] = torch.rand(batch, (size // patch) ** 2, generator=g)
    return out


def _image_text(model, ids: torch.Tensor, g: torch.Generator) -> dict[str, torch.Tensor] | None:
    """Image + text inputs for a VLM that splices image features into image-token placeholders, if this works."""
    config = model.config
    token = next(
        (t for t in map(partial(_get, config), ("image_token_id", "image_token_index")) if t is not None), None
    )
    if token is None or not hasattr(model, "get_image_features"):
        return None
    try:
        with torch.no_grad():
            pixels = _pixels(model, g, batch=1)
            params = inspect.signature(model.get_image_features).parameters
            extra = {k: _get(config, k) for k in params if k not in pixels and _get(config, k) is not None}
            features = model.get_image_features(**pixels, **extra)
            features = getattr(features, "pooler_output", features)
            count = features[0].shape[0] if isinstance(features, (list, tuple)) else features.shape[-2]
            text = ids[:1, :4]
            ids = torch.cat([text, torch.full((1, count), token), text], dim=1)
            out = {"input_ids": ids, "attention_mask": torch.ones_like(ids), **pixels}
            model(**out)  # a trial forward: the token count must match what the model expects
        return out
    except Exception:  # not a simple VLM (needs image sizes, grids, tiling...): text only
        return None


def inputs(model) -> dict[str, torch.Tensor]:
    """Deterministic inputs for one forward of a tiny model: text, images, or both for simple VLMs."""
    g = torch.Generator().manual_seed(0)
    config, params = model.config, inspect.signature(model.forward).parameters
    name = model.main_input_name
    if name not in params and "pixel_values" in params:  # vision towers that keep the default `main_input_name`
        name = "pixel_values"
    if name == "input_ids":
        vocab = config.get_text_config().vocab_size
        ids = torch.randint(1, min(vocab, 64), (2, 8), generator=g)
        out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if "pixel_values" in params and hasattr(model, "get_text_features"):  # dual encoder (CLIP-like)
            out.update(_pixels(model, g))
        elif "pixel_values" in params:
            out = _image_text(model, ids, g) or out
        return out
    if name == "pixel_values":
        return _pixels(model, g)
    if name == "input_values" and _get(config, "audio_channels"):  # raw waveform (audio codecs)
        return {"input_values": torch.randn(2, _get(config, "audio_channels"), 256, generator=g)}
    if name == "input_values":  # spectrogram transformers (AST)
        return {"input_values": torch.randn(2, _get(config, "max_length"), _get(config, "num_mel_bins"), generator=g)}
    if name == "latents":  # audio codec decoders
        return {"latents": torch.randn(2, config.hidden_size, 8, generator=g)}
    if name == "past_values":  # time series (TimesFM)
        return {"past_values": torch.randn(2, _get(config, "context_length"), generator=g)}
    raise NotImplementedError(f"main input {name!r}")


def moe_keys() -> list[str]:
    """The registry keys whose model uses transformers' experts modules (`@use_experts_implementation`): read
    from the class's source file, as transformers decides whether an experts implementation can be set."""
    import inspect
    import sys

    keys = []
    for key in conversion_keys():
        if key in SKIP:
            continue
        cls = model_class(key)
        if "@use_experts_implementation" in inspect.getsource(sys.modules[cls.__module__]):
            keys.append(key)
    return keys
