"""The mixture-of-experts backbone option (issue 16, first slice: `model.backbone.moe`, backbone.SparseMoE).

Routing and expert outputs against transformers' own Qwen3-MoE block with the same weights (and a per-token
loop), gradients included; the router's load-balance loss against transformers' `load_balancing_loss_func`
with padding masked; packed rows equal separate rows; the tiny-moe preset trains and logs the router figures.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from omni_train.model.backbone import Backbone, BackboneConfig, MoEConfig, SparseMoE

from distributed import REPO

transformers_moe = pytest.importorskip("transformers.models.qwen3_moe.modeling_qwen3_moe")


def moe_block(experts: int = 6, top_k: int = 2, dim: int = 16, intermediate: int = 8, seed: int = 0,
              kernel: str = "auto"):
    """Our block and transformers' Qwen3MoeSparseMoeBlock holding the same random weights."""
    from transformers import Qwen3MoeConfig

    torch.manual_seed(seed)
    ours = SparseMoE(dim, MoEConfig(experts=experts, intermediate=intermediate, top_k=top_k, kernel=kernel))
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


@pytest.mark.parametrize("kernel", ["grouped", "loop"])
@pytest.mark.parametrize("experts,top_k", [(6, 2), (8, 1), (4, 4)])
def test_routing_equals_transformers_and_a_per_token_loop(experts, top_k, kernel):
    ours, theirs = moe_block(experts, top_k, kernel=kernel)
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


@pytest.mark.parametrize("kernel", ["grouped", "loop"])
def test_an_expert_without_tokens_gets_a_zero_gradient(kernel):
    """An idle expert (its router row pushed far down) is computed by neither kernel, and both still give its slice
    of the fused tensors a gradient, of zeros: every rank then reduces the same tensors under ZeRO-3."""
    ours, theirs = moe_block(experts=5, top_k=2, kernel=kernel)
    x = torch.rand(2, 6, 16) + 0.1                                   # positive inputs
    with torch.no_grad():
        for block in (ours, theirs):
            block.gate.weight[0] = -10.0                             # expert 0's logit far below the others
    got = ours(x, torch.ones(2, 6, dtype=torch.bool))
    busy = ours.terms["load"] > 0
    assert not busy[0] and busy.sum() >= 2 and (got - theirs(x)).abs().max() < 1e-6
    grad_up, grad_down = torch.autograd.grad(got.square().sum(), [ours.gate_up_proj, ours.down_proj])
    for grad in (grad_up, grad_down):  # zeros exactly where no token went, something everywhere else
        assert torch.equal(grad.abs().sum(dim=(1, 2)) > 0, busy)


