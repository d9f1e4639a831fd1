"""Tiny random Qwen2.5-Omni and Qwen3-Omni thinkers and tokenizers, built locally with transformers' own classes
(nothing is downloaded).

`tiny_tokenizer(dir)` writes a byte-level BPE tokenizer holding Qwen2.5-Omni's special tokens and a
ChatML chat template; `tiny_thinker(vocab_size)` builds `Qwen2_5OmniThinkerForConditionalGeneration`
from a tiny config whose token ids are that tokenizer's; `save_thinker(model, dir, layout=...)`
writes either the thinker's own `save_pretrained` output or the release layout (`model_type:
qwen2_5_omni`, `thinker_config`, weights under `thinker.*` in index-listed shards, plus talker and
token2wav tensors that a loader must ignore).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# The release's special tokens, in the order of their ids there (151643...).
OMNI_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>",
                       "<|vision_bos|>", "<|vision_eos|>", "<|IMAGE|>", "<|VIDEO|>", "<|vision_pad|>"]
CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
                 "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
                 "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
                 "{% elif part['type'] == 'audio' %}<|audio_bos|><|AUDIO|><|audio_eos|>"
                 "{% elif part['type'] == 'image' %}<|vision_bos|><|IMAGE|><|vision_eos|>"
                 "{% elif part['type'] == 'video' %}<|vision_bos|><|VIDEO|><|vision_eos|>{% endif %}{% endfor %}"
                 "{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Qwen3-Omni's (Qwen3-VL's vision markers and pads, its own audio ones) and a template writing them.
QWEN3_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|audio_start|>", "<|audio_end|>", "<|audio_pad|>",
                        "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
QWEN3_CHAT_TEMPLATE = (CHAT_TEMPLATE.replace("<|audio_bos|><|AUDIO|><|audio_eos|>", "<|audio_start|><|audio_pad|><|audio_end|>")
                       .replace("<|vision_bos|><|IMAGE|><|vision_eos|>", "<|vision_start|><|image_pad|><|vision_end|>")
                       .replace("<|vision_bos|><|VIDEO|><|vision_eos|>", "<|vision_start|><|video_pad|><|vision_end|>"))
TRAINING_TEXT = ["three plus five is eight", "print((3 + 5) * 2)", "What was said? user assistant system",
                 "drei plus fünf", "trois plus cinq", "Describe the image. What happens in the video?",
                 "0123456789 + - * / ( ) = . , : ; ' \" \n"] * 4


def tiny_tokenizer(out_dir: str | Path, *, vocab_size: int = 400, family: str = "qwen2_5") -> Path:
    """A byte-level BPE tokenizer with the Omni special tokens (`tokenizer.json`, `tokenizer_config.json`, template);
    family qwen3: Qwen3-Omni's tokens and template."""
    specials, template = (OMNI_SPECIAL_TOKENS, CHAT_TEMPLATE) if family == "qwen2_5" else (QWEN3_SPECIAL_TOKENS,
                                                                                          QWEN3_CHAT_TEMPLATE)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TRAINING_TEXT, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                 additional_special_tokens=specials[1:])
    hf.add_special_tokens({"additional_special_tokens": specials})
    hf.chat_template = template
    out_dir = Path(out_dir)
    hf.save_pretrained(str(out_dir))
    return out_dir


def token_ids(tokenizer_dir: str | Path) -> dict[str, int]:
    """The tokenizer's added special tokens -> ids."""
    vocab = json.loads((Path(tokenizer_dir) / "tokenizer.json").read_text())
    return {t["content"]: t["id"] for t in vocab["added_tokens"]}


def tiny_thinker_config(ids: dict[str, int], vocab_size: int, *, tie_word_embeddings: bool = False):
    from transformers import Qwen2_5OmniThinkerConfig

    return Qwen2_5OmniThinkerConfig(
        audio_config=dict(d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64, num_mel_bins=128,
                          n_window=100, output_dim=64, max_source_positions=1500),
        vision_config=dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
                           fullatt_block_indexes=[1], window_size=112, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, in_channels=3, tokens_per_second=25),
        text_config=dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}),
        audio_token_index=ids["<|AUDIO|>"], image_token_index=ids["<|IMAGE|>"], video_token_index=ids["<|VIDEO|>"],
        audio_start_token_id=ids["<|audio_bos|>"], audio_end_token_id=ids["<|audio_eos|>"],
        vision_start_token_id=ids["<|vision_bos|>"], vision_end_token_id=ids["<|vision_eos|>"],
        tie_word_embeddings=tie_word_embeddings)


