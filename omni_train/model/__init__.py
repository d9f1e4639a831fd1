"""The model: attention dispatch, rotary positions, the shared decoder backbone and checkpoint adapters.

`backbone.Backbone` is the decoder every modality feeds (names map onto Qwen2/Qwen3
checkpoints); `attention.attention` keeps packed documents apart on every device;
`rope` holds 1-D and 3-D rotary positions; `hf_adapters` loads and saves Qwen checkpoints
through explicit state-dict adapters. `audio_encoder` and `vision_encoder` turn log-mel windows
and Qwen2-VL patches into features, `projectors` map them to the backbone's width, and
`omni.OmniModel` composes encoder -> projector -> fusion -> backbone -> loss in one forward.
"""

from omni_train.model.attention import attention, attention_backend, document_ids_to_cu_seqlens
from omni_train.model.backbone import Backbone, BackboneConfig
from omni_train.model.hf_adapters import backbone_config_from_hf, load_qwen_backbone, save_qwen_backbone
from omni_train.model.omni import OmniConfig, OmniModel, OmniOutput, build_model
from omni_train.model.rope import apply_rotary, rope_cos_sin, rope_inv_freq

__all__ = [
    "Backbone", "BackboneConfig", "OmniConfig", "OmniModel", "OmniOutput", "build_model", "apply_rotary", "attention", "attention_backend", "backbone_config_from_hf",
    "document_ids_to_cu_seqlens", "load_qwen_backbone", "rope_cos_sin", "rope_inv_freq", "save_qwen_backbone",
]
