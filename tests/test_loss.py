"""The chunked next-token loss (`train.loss_chunk_tokens`, model/loss.py): the same loss and gradients, less memory.

Compared with the unchunked expression the model uses by default, on a real multimodal batch
through the whole model (tied and untied output weights; fp32, bf16 weights, bf16 autocast) and
on the function alone; and checked that no (positions x vocab) tensor is ever created.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from omni_train.config import load_recipe
from omni_train.data import synth
from omni_train.data.image import encode_image
from omni_train.data.packing import collate_packed
from omni_train.data.text import Tokenizer, render_chat
from omni_train.model.loss import linear_cross_entropy
from omni_train.model.omni import build_model
from omni_train.train.engine import Engine, init_distributed

TOKENIZER = Tokenizer.byte_level()


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """Two rows: an image caption and a text exchange, about 60 target positions in all."""
    cfg = load_recipe("recipes/smoke.yaml")
    image = encode_image(synth.pattern_image(tmp_path_factory.mktemp("img") / "i.png", 120, 90).read_bytes(), cfg.data.image)
    caption = render_chat([{"role": "user", "content": [{"type": "image", "member": "image_0.png"}]},
                           {"role": "assistant", "content": [{"type": "text", "text": "green bands on blue"}]}],
                          [image], TOKENIZER)
    code = render_chat([{"role": "user", "content": [{"type": "text", "text": "print 3 plus 5"}]},
                        {"role": "assistant", "content": [{"type": "text", "text": "print(3 + 5)  # eight"}]}], [], TOKENIZER)
    return collate_packed([[caption], [code]], 256, TOKENIZER.pad_id, cfg.data.audio)


def loss_and_grads(model, batch, chunk_tokens: int, autocast: bool = False):
    model.loss_chunk_tokens = chunk_tokens
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(batch)
    out.loss.backward()
    return out, {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||: the relative error of the tensor as a whole."""
    a, b = a.detach().double(), b.detach().double()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-30))


def max_relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b|: the worst element (reported beside `relative`)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("precision,limit", [("fp32", 1e-6), ("bf16", 2e-2), ("autocast", 2e-2)])
def test_chunked_loss_and_every_gradient_equal_the_unchunked_ones(batch, tied, precision, limit, capsys):
    cfg = load_recipe("recipes/smoke.yaml", [f"model.backbone.tie_embeddings={str(tied).lower()}"])
    torch.manual_seed(0)
    model = build_model(cfg.model, vocab_size=TOKENIZER.vocab_size)
    if precision == "bf16":  # DeepSpeed's bf16: the weights themselves in bf16
        model = model.to(torch.bfloat16)
    assert (model.backbone.lm_head is None) == tied
    whole, whole_grads = loss_and_grads(model, batch, 0, autocast=precision == "autocast")
    chunked, chunked_grads = loss_and_grads(model, batch, 7, autocast=precision == "autocast")  # ragged last chunk
    assert whole.num_loss_tokens == chunked.num_loss_tokens > 7 * 5
    worst = {"loss": relative(chunked.loss.detach(), whole.loss.detach()),
             "per_token_loss": relative(chunked.per_token_loss, whole.per_token_loss)}
    worst.update({name: relative(chunked_grads[name], whole_grads[name]) for name in whole_grads})
    worst_element = max(max_relative(chunked_grads[name], whole_grads[name]) for name in whole_grads)
    assert all(g.abs().max() > 0 for name, g in whole_grads.items() if name.startswith("backbone.")), "a dead gradient"
    with capsys.disabled():
        name = max(worst, key=worst.get)
        print(f"\n{precision} tied={tied}: loss rel diff {worst['loss']:.1e}, worst of {len(worst)} tensors "
              f"{worst[name]:.1e} ({name}); worst element relative to its tensor's largest {worst_element:.1e}")
    assert max(worst.values()) <= limit, sorted(worst.items(), key=lambda kv: -kv[1])[:5]


