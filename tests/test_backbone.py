"""The decoder backbone: parity with transformers' Qwen2/Qwen3, packed-document isolation, RoPE, checkpoint adapters.

Every reference model is a tiny random Qwen config built offline and saved to tmp_path, so the
real safetensors loading code runs; nothing is downloaded.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM
from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding, apply_rotary_pos_emb

from omni_train.model import (Backbone, BackboneConfig, apply_rotary, attention, attention_backend,
                              backbone_config_from_hf, document_ids_to_cu_seqlens, load_qwen_backbone,
                              rope_cos_sin, rope_inv_freq, save_qwen_backbone)
from omni_train.model.attention import document_mask, from_varlen_layout, to_varlen_layout, varlen_kernels

VOCAB_SIZE = 256
ROPE_THETA = 50_000.0  # not transformers' default, so a dropped theta shows up as a mismatch


def tiny_hf_model(family: str, *, tie: bool, seed: int = 0) -> Qwen2ForCausalLM | Qwen3ForCausalLM:
    """A random fp32 Qwen model whose biases and norm weights are non-trivial (HF inits them to 0 and 1)."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB_SIZE, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=128, tie_word_embeddings=tie, rms_norm_eps=1e-6,
                  rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA})
    if family == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(head_dim=32, attention_bias=True, **common))  # head_dim != 64 // 4
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model.float().eval()


def tiny_config(**overrides) -> BackboneConfig:
    fields = dict(vocab_size=VOCAB_SIZE, dim=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=128,
                  qk_norm=True, rope_theta=ROPE_THETA)
    return BackboneConfig(**{**fields, **overrides})


def single_document(batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    position_ids = torch.arange(length).expand(batch, length)
    return position_ids, torch.zeros(batch, length, dtype=torch.long)


def packed_row(lengths: list[int], num_padding: int) -> tuple[torch.Tensor, torch.Tensor]:
    """position_ids and document_ids (1, L) for documents of `lengths` then padding (-1)."""
    positions = [torch.arange(n) for n in lengths] + [torch.zeros(num_padding, dtype=torch.long)]
    documents = [torch.full((n,), i) for i, n in enumerate(lengths)] + [torch.full((num_padding,), -1)]
    return torch.cat(positions)[None], torch.cat(documents)[None]


@pytest.mark.parametrize("family,tie", [("qwen3", False), ("qwen3", True), ("qwen2", False), ("qwen2", True)])
def test_logits_match_transformers(tmp_path, family, tie):
    reference = tiny_hf_model(family, tie=tie)
    reference.save_pretrained(tmp_path, safe_serialization=True)
    model, cfg = load_qwen_backbone(tmp_path)
    assert (cfg.tie_embeddings, cfg.qk_norm, cfg.rope_theta) == (tie, family == "qwen3", ROPE_THETA)
    assert (model.lm_head is None) == tie
    input_ids = torch.randint(0, VOCAB_SIZE, (2, 19))
    position_ids, document_ids = single_document(2, 19)
    with torch.no_grad():
        expected = reference(input_ids).logits
        logits = model.logits(model(input_ids, position_ids=position_ids, document_ids=document_ids))
    assert logits.shape == (2, 19, VOCAB_SIZE)
    assert (logits - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("family", ["qwen3", "qwen2"])
def test_save_then_transformers_from_pretrained(tmp_path, family):
    reference = tiny_hf_model(family, tie=False, seed=1)
    reference.save_pretrained(tmp_path / "hf", safe_serialization=True)
    model, cfg = load_qwen_backbone(tmp_path / "hf")
    save_qwen_backbone(model, cfg, tmp_path / "ours")
    reloaded = (Qwen3ForCausalLM if family == "qwen3" else Qwen2ForCausalLM).from_pretrained(tmp_path / "ours").eval()
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["model_type"] == family
    input_ids = torch.randint(0, VOCAB_SIZE, (1, 23))
    position_ids, document_ids = single_document(1, 23)
    with torch.no_grad():
        ours = model.logits(model(input_ids, position_ids=position_ids, document_ids=document_ids))
        theirs = reloaded(input_ids).logits
    assert (ours - theirs).abs().max().item() < 1e-4


def test_sharded_save_loads_back_identically(tmp_path):
    torch.manual_seed(2)
    model = Backbone(tiny_config(tie_embeddings=True, qkv_bias=True, o_bias=True))
    save_qwen_backbone(model, model.cfg, tmp_path, max_shard_bytes=64 * 1024)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (tmp_path / "model.safetensors").exists()
    loaded, cfg = load_qwen_backbone(tmp_path)
    assert cfg == model.cfg
    expected = model.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    for key, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, expected[key]), key
    reloaded = Qwen3ForCausalLM.from_pretrained(tmp_path).eval()  # transformers reads our index too
    input_ids = torch.randint(0, VOCAB_SIZE, (1, 11))
    position_ids, document_ids = single_document(1, 11)
    with torch.no_grad():
        ours = model.logits(model(input_ids, position_ids=position_ids, document_ids=document_ids))
        assert (ours - reloaded(input_ids).logits).abs().max().item() < 1e-4


def test_strict_loading_names_missing_and_unexpected_keys(tmp_path):
    tiny_hf_model("qwen3", tie=False).save_pretrained(tmp_path, safe_serialization=True)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.1.mlp.extra_proj.weight"] = torch.zeros(2, 2)
    tensors["model.norm.weight"] = torch.ones(3)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError) as error:
        load_qwen_backbone(tmp_path)
    message = str(error.value)
    assert "layers.1.mlp.up_proj.weight" in message and "layers.1.mlp.extra_proj.weight" in message
    assert "norm.weight (3,) vs (64,)" in message and str(tmp_path) in message


