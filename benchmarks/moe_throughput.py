"""Mixture-of-experts layer throughput on CPU: backbone.SparseMoE's two kernels (tokens sorted by expert, then
torch's grouped GEMM, or one matrix multiply per expert) vs transformers' Qwen3MoeSparseMoeBlock (a one-hot mask
per expert, the usual per-expert loop), with the same weights, at 8 and 64 experts.

    python benchmarks/moe_throughput.py [--tokens 4096] [--dim 256] [--intermediate 128] [--repeats 5]

Forward + backward of one layer, best of --repeats runs (other processes may share the machine); the outputs
are checked equal first. Prints tokens/s for each and their ratio, measured side by side in one run.
"""

from __future__ import annotations

import argparse

import torch
from audio_features import best_time_s  # benchmarks/ is on the path when a benchmark runs as a script

from omni_train.model.backbone import MoEConfig, SparseMoE


def main() -> None:
    from transformers import Qwen3MoeConfig, logging
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    logging.set_verbosity_error()  # the block used standalone: its note that no experts implementation was set
    print(f"{args.tokens} tokens, dim {args.dim}, expert width {args.intermediate}, top {args.top_k}, "
          f"{torch.get_num_threads()} threads, forward + backward")
    print(f"{'experts':>8} {'grouped tok/s':>14} {'sorted loop tok/s':>18} {'transformers loop tok/s':>24} "
          f"{'grouped/transformers':>21} {'grouped/sorted loop':>20}")
    for experts in (8, 64):
        torch.manual_seed(0)
        ours = SparseMoE(args.dim, MoEConfig(experts=experts, intermediate=args.intermediate, top_k=args.top_k,
                                             kernel="grouped"))
        with torch.no_grad():
            for p in ours.parameters():
                p.normal_(0.0, 0.05)
        sorted_loop = SparseMoE(args.dim, MoEConfig(experts=experts, intermediate=args.intermediate, top_k=args.top_k,
                                                    kernel="loop"))
        sorted_loop.load_state_dict(ours.state_dict())
        loop = Qwen3MoeSparseMoeBlock(Qwen3MoeConfig(hidden_size=args.dim, moe_intermediate_size=args.intermediate,
                                                     num_experts=experts, num_experts_per_tok=args.top_k, norm_topk_prob=True))
        loop.load_state_dict({"gate.weight": ours.gate.weight.detach().clone(),
                              "experts.gate_up_proj": ours.gate_up_proj.detach().clone(),
                              "experts.down_proj": ours.down_proj.detach().clone()})
        x = torch.randn(1, args.tokens, args.dim, requires_grad=True)
        valid = torch.ones(1, args.tokens, dtype=torch.bool)
        assert torch.allclose(ours(x, valid), loop(x), atol=1e-5)
        assert torch.allclose(sorted_loop(x, valid), loop(x), atol=1e-5)

        def run(block, *extra):
            block.zero_grad(set_to_none=True)
            block(x, *extra).square().mean().backward()

        ours_s = best_time_s(lambda: run(ours, valid), args.repeats)
        sorted_s = best_time_s(lambda: run(sorted_loop, valid), args.repeats)
        loop_s = best_time_s(lambda: run(loop), args.repeats)
        print(f"{experts:>8} {args.tokens / ours_s:>14,.0f} {args.tokens / sorted_s:>18,.0f} {args.tokens / loop_s:>24,.0f} "
              f"{loop_s / ours_s:>20.2f}x {sorted_s / ours_s:>19.2f}x")


if __name__ == "__main__":
    main()
