"""Qwen3-Omni's text thinker (issue 16): interleaved M-RoPE and the mixture-of-experts text model, against
transformers' own classes (the specification) built from tiny configs.

- `rope_cos_sin(..., interleaved=True)` equals `Qwen3OmniMoeThinkerTextRotaryEmbedding`'s tables;
- a Qwen3-MoE directory written by transformers' `save_pretrained` (experts per key on disk, a dense
  `mlp_only_layers` layer, top-k not renormalised) loads through `model.pretrained_backbone`'s loader, fused,
  with logits within 1e-4 of `Qwen3MoeForCausalLM`, on packed rows too;
- `Qwen3OmniMoeThinkerTextModel`'s weights and text config give our Backbone (MoE + interleaved M-RoPE + q/k
  norm) with hidden states within 1e-4 on 3-D positions.
"""

from __future__ import annotations

import pytest
import torch

from omni_train.model.backbone import Backbone
from omni_train.model.hf_adapters import backbone_config_from_hf, hf_to_backbone_state_dict, load_qwen_backbone
from omni_train.model.rope import rope_cos_sin, rope_inv_freq

omni_modeling = pytest.importorskip("transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe")


def text_config(**extra):
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeTextConfig

    fields = dict(vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, moe_intermediate_size=24, num_experts=6, num_experts_per_tok=2,
                  decoder_sparse_step=1, mlp_only_layers=[1], rms_norm_eps=1e-6,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [6, 5, 5],
                                   "interleaved": True, "mrope_interleaved": True})
    return Qwen3OmniMoeTextConfig(**{**fields, **extra})


def positions_3d(batch: int, length: int) -> torch.Tensor:
    """(3, B, L) time / height / width ids like an image between text: a 4 x 3 grid at one time step."""
    ids = torch.arange(length).expand(3, batch, length).clone()
    grid = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(3), indexing="ij")).flatten(1)  # (2, 12)
    ids[0, :, 5:17] = 5
    ids[1:, :, 5:17] = 5 + grid[:, None, :]
    ids[:, :, 17:] = ids[:, :, 17:] - 17 + 9  # text resumes after the grid's largest id
    return ids


def test_interleaved_mrope_equals_transformers():
    cfg = text_config()
    theirs = omni_modeling.Qwen3OmniMoeThinkerTextRotaryEmbedding(cfg)
    position_ids = positions_3d(2, 24)
    cos_t, sin_t = theirs(torch.zeros(1, dtype=torch.float32), position_ids)
    cos, sin = rope_cos_sin(position_ids, rope_inv_freq(32, 10000.0), [6, 5, 5], interleaved=True)
    assert (cos - cos_t).abs().max() < 1e-6 and (sin - sin_t).abs().max() < 1e-6
    # the layout differs from Qwen2.5-Omni's contiguous bands wherever height or width differ from time
    contiguous, _ = rope_cos_sin(position_ids, rope_inv_freq(32, 10000.0), [6, 5, 5])
    assert (contiguous - cos_t).abs().max() > 0.1


@pytest.mark.parametrize("normalize", [False, True])
def test_qwen3_moe_directory_loads_fused_with_equal_logits(tmp_path, normalize):
    from safetensors import safe_open
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    config = Qwen3MoeConfig(vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=3,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, moe_intermediate_size=24,
                            num_experts=6, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[1],
                            norm_topk_prob=normalize, tie_word_embeddings=False)
    theirs = Qwen3MoeForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "experts" in name or "gate" in name:
                p.normal_(0.0, 0.2)  # routing that matters: random experts far apart
    theirs.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:  # the release layout: one key per expert projection
        assert "model.layers.0.mlp.experts.5.up_proj.weight" in f.keys()

    ours, cfg = load_qwen_backbone(tmp_path)
    assert cfg.moe.experts == 6 and cfg.moe.dense_layers == [1] and cfg.moe.normalize_top_k is normalize
    assert [layer.sparse for layer in ours.layers] == [True, False, True]
    ours.eval()
    a, b = torch.randint(0, 96, (9,)), torch.randint(0, 96, (7,))
    with torch.no_grad():
        want_a, want_b = theirs(a[None]).logits[0], theirs(b[None]).logits[0]
        packed = ours.logits(ours(torch.cat([a, b])[None], position_ids=torch.cat([torch.arange(9), torch.arange(7)])[None],
                                  document_ids=torch.tensor([[0] * 9 + [1] * 7])))[0]
    difference = max(float((packed[:9] - want_a).abs().max()), float((packed[9:] - want_b).abs().max()))
    print(f"norm_topk_prob={normalize}: max |logit difference| {difference:.2e} (logits up to "
          f"{float(want_a.abs().max()):.2f})")
    assert difference < 1e-4


def test_qwen3_omni_text_thinker_equals_transformers():
    torch.manual_seed(0)
    config = text_config()
    theirs = omni_modeling.Qwen3OmniMoeThinkerTextModel(config).eval()
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "experts" in name or "gate" in name:
                p.normal_(0.0, 0.2)
    cfg = backbone_config_from_hf({**config.to_dict(), "model_type": "qwen3_omni_moe_text", "tie_word_embeddings": True})
    assert cfg.mrope_interleaved and cfg.mrope_section == [6, 5, 5] and cfg.moe.normalize_top_k
    ours = Backbone(cfg).eval()
    state = hf_to_backbone_state_dict({f"model.{k}": v for k, v in theirs.state_dict().items()}, cfg)
    missing, unexpected = ours.load_state_dict(state, strict=False)
    assert not unexpected and not missing, (missing, unexpected)
    input_ids = torch.randint(0, 96, (2, 24))
    position_ids = positions_3d(2, 24)
    with torch.no_grad():
        want = theirs(input_ids=input_ids, position_ids=position_ids).last_hidden_state
        got = ours(input_ids, position_ids=position_ids, document_ids=torch.zeros(2, 24, dtype=torch.long))
    difference = float((got - want).abs().max())
    print(f"Qwen3-Omni text thinker: max |hidden difference| {difference:.2e} (values up to {float(want.abs().max()):.2f})")
    assert difference < 1e-4