def test_config_mapping_and_refusals():
    base = {"model_type": "qwen2", "vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64}
    # transformers 4.x spelling: rope_theta at the top level
    cfg = backbone_config_from_hf({**base, "rope_theta": 1e6, "rope_scaling": None})
    assert (cfg.rope_theta, cfg.head_dim, cfg.qkv_bias, cfg.o_bias, cfg.qk_norm) == (1e6, 8, True, False, False)
    cfg = backbone_config_from_hf({**base, "model_type": "qwen3", "head_dim": 16,
                                   "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}})
    assert (cfg.rope_theta, cfg.head_dim, cfg.qkv_bias, cfg.qk_norm) == (5e5, 16, False, True)
    with pytest.raises(ValueError, match="model_type 'llama' is not supported"):
        backbone_config_from_hf({**base, "model_type": "llama"})
    with pytest.raises(ValueError, match="rope type 'yarn'"):
        backbone_config_from_hf({**base, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="num_kv_heads"):
        backbone_config_from_hf({**base, "num_key_value_heads": 3})
    with pytest.raises(ValueError, match="model.backbone.head_dim"):
        tiny_config(head_dim=15)
    with pytest.raises(ValueError, match="mrope_section"):
        tiny_config(mrope_section=[4, 4, 4])


def test_rope_matches_transformers():
    head_dim = 32
    hf_config = Qwen3Config(hidden_size=64, num_attention_heads=2, head_dim=head_dim,
                            rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA})
    position_ids = torch.cat([torch.arange(7), torch.arange(5), torch.arange(300, 304)])[None].repeat(2, 1)  # (2, 16)
    q, k = torch.randn(2, 4, 16, head_dim), torch.randn(2, 2, 16, head_dim)
    ref_cos, ref_sin = Qwen3RotaryEmbedding(hf_config)(q, position_ids)
    cos, sin = rope_cos_sin(position_ids, rope_inv_freq(head_dim, ROPE_THETA))
    assert cos.shape == (2, 16, head_dim) and cos.dtype == torch.float32
    assert torch.allclose(cos, ref_cos, atol=1e-6) and torch.allclose(sin, ref_sin, atol=1e-6)
    ref_q, ref_k = apply_rotary_pos_emb(q, k, ref_cos, ref_sin)
    rot_q, rot_k = apply_rotary(q, k, cos, sin)
    assert torch.allclose(rot_q, ref_q, atol=1e-5) and torch.allclose(rot_k, ref_k, atol=1e-5)
    # bf16 inputs come back in bf16, rotated in fp32
    rot_q16, _ = apply_rotary(q.bfloat16(), k.bfloat16(), cos, sin)
    assert rot_q16.dtype == torch.bfloat16 and (rot_q16.float() - rot_q).abs().max() < 0.05


def test_mrope_with_equal_streams_is_1d_rope():
    head_dim, section = 16, [2, 3, 3]
    inv_freq = rope_inv_freq(head_dim, 10_000.0)
    position_ids = torch.randint(0, 50, (2, 9))
    cos_1d, sin_1d = rope_cos_sin(position_ids, inv_freq)
    cos_3d, sin_3d = rope_cos_sin(position_ids.expand(3, 2, 9), inv_freq, section)
    assert torch.equal(cos_1d, cos_3d) and torch.equal(sin_1d, sin_3d)
    # a different height stream changes exactly the height band (in both rotate-half halves)
    streams = position_ids.expand(3, 2, 9).clone()
    streams[1] += 5
    cos_h, _ = rope_cos_sin(streams, inv_freq, section)
    changed = (cos_h != cos_1d).any(dim=(0, 1))  # (head_dim,)
    band = torch.zeros(head_dim // 2, dtype=torch.bool)
    band[2:5] = True
    assert torch.equal(changed, torch.cat([band, band]))


def test_sdpa_attention_matches_per_document_reference():
    torch.manual_seed(3)
    position_ids, document_ids = packed_row([4, 6, 3], num_padding=3)  # (1, 16)
    document_ids = torch.cat([document_ids, torch.tensor([[0] * 10 + [1] * 6])])  # (2, 16), second row no padding
    q, k, v = torch.randn(2, 4, 16, 8), torch.randn(2, 2, 16, 8), torch.randn(2, 2, 16, 8)
    for causal in (True, False):
        out = attention(q, k, v, cu_seqlens=None, max_seqlen=None, document_ids=document_ids, causal=causal,
                        backend="sdpa")
        assert out.shape == (2, 4, 16, 8) and torch.isfinite(out).all()
        for row in range(2):
            for doc in document_ids[row].unique().tolist():
                if doc < 0:
                    continue
                idx = (document_ids[row] == doc).nonzero().flatten()
                kk = k[row][:, idx].repeat_interleave(2, dim=0)  # GQA: each kv head serves 2 query heads
                vv = v[row][:, idx].repeat_interleave(2, dim=0)
                expected = torch.nn.functional.scaled_dot_product_attention(q[row][:, idx], kk, vv, is_causal=causal)
                assert torch.allclose(out[row][:, idx], expected, atol=1e-5)


def test_cu_seqlens_mask_and_backend_choice():
    _, row0 = packed_row([3, 2], num_padding=2)  # [0 0 0 1 1 -1 -1]
    document_ids = torch.cat([row0, torch.tensor([[0, 0, 0, 0, 0, 0, 0]])])
    cu_seqlens, max_seqlen = document_ids_to_cu_seqlens(document_ids)
    assert cu_seqlens.tolist() == [0, 3, 5, 7, 14] and cu_seqlens.dtype == torch.int32 and max_seqlen == 7
    mask = document_mask(row0)[0, 0]
    assert mask[4].tolist() == [False, False, False, True, True, False, False]
    assert mask[6].tolist() == [False] * 6 + [True]  # padding attends to itself only
    assert attention_backend("cpu", torch.bfloat16) == "sdpa"
    assert attention_backend("cuda", torch.float32) == "sdpa"  # the varlen kernels take fp16/bf16 only
    q = torch.randn(1, 2, 7, 8)
    with pytest.raises(ValueError, match="needs CUDA"):
        attention(q, q, q, cu_seqlens=None, max_seqlen=None, document_ids=row0, backend="varlen")
    with pytest.raises(ValueError, match="not one of"):
        attention(q, q, q, cu_seqlens=None, max_seqlen=None, document_ids=row0, backend="xformers")


def test_varlen_layout_and_cu_seqlens_agree_with_the_document_mask():
    """What the CUDA varlen paths compute, emulated per segment on CPU: equal to sdpa at every real token."""
    torch.manual_seed(7)
    _, row0 = packed_row([5, 4], num_padding=3)
    _, row1 = packed_row([2, 7, 3], num_padding=0)
    document_ids = torch.cat([row0, row1 + 2])  # (2, 12), ids unique across the batch as packing numbers them
    q, k, v = torch.randn(2, 4, 12, 8), torch.randn(2, 4, 12, 8), torch.randn(2, 4, 12, 8)
    cu_seqlens, max_seqlen = document_ids_to_cu_seqlens(document_ids)
    assert max_seqlen == 7
    q_packed, k_packed, v_packed = (to_varlen_layout(x) for x in (q, k, v))  # (24, 4, 8)
    segments = []
    for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        segment = [x[start:end].transpose(0, 1) for x in (q_packed, k_packed, v_packed)]  # (H, n, Dh)
        segments.append(torch.nn.functional.scaled_dot_product_attention(*segment, is_causal=True).transpose(0, 1))
    emulated = from_varlen_layout(torch.cat(segments), batch=2)
    assert torch.equal(from_varlen_layout(q_packed, batch=2), q)
    expected = attention(q, k, v, cu_seqlens=None, max_seqlen=None, document_ids=document_ids, backend="sdpa")
    real = (document_ids >= 0)[:, None, :, None].expand_as(expected)
    assert torch.allclose(emulated[real], expected[real], atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["flash", "varlen"])
def test_cuda_varlen_backends_match_sdpa(backend):
    flash_attn_varlen_func, varlen_attn, _ = varlen_kernels()
    if (flash_attn_varlen_func if backend == "flash" else varlen_attn) is None:
        pytest.skip(f"{backend} attention is not available here")
    torch.manual_seed(8)
    _, row0 = packed_row([50, 100, 37], num_padding=69)
    _, row1 = packed_row([256], num_padding=0)
    document_ids = torch.cat([row0, row1 + 3]).cuda()  # (2, 256)
    q, k, v = (torch.randn(2, heads, 256, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for heads in (8, 2, 2))
    results = {}
    for name in ("sdpa", backend):
        out = attention(q, k, v, cu_seqlens=None, max_seqlen=None, document_ids=document_ids, backend=name)
        real = (document_ids >= 0)[:, None, :, None].expand_as(out)
        grads = torch.autograd.grad((out.float() * real).square().sum(), (q, k, v))
        results[name] = (out[real].float(), [g.float() for g in grads])
    (out_sdpa, grads_sdpa), (out_varlen, grads_varlen) = results["sdpa"], results[backend]
    assert (out_sdpa - out_varlen).abs().max().item() < 2e-2
    for grad_sdpa, grad_varlen in zip(grads_sdpa, grads_varlen):
        assert (grad_sdpa - grad_varlen).abs().max().item() < 5e-2 * grad_sdpa.abs().max().item()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_packed_documents_equal_separate_runs():
    torch.manual_seed(9)
    model = Backbone(tiny_config(qkv_bias=True)).cuda().bfloat16().eval()
    lengths = [33, 70, 25]
    position_ids, document_ids = packed_row(lengths, num_padding=0)
    input_ids = torch.randint(0, VOCAB_SIZE, (1, sum(lengths)), device="cuda")
    with torch.no_grad():
        packed = model.logits(model(input_ids, position_ids=position_ids.cuda(), document_ids=document_ids.cuda()))
        start = 0
        for length in lengths:
            alone_positions, alone_documents = single_document(1, length)
            alone = model.logits(model(input_ids[:, start:start + length], position_ids=alone_positions.cuda(),
                                       document_ids=alone_documents.cuda()))
            assert (packed[:, start:start + length].float() - alone.float()).abs().max().item() < 5e-2
            start += length


def test_packed_documents_equal_separate_runs():
    torch.manual_seed(4)
    model = Backbone(tiny_config(qkv_bias=True)).eval()
    lengths = [5, 9, 7]
    position_ids, document_ids = packed_row(lengths, num_padding=3)  # (1, 24)
    input_ids = torch.randint(0, VOCAB_SIZE, (1, 24))
    with torch.no_grad():
        packed = model.logits(model(input_ids, position_ids=position_ids, document_ids=document_ids))
        assert torch.isfinite(packed).all()
        start = 0
        for length in lengths:
            alone_positions, alone_documents = single_document(1, length)
            alone = model.logits(model(input_ids[:, start:start + length], position_ids=alone_positions,
                                       document_ids=alone_documents))
            assert (packed[:, start:start + length] - alone).abs().max().item() < 1e-5
            start += length


def test_no_gradient_crosses_documents():
    torch.manual_seed(5)
    model = Backbone(tiny_config())
    lengths = [6, 8, 5]
    position_ids, document_ids = packed_row(lengths, num_padding=0)
    embeds = model.embed(torch.randint(0, VOCAB_SIZE, (1, 19))).detach().requires_grad_(True)
    hidden = model(inputs_embeds=embeds, position_ids=position_ids, document_ids=document_ids)
    model.logits(hidden[:, 6:14]).logsumexp(-1).sum().backward()  # a loss on document 1 only
    grad = embeds.grad[0].abs().sum(-1)  # (L,)
    assert torch.all(grad[:6] == 0) and torch.all(grad[14:] == 0)
    assert torch.all(grad[6:14] > 0)


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(6)
    model = Backbone(tiny_config(qkv_bias=True, tie_embeddings=True))
    position_ids, document_ids = packed_row([10, 6], num_padding=2)
    input_ids = torch.randint(0, VOCAB_SIZE, (1, 18))

    def gradients(checkpointing: bool) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        model.activation_checkpointing = checkpointing
        logits = model.logits(model(input_ids, position_ids=position_ids, document_ids=document_ids))
        torch.nn.functional.cross_entropy(logits[0, :16], input_ids[0, :16]).backward()
        return {name: param.grad.clone() for name, param in model.named_parameters()}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys() and len(plain) == len(list(model.parameters()))
    for name, grad in plain.items():
        assert grad.abs().sum() > 0, name
        assert torch.allclose(grad, checkpointed[name], rtol=0, atol=1e-7), name


def test_forward_needs_exactly_one_input():
    model = Backbone(tiny_config())
    position_ids, document_ids = single_document(1, 4)
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        model(position_ids=position_ids, document_ids=document_ids)
