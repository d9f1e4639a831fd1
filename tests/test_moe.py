"""The mixture-of-experts backbone option (issue 16, first slice: `model.backbone.moe`, backbone.SparseMoE).

Routing and expert outputs against transformers' own Qwen3-MoE block with the same weights (and a per-token
loop), gradients included; the router's load-balance loss against transformers' `load_balancing_loss_func`
with padding masked; packed rows equal separate rows; the tiny-moe preset trains and logs the router figures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from omni_train.model.backbone import Backbone, BackboneConfig, MoEConfig, SparseMoE

from distributed import REPO

transformers_moe = pytest.importorskip("transformers.models.qwen3_moe.modeling_qwen3_moe")


def moe_block(experts: int = 6, top_k: int = 2, dim: int = 16, intermediate: int = 8, seed: int = 0):
    """Our block and transformers' Qwen3MoeSparseMoeBlock holding the same random weights."""
    from transformers import Qwen3MoeConfig

    torch.manual_seed(seed)
    ours = SparseMoE(dim, MoEConfig(experts=experts, intermediate=intermediate, top_k=top_k))
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0.0, 0.5)
    theirs = transformers_moe.Qwen3MoeSparseMoeBlock(Qwen3MoeConfig(
        hidden_size=dim, moe_intermediate_size=intermediate, num_experts=experts, num_experts_per_tok=top_k,
        norm_topk_prob=True))
    theirs.load_state_dict({"gate.weight": ours.gate.weight.detach().clone(),
                            "experts.gate_up_proj": ours.gate_up_proj.detach().clone(),
                            "experts.down_proj": ours.down_proj.detach().clone()})
    return ours, theirs


@pytest.mark.parametrize("experts,top_k", [(6, 2), (8, 1), (4, 4)])
def test_routing_equals_transformers_and_a_per_token_loop(experts, top_k):
    ours, theirs = moe_block(experts, top_k)
    x = torch.randn(3, 7, 16, requires_grad=True)
    valid = torch.ones(3, 7, dtype=torch.bool)
    got = ours(x, valid)
    want = theirs(x)
    assert (got - want).abs().max() < 1e-6
    # the same by a loop over tokens: softmax in fp32, top k, renormalised, the chosen experts' SwiGLU summed
    loop = torch.zeros_like(x)
    for b in range(3):
        for t in range(7):
            probs = torch.softmax(ours.gate.weight.float() @ x[b, t].float(), dim=-1)
            weights, chosen = probs.topk(top_k)
            for w, e in zip(weights / weights.sum(), chosen.tolist()):
                gate, up = (ours.gate_up_proj[e] @ x[b, t]).chunk(2)  # written out, not ours.expert
                loop[b, t] += w * (ours.down_proj[e] @ (F.silu(gate) * up))
    assert (got - loop).abs().max() < 1e-5
    # gradients: the same upstream gradient through both blocks
    upstream = torch.randn_like(got)
    ours_grads = torch.autograd.grad(got, [x, ours.gate.weight, ours.gate_up_proj, ours.down_proj], upstream)
    theirs_grads = torch.autograd.grad(want, [x, theirs.gate.weight, theirs.experts.gate_up_proj,
                                              theirs.experts.down_proj], upstream)
    for a, b in zip(ours_grads, theirs_grads, strict=True):  # summation order differs: relative to the largest
        assert (a - b).abs().max() <= 1e-6 * max(1.0, float(b.abs().max()))


def test_router_terms_equal_transformers_load_balancing_loss_with_padding_masked():
    ours, _ = moe_block(experts=5, top_k=2)
    x = torch.randn(2, 9, 16)
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[1, 6:] = False  # padding: counted by neither
    ours(x, valid)
    logits = F.linear(x.reshape(-1, 16), ours.gate.weight)
    want = transformers_moe.load_balancing_loss_func((logits,), num_experts=5, top_k=2, attention_mask=valid.long())
    assert torch.allclose(ours.terms["load_balance"], want, atol=1e-6), (ours.terms["load_balance"], want)
    kept = logits[valid.reshape(-1)]
    assert torch.allclose(ours.terms["z_loss"], torch.logsumexp(kept, -1).pow(2).mean(), atol=1e-6)
    counts = torch.bincount(kept.topk(2, dim=-1).indices.reshape(-1), minlength=5).float()
    assert float(ours.terms["max_load"]) == pytest.approx(float(counts.max() / counts.mean()))


def test_packed_rows_equal_separate_rows():
    """Routing is per token and the router terms count real tokens only: two documents packed in one row give
    the hidden states and terms of the same documents in rows of their own (padded)."""
    torch.manual_seed(0)
    cfg = BackboneConfig(vocab_size=50, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=64, qk_norm=True,
                         moe=MoEConfig(experts=4, intermediate=16, top_k=2, every=1))
    model = Backbone(cfg).eval()
    a, b = torch.randint(0, 50, (5,)), torch.randint(0, 50, (7,))
    packed = model(torch.cat([a, b])[None], position_ids=torch.cat([torch.arange(5), torch.arange(7)])[None],
                   document_ids=torch.tensor([[0] * 5 + [1] * 7]))
    packed_terms = model.moe_terms()
    rows = torch.zeros(2, 7, dtype=torch.long)
    rows[0, :5], rows[1] = a, b
    document_ids = torch.tensor([[0] * 5 + [-1] * 2, [0] * 7])
    separate = model(rows, position_ids=torch.arange(7).expand(2, 7), document_ids=document_ids)
    assert (packed[0, :5] - separate[0, :5]).abs().max() < 1e-5
    assert (packed[0, 5:] - separate[1]).abs().max() < 1e-5
    for name, value in model.moe_terms().items():
        assert abs(float(value.detach()) - float(packed_terms[name].detach())) < 1e-5, name


def test_config_refusals():
    with pytest.raises(ValueError, match="model.backbone.moe.top_k"):
        MoEConfig(experts=2, intermediate=4, top_k=3)
    with pytest.raises(ValueError, match="model.backbone.moe.experts"):
        MoEConfig(experts=0, intermediate=4)


def test_tiny_moe_trains_and_logs_router_figures(corpus, tmp_path):
    run = tmp_path / "moe"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    result = subprocess.run(
        [sys.executable, "launch/pretrain.py", "--recipe", "recipes/smoke.yaml", f"name={run.name}", f"output_dir={run}",
         f"data.train.0.shards={corpus['pattern']}", f"data.eval.0.shards={corpus['shards'][-1]}", "model.preset=tiny-moe",
         "train.engine=single", "train.steps=8", "train.eval_every=0", "train.checkpoint_every=8", "train.precision=fp32",
         "train.tracker=none", "train.progress=false", "data.num_workers=0"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    print("tiny-moe: loss " + " ".join(f"{r['loss']:.3f}" for r in rows) + "; load balance "
          + " ".join(f"{r['moe/load_balance']:.3f}" for r in rows) + f"; busiest expert {rows[-1]['moe/max_load']:.2f}x the mean")
    assert sum(r["loss"] for r in rows[-2:]) / 2 < 0.8 * rows[0]["loss"]
    for r in rows:  # two sparse layers, each k = 2 when balanced, more when not
        assert 2 * 2 - 1e-4 <= r["moe/load_balance"] <= 2 * 2 * 8 and r["moe/z_loss"] > 0 and r["moe/max_load"] >= 1
