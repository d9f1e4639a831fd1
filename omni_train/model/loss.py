"""Next-token cross-entropy through the output projection, a chunk of target positions at a time.

    token_loss = linear_cross_entropy(hidden, weight, targets, chunk_tokens=4096)   # (N,) float32

is `F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="none")` without the
(N, vocab) logits: with Qwen2.5's 151,936-word vocabulary, 8,192 target positions hold 5 GB of
fp32 logits, and autograd keeps several such tensors alive (the logits, log_softmax's output
saved for backward, the gradient of each). Here forward computes the logits of at most
`chunk_tokens` positions at a time and keeps nothing of them; backward recomputes each chunk's
logits and turns them into that chunk's gradients in place, so the largest tensor alive is one
(chunk_tokens, vocab) fp32 block (plus the weight's gradient, which any loss has). The price is
one more (N x D x vocab) matrix product, the recomputation.

Numerics follow the unchunked expression: the logits in the inputs' dtype, softmax and loss in
fp32, the logits' gradient cast back to the inputs' dtype for the two matrix products. The
weight's gradient is summed over chunks in fp32 and cast once. Under autocast the inputs are
cast to autocast's dtype first, as autocast casts `F.linear`'s. `OmniModel.next_token_loss`
uses it with `train.loss_chunk_tokens > 0` (0 keeps the unchunked expression).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         chunk_tokens: int) -> torch.Tensor:
    """(N,) float32 cross-entropy of `F.linear(hidden, weight)` (N, vocab) against targets (N,), chunk by chunk.

    hidden (N, D), weight (vocab, D), targets (N,) class ids (all valid: no ignore index);
    chunk_tokens >= 1 positions per chunk. Differentiable in hidden and weight.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):  # what autocast would do to F.linear's inputs, outside the Function
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    with torch.autocast(device_type, enabled=False):
        return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_tokens)


def _whole(weight: torch.Tensor):
    """The weight's full values for the duration of the block.

    Under DeepSpeed ZeRO-3 the output projection is a partitioned parameter that no module forward
    gathers here (the loss is computed outside `lm_head`'s forward, and backward runs long after
    DeepSpeed released it), so each pass gathers it itself; every rank computes the loss, so the
    all-gather is collective. Anywhere else this is a no-op.
    """
    if hasattr(weight, "ds_id"):
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        if weight.ds_status == ZeroParamStatus.NOT_AVAILABLE:
            import deepspeed

            return deepspeed.zero.GatheredParameters([weight])
    return contextlib.nullcontext()


def _chunk_probabilities(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """softmax(hidden @ weight.T) (n, vocab) fp32, as exp(log_softmax): what autograd's log_softmax backward uses."""
    return torch.log_softmax(F.linear(hidden, weight).float(), dim=-1).exp_()  # the logits are freed on return


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_tokens):
        losses = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)  # (N,)
        with _whole(weight):
            for start in range(0, hidden.shape[0], chunk_tokens):
                end = min(start + chunk_tokens, hidden.shape[0])
                logits = F.linear(hidden[start:end], weight).float()  # (n, vocab), freed before the next chunk
                losses[start:end] = F.cross_entropy(logits, targets[start:end], reduction="none")
        ctx.save_for_backward(hidden, targets)  # inputs only: no (N, vocab) tensor outlives forward
        # the parameter itself, not a saved copy of its storage: ZeRO-3 swaps a partitioned parameter's storage
        # after forward, and backward gathers it again (_whole)
        ctx.weight = weight
        ctx.chunk_tokens = chunk_tokens
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        hidden, targets = ctx.saved_tensors
        weight = ctx.weight
        with _whole(weight):
            return _LinearCrossEntropy._backward(ctx, grad_losses, hidden, weight, targets)

    @staticmethod
    def _backward(ctx, grad_losses, hidden, weight, targets):
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
        for start in range(0, hidden.shape[0], ctx.chunk_tokens):
            end = min(start + ctx.chunk_tokens, hidden.shape[0])
            # d loss / d logits = softmax - one_hot(target), times the incoming gradient of each position's loss
            grad_logits = _chunk_probabilities(hidden[start:end], weight)                      # (n, vocab) fp32
            grad_logits[torch.arange(end - start, device=targets.device), targets[start:end]] -= 1.0
            grad_logits = grad_logits.mul_(grad_losses[start:end, None].float()).to(weight.dtype)
            if grad_hidden is not None:
                grad_hidden[start:end] = grad_logits @ weight                                   # (n, D)
            if grad_weight is not None:
                if grad_logits.dtype == torch.float32:
                    grad_weight.addmm_(grad_logits.t(), hidden[start:end])                     # (vocab, D)
                else:
                    grad_weight += grad_logits.t() @ hidden[start:end]
            del grad_logits
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None