@pytest.mark.parametrize("chunk_tokens", [1, 3, 50, 64, 1000])
def test_function_alone_matches_cross_entropy_of_linear(chunk_tokens):
    torch.manual_seed(1)
    hidden = torch.randn(50, 24, requires_grad=True)
    weight = (0.5 * torch.randn(3000, 24)).requires_grad_()
    targets = torch.randint(0, 3000, (50,))
    upstream = torch.rand(50)  # a weighting of the positions, so each row's incoming gradient differs
    expected = F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="none")
    grads = torch.autograd.grad((expected * upstream).sum(), (hidden, weight))
    got = linear_cross_entropy(hidden, weight, targets, chunk_tokens=chunk_tokens)
    got_grads = torch.autograd.grad((got * upstream).sum(), (hidden, weight))
    assert relative(got, expected) <= 1e-6
    assert relative(got_grads[0], grads[0]) <= 1e-6 and relative(got_grads[1], grads[1]) <= 1e-6
    empty = linear_cross_entropy(hidden[:0], weight, targets[:0], chunk_tokens=chunk_tokens)  # no target in the batch
    (empty.sum() + 0.0 * hidden.sum()).backward()
    assert empty.shape == (0,) and weight.grad is not None and not weight.grad.any()


class LargestTensor(TorchDispatchMode):
    """The most elements of any tensor an operation returns, forward and backward alike."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_tensor_of_positions_times_vocab_is_ever_created():
    num_positions, vocab, dim, chunk = 96, 500, 16, 8
    torch.manual_seed(2)
    hidden = torch.randn(num_positions, dim, requires_grad=True)
    weight = torch.randn(vocab, dim, requires_grad=True)
    targets = torch.randint(0, vocab, (num_positions,))
    sizes = {}
    for name, loss_fn in (("whole", lambda: F.cross_entropy(F.linear(hidden, weight), targets, reduction="none")),
                          ("chunked", lambda: linear_cross_entropy(hidden, weight, targets, chunk_tokens=chunk))):
        with LargestTensor() as probe:
            loss_fn().sum().backward()
        sizes[name] = probe.largest
    assert sizes["whole"] == num_positions * vocab  # the probe sees the unchunked logits
    # chunked: one chunk's logits, or the weight's gradient (vocab x dim), whichever is larger
    assert sizes["chunked"] == max(chunk * vocab, vocab * dim), sizes


def test_engine_hands_train_loss_chunk_tokens_to_the_model(batch):
    losses = []
    for chunk_tokens in (0, 16):
        cfg = load_recipe("recipes/smoke.yaml", ["train.engine=single", "train.warmup_steps=0",
                                                 f"train.loss_chunk_tokens={chunk_tokens}"])
        torch.manual_seed(0)
        engine = Engine(build_model(cfg.model, vocab_size=TOKENIZER.vocab_size), cfg.train, init_distributed("single"),
                        micro_batch_size=2)
        assert engine.module.loss_chunk_tokens == chunk_tokens
        losses.append([engine.train_step([batch])["loss"] for _ in range(3)])  # the steps after the first use its grads
    assert losses[1] == pytest.approx(losses[0], rel=1e-5), losses


@pytest.mark.parametrize("value", ["-1", "2.5"])
def test_bad_loss_chunk_tokens_is_one_error_naming_the_key(value):
    with pytest.raises(ValueError, match=r"^train\.loss_chunk_tokens"):
        load_recipe("recipes/smoke.yaml", [f"train.loss_chunk_tokens={value}"])


def test_chunked_loss_under_zero3_refuses_a_trained_output_projection():
    zero3 = ["train.engine=deepspeed", "train.zero_stage=3", "train.loss_chunk_tokens=64"]
    with pytest.raises(ValueError, match=r"^train\.loss_chunk_tokens under ZeRO-3 needs a frozen output projection"):
        load_recipe("recipes/smoke.yaml", zero3)
    with pytest.raises(ValueError, match=r"^train\.loss_chunk_tokens under ZeRO-3"):
        load_recipe("recipes/smoke.yaml", [*zero3, "train.lora={full_modules: [backbone]}"])
    assert load_recipe("recipes/smoke.yaml", [*zero3, "train.lora={}"]).train.loss_chunk_tokens == 64  # LoRA: frozen