def tiny_qwen3_thinker_config(ids: dict[str, int], vocab_size: int):
    """A tiny Qwen3-Omni thinker: MoE text model (a dense mlp_only layer too) with interleaved M-RoPE, the Conv2d audio
    tower with 4 s attention windows, the vision tower with a 6 x 6 position table and deepstack after blocks 0 and 2."""
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeThinkerConfig

    return Qwen3OmniMoeThinkerConfig(
        audio_config=dict(d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64, num_mel_bins=128,
                          n_window=50, n_window_infer=400, downsample_hidden_size=8, output_dim=64),
        vision_config=dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64, patch_size=16,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3, num_position_embeddings=36,
                           deepstack_visual_indexes=[0, 2]),
        text_config=dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=24, moe_intermediate_size=32,
                         num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[1],
                         rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                             "mrope_section": [4, 4, 4], "interleaved": True,
                                                             "mrope_interleaved": True}),
        audio_token_id=ids["<|audio_pad|>"], image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        audio_start_token_id=ids["<|audio_start|>"], vision_start_token_id=ids["<|vision_start|>"],
        position_id_per_seconds=13, tie_word_embeddings=False)


def tiny_thinker(tokenizer_dir: str | Path, *, seed: int = 0, tie_word_embeddings: bool = False, family: str = "qwen2_5"):
    """A random fp32 `Qwen2_5OmniThinkerForConditionalGeneration` (family qwen3: `Qwen3OmniMoeThinkerForConditionalGeneration`)
    sized for CPU tests, eval mode."""
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeThinkerForConditionalGeneration

    ids = token_ids(tokenizer_dir)
    vocab_size = max(ids.values()) + 1
    torch.manual_seed(seed)
    if family == "qwen3":
        model = Qwen3OmniMoeThinkerForConditionalGeneration(tiny_qwen3_thinker_config(ids, vocab_size))
    else:
        model = Qwen2_5OmniThinkerForConditionalGeneration(tiny_thinker_config(ids, vocab_size,
                                                                               tie_word_embeddings=tie_word_embeddings))
    with torch.no_grad():  # transformers initializes norms to one and biases to zero: randomize so parity covers them
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_" in name:
                param.add_(torch.randn_like(param) * 0.1)
            elif "experts" in name or name.endswith("mlp.gate.weight"):  # transformers inits the experts at zero
                param.normal_(0.0, 0.2)
    return model.eval()


def save_thinker(model, out_dir: str | Path, tokenizer_dir: str | Path, *, layout: str = "thinker",
                 max_shard_size: str = "200KB", talker: bool = True) -> Path:
    """Write `model` as the thinker's own save_pretrained output, or as the release layout ("release").

    A release gets two stand-in talker / token2wav tensors (a loader of the thinker must ignore them),
    or with `talker=False` none and `enable_audio_output: false`, which transformers' whole-model class loads.
    """
    import shutil

    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for item in Path(tokenizer_dir).iterdir():
        shutil.copy(item, out_dir / item.name)
    if layout == "thinker":
        model.save_pretrained(str(out_dir), max_shard_size=max_shard_size)
        return out_dir
    assert layout == "release", layout
    tmp = out_dir / ".thinker"
    model.save_pretrained(str(tmp))
    from safetensors import safe_open

    with safe_open(str(tmp / "model.safetensors"), "pt") as f:
        state = {f"thinker.{key}": f.get_tensor(key) for key in f.keys()}
    thinker_config = json.loads((tmp / "config.json").read_text())
    shutil.rmtree(tmp)
    thinker_config.pop("architectures", None)
    if thinker_config["model_type"] == "qwen3_omni_moe_thinker":
        config = {"architectures": ["Qwen3OmniMoeForConditionalGeneration"], "model_type": "qwen3_omni_moe",
                  "enable_audio_output": talker, "thinker_config": thinker_config}
        if talker:
            state["talker.codec_head.weight"] = torch.randn(8, 4)   # a loader of the thinker must ignore these
            state["code2wav.code_embedding.weight"] = torch.randn(8, 4)
    else:
        config = {"architectures": ["Qwen2_5OmniModel"], "model_type": "qwen2_5_omni", "enable_audio_output": talker,
                  "thinker_config": thinker_config, "transformers_version": "4.52.0.dev0"}
        if talker:
            state["talker.codec_head.weight"] = torch.randn(8, 4)       # a loader of the thinker must ignore these
            state["token2wav.code_embed.weight"] = torch.randn(8, 4)
            config.update(talker_config={"model_type": "qwen2_5_omni_talker"},
                          token2wav_config={"model_type": "qwen2_5_omni_token2wav"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    keys = sorted(state)
    shards = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: state[k].contiguous() for k in shard}, str(out_dir / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    (out_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    return out_dir