def test_router_terms_equal_transformers_load_balancing_loss_with_padding_masked():
    ours, _ = moe_block(experts=5, top_k=2)
    x = torch.randn(2, 9, 16)
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[1, 6:] = False  # padding: counted by neither
    out = ours(x, valid)
    assert not out[1, 6:].any() and out[1, :6].abs().min() > 0  # padding is not routed: its output is 0
    logits = F.linear(x.reshape(-1, 16), ours.gate.weight)
    want = transformers_moe.load_balancing_loss_func((logits,), num_experts=5, top_k=2, attention_mask=valid.long())
    assert torch.allclose(ours.terms["load_balance"], want, atol=1e-6), (ours.terms["load_balance"], want)
    kept = logits[valid.reshape(-1)]
    assert torch.allclose(ours.terms["z_loss"], torch.logsumexp(kept, -1).pow(2).mean(), atol=1e-6)
    counts = torch.bincount(kept.topk(2, dim=-1).indices.reshape(-1), minlength=5).float()
    assert float(ours.terms["max_load"]) == pytest.approx(float(counts.max() / counts.mean()))
    assert torch.allclose(ours.terms["load"], counts / counts.mean())
    # capacity factor 1.25 over 15 tokens x 2 = 30 assignments to 5 experts: 8 each; what lies above is the drop
    capacity = -(-1.25 * 30 // 5)
    dropped = float((counts - capacity).clamp(min=0).sum() / 30)
    print(f"loads {counts.tolist()}, capacity {capacity:.0f}: drop {dropped:.3f}")
    assert float(ours.terms["capacity_drop"]) == pytest.approx(dropped)


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
        assert (value.detach() - packed_terms[name].detach()).abs().max() < 1e-5, name


def test_config_refusals():
    with pytest.raises(ValueError, match="model.backbone.moe.top_k"):
        MoEConfig(experts=2, intermediate=4, top_k=3)
    with pytest.raises(ValueError, match="model.backbone.moe.experts"):
        MoEConfig(experts=0, intermediate=4)
    with pytest.raises(ValueError, match="model.backbone.moe.kernel"):
        MoEConfig(experts=2, intermediate=4, kernel="triton")


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
        loads = [r[f"moe/load/e{e:03d}"] for e in range(8)]  # each expert's load over the mean, mean of 2 layers
        assert sum(loads) == pytest.approx(8) and max(loads) <= r["moe/max_load"] + 1e-6
        assert 0 <= r["moe/capacity_drop"] < 1


@pytest.mark.multiproc
@pytest.mark.outcome
def test_lora_on_experts_and_router_under_zero3(corpus, tmp_path, capsys):
    """LoRA adapters on the experts (one low-rank pair per expert of each fused tensor, peft's target_parameters)
    and on the routers, trained under ZeRO-3 on 2 ranks from a tiny-moe base: only the adapters move, the
    held-out loss falls, merging equals the adapted model, and the run exports both ways."""
    from distributed import torchrun
    from omni_train.cli import main
    from omni_train.data.pipeline import DataPipeline
    from omni_train.export import load_exported, max_output_difference
    from omni_train.train.lora import is_adapter_parameter
    from omni_train.train.runs import load_run

    common = [f"data.train.0.shards={corpus['pattern']}", f"data.eval.0.shards={corpus['shards'][-1]}",
              "model.preset=tiny-moe", "train.precision=fp32", "train.tracker=none", "train.progress=false",
              "data.num_workers=0", "probes=[]"]
    base = tmp_path / "base"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    made = subprocess.run([sys.executable, "launch/pretrain.py", "--recipe", "recipes/smoke.yaml", *common,
                           f"name={base.name}", f"output_dir={base}", "train.engine=single", "train.steps=6",
                           "train.checkpoint_every=6", "train.eval_every=0"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-3000:]
    run = tmp_path / "lora"
    lora = "{r: 4, alpha: 8, dropout: 0.0, targets: [backbone.attention, backbone.router, backbone.experts]}"
    result = torchrun("launch/finetune.py", "--recipe", "recipes/smoke.yaml", *common, f"name={run.name}",
                      f"output_dir={run}", f"init.run={base}", "train.engine=deepspeed", "train.zero_stage=3",
                      "train.steps=8", "train.checkpoint_every=8", "train.eval_every=8", "train.probes_at_start=true",
                      "train.lr=1e-2", "train.warmup_steps=0", f"train.lora={lora}", timeout_s=400)
    output = result.stdout + result.stderr

    base_model = load_run(base)[0]
    tuned, cfg, tokenizer, _ = load_run(run)
    merged = load_run(run, merge=True)[0]
    base_weights, tuned_weights = base_model.state_dict(), tuned.state_dict()
    frozen = {re.sub(r"(\.base_layer)+\.", ".", n): v for n, v in tuned_weights.items() if not is_adapter_parameter(n)}
    assert frozen.keys() == base_weights.keys(), sorted(frozen.keys() ^ base_weights.keys())[:5]
    assert not [n for n, v in frozen.items() if not torch.equal(v, base_weights[n])]  # the base is untouched
    adapters = {n: v for n, v in tuned_weights.items() if ".lora_B." in n}
    expert_adapters = [n for n in adapters if ".mlp.lora_B." in n or ".mlp.base_layer.lora_B." in n]
    router_adapters = [n for n in adapters if ".mlp.base_layer.base_layer.gate.lora_B." in n]
    assert len(expert_adapters) == 4 and len(router_adapters) == 2, sorted(adapters)  # 2 sparse layers
    assert all(v.abs().max() > 0 for v in adapters.values()), [n for n, v in adapters.items() if not v.abs().max() > 0]
    # merged: every adapted expert tensor moved by B_e A_e alpha / r, the rest is the base's
    moved = [n for n, v in merged.state_dict().items() if not torch.equal(v, base_weights[n])]
    assert {n.split(".mlp.")[-1] for n in moved if ".mlp." in n} == {"gate_up_proj", "down_proj", "gate.weight"}

    batch = next(iter(DataPipeline(dataclasses.replace(cfg.data, num_workers=0), cfg.data.eval, tokenizer=tokenizer,
                                   epochs=1)))
    with torch.no_grad():
        before, after = float(base_model(batch).lm_loss), float(tuned(batch).lm_loss)
    merge_difference = max_output_difference(tuned, merged, batch)
    logged = {r["step"]: r["eval_loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
              if "eval_loss" in r}
    counts = re.search(r"parameters: ([\d,]+) total, ([\d,]+) trainable, ([\d,]+) in LoRA adapters", output)
    with capsys.disabled():
        print(f"\nLoRA on experts + router, ZeRO-3 x 2 ranks: {counts.group(0) if counts else '?'}; held-out batch "
              f"loss {before:.4f} -> {after:.4f}; logged eval loss {logged}; merged vs adapters max |logit "
              f"difference| {merge_difference:.2e}")
    assert after < before - 0.05, (before, after)
    assert merge_difference < 1e-4
    for flag in ("--merge-lora", "--keep-lora"):
        directory = tmp_path / f"export{flag}"
        assert main(["export", "--run", str(run), "--out", str(directory), flag]) == 0
        model, _, _ = load_exported(directory)
        assert max_output_difference(tuned, model, batch) < 1e-4, flag
