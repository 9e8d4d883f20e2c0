"""LoRA adapters: fold one into its base, combine several (PEFT's add_weighted_adapter types), extract one
from a fine-tune by truncated SVD. Adapters are PEFT folders (adapter_config.json + safetensors)."""

from .adapter import Adapter, AdapterConfig, LoraWeights, read_adapter
from .combine import COMBINATION_TYPES, combine_adapters
from .extract import extract_adapter
from .merge import merge_adapter

__all__ = ["COMBINATION_TYPES", "Adapter", "AdapterConfig", "LoraWeights", "combine_adapters", "extract_adapter",
           "merge_adapter", "read_adapter"]
