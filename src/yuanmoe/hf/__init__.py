"""Hugging Face transformers integration: importing this module registers `model_type: "yuan"`
with AutoConfig and AutoModelForCausalLM, so that

    import yuanmoe.hf
    model = AutoModelForCausalLM.from_pretrained("path/to/Yuan2-M32-hf")
    model.generate(input_ids, max_new_tokens=32)

runs this project's YuanForCausalLM on official checkpoint folders (YuanHFForCausalLM.from_pretrained
also takes this project's native folders, whose config.json has no model_type for the Auto classes).
Weights go through yuanmoe.checkpoint (lazy, layer by layer, official names converted by
convert/official.py), and generate() decodes with the project's own DecodeCache: greedy and
sampling; beam search is not supported (transformers says so). Tested with transformers 5.24.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .. import checkpoint
from ..convert.official import config_from_official, config_to_official
from ..model import DecodeCache, YuanForCausalLM


def _one_device(device_map) -> str | torch.device:
    """The device a transformers-style device_map names: None (cpu), a device, a GPU number, or a
    dict that puts every module on the same device."""
    if device_map is None or device_map == {}:
        return "cpu"
    if isinstance(device_map, dict):
        devices = set(map(str, device_map.values()))
        if len(devices) != 1:
            raise ValueError(f"device_map puts modules on {len(devices)} devices ({', '.join(sorted(devices))}); "
                             f"this model runs on one device, so name one (e.g. device_map='cuda')")
        device_map = next(iter(device_map.values()))
    if isinstance(device_map, int):
        return f"cuda:{device_map}"
    return device_map


class YuanHFConfig(PreTrainedConfig):
    """The official config.json keys as a transformers config; `yuan_config` gives the YuanConfig."""

    model_type = "yuan"

    def yuan_config(self):
        return config_from_official(self.to_dict())


class YuanHFForCausalLM(PreTrainedModel, GenerationMixin):
    """A transformers model around YuanForCausalLM (held as `.model`)."""

    config_class = YuanHFConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"

    def __init__(self, config: YuanHFConfig, model: YuanForCausalLM | None = None):
        super().__init__(config)
        self.model = model if model is not None else YuanForCausalLM(config.yuan_config())

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, config: YuanHFConfig | None = None,
                        dtype=None, torch_dtype=None, device_map=None, **kwargs) -> "YuanHFForCausalLM":
        """A local official or native checkpoint folder (nothing is downloaded). dtype None or
        "auto" keeps the stored dtype; device_map names one device (cpu, cuda:1, a GPU number, or
        "auto": CUDA when present), default cpu: the model is not split across devices."""
        path = Path(pretrained_model_name_or_path)
        dtype = dtype if dtype is not None else torch_dtype
        model = checkpoint.from_pretrained(path, dtype=None if dtype == "auto" else dtype,
                                           device=_one_device(device_map))
        if config is None or not isinstance(config, YuanHFConfig):
            config = YuanHFConfig(**config_to_official(model.config))
        return cls(config, model=model).eval()

    def save_pretrained(self, save_directory, **kwargs) -> None:
        """Writes the official format (config.json, safetensors under official names)."""
        checkpoint.save_pretrained(self.model, save_directory, fmt="official")

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.model.embed_tokens

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the cache is the model's own DecodeCache, made in prepare_inputs_for_generation

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size,
                                      max_cache_length) -> None:
        # generate() knows how long the sequences can get; keep it for sizing the DecodeCache.
        if generation_config.use_cache is not False:
            model_kwargs["decode_cache_length"] = max_cache_length

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, cache: DecodeCache | None = None,
                                      attention_mask: torch.Tensor | None = None,
                                      decode_cache_length: int | None = None,
                                      next_sequence_length: int | None = None, **kwargs) -> dict:
        if decode_cache_length is None:  # use_cache=False: the whole sequence every step
            return {"input_ids": input_ids, "attention_mask": attention_mask}
        if cache is None:  # the prompt, placed by its attention mask
            cache = self.model.new_cache(input_ids.shape[0], decode_cache_length)
            return {"input_ids": input_ids, "position_ids": _prompt_positions(input_ids, attention_mask),
                    "cache": cache}
        # Then the tokens generate() appended (one per step); the cache holds their positions.
        return {"input_ids": input_ids[:, -(next_sequence_length or 1):], "cache": cache}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: DecodeCache | None = None,
                labels: torch.Tensor | None = None, **kwargs) -> CausalLMOutputWithPast:
        """attention_mask [batch, tokens] (1 = token, 0 = left padding) places the tokens when
        there is no cache (see _prompt_positions); with a cache, the tokens continue where it ends."""
        if position_ids is None and cache is None:
            position_ids = _prompt_positions(input_ids, attention_mask)
        out = self.model(input_ids, position_ids=position_ids, labels=labels, cache=cache)
        return CausalLMOutputWithPast(loss=out.loss, logits=out.logits, cache=cache)


def _prompt_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Pads get position 0 each and real tokens count from 0, which the model takes as separate
    documents, so no token ever attends to padding. None (positions 0, 1, ...) without a mask."""
    if attention_mask is None:
        return None
    mask = attention_mask[:, -input_ids.shape[1]:].long()
    return (mask.cumsum(-1) - 1).clamp(min=0) * mask


AutoConfig.register("yuan", YuanHFConfig, exist_ok=True)
AutoModelForCausalLM.register(YuanHFConfig, YuanHFForCausalLM, exist_ok=True)

__all__ = ["YuanHFConfig", "YuanHFForCausalLM"]
