"""Representation diagnostics (train/diagnostics.py): gradient norms and loss shares against hand
computations, linear CKA on hand-made matrices, the same numbers under DDP and ZeRO 1-3 as in one
process, and the modality-reliance alarm on a task that needs its audio and on the same task with the
audio replaced by noise (issue 13's Done-when)."""

from __future__ import annotations

import dataclasses
import json
import math
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from dist_diagnostics import mixed_batches
from distributed import torchrun
from omni_train.config import RecipeError, load_recipe
from omni_train.data import synth
from omni_train.data.text import Tokenizer
from omni_train.model.omni import build_model, fuse_interleave
from omni_train.probes.runner import ProbeConfig
from omni_train.train.diagnostics import linear_cka, loss_share_metrics
from omni_train.train.engine import Engine, init_distributed


def test_linear_cka_on_hand_made_matrices():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    # X^T X = 2 I (|.|_F = 2 sqrt 2), Y = X's first column: Y^T Y = 2, Y^T X = [2, 0]: 4 / (2 sqrt 2 * 2)
    assert linear_cka(x, x[:, :1]) == pytest.approx(1 / math.sqrt(2), abs=1e-12)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 16, generator=g, dtype=torch.float64)
    rotation, _ = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))
    assert linear_cka(a, a) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(a, 3.5 * a @ rotation + 7.0) == pytest.approx(1.0, abs=1e-12)  # rotation, scale, shift
    assert linear_cka(a, a * torch.linspace(0.1, 10.0, 16, dtype=torch.float64)) < 0.9  # not an isotropic scale
    independent = linear_cka(torch.randn(5000, 8, generator=g), torch.randn(5000, 8, generator=g))
    assert independent < 0.01, independent
    assert linear_cka(a, torch.ones_like(a)) == 0.0  # a constant side shares nothing
    assert math.isnan(linear_cka(a[:1], a[:1]))


def test_diagnostics_keys_are_validated():
    with pytest.raises(RecipeError, match=r"^train\.diagnostics\.collapse_patience must be >= 1"):
        load_recipe("recipes/smoke.yaml", ["train.diagnostics.collapse_patience=0"])
    with pytest.raises(RecipeError, match=r"^train\.diagnostics\.reliance_every must be >= 0"):
        load_recipe("recipes/smoke.yaml", ["train.diagnostics.reliance_every=-1"])
    with pytest.raises(ValueError, match="layers"):
        ProbeConfig(name="p", kind="generative", shards="x.tar", layers=[1])


def test_grad_norms_and_loss_shares_equal_a_hand_computation(tmp_path):
    """One single-engine step over two micro-batches (video + audio, image, speech, text; four tasks,
    two documents in one row) against param.grad, autograd.grad of the features and per-document sums."""
    cfg = load_recipe("recipes/smoke.yaml", ["train.engine=single", "train.warmup_steps=0", "train.grad_accum=2", "data.seq_len=192",
                                             "train.diagnostics.loss_share=true"])
    tokenizer = Tokenizer.byte_level()
    batches = mixed_batches(cfg, tokenizer, tmp_path)
    torch.manual_seed(0)
    engine = Engine(build_model(cfg.model, vocab_size=tokenizer.vocab_size), cfg.train, init_distributed("single"),
                    micro_batch_size=2)
    torch.manual_seed(0)
    model = build_model(cfg.model, vocab_size=tokenizer.vocab_size)  # the same weights, by hand

    feature_sumsq: dict[str, float] = {}
    task_sums: dict[str, float] = {}
    for batch in batches:
        features = model.encode_media(batch)                                  # {modality: (N, D)}
        embeds = fuse_interleave(model.backbone.embed(batch["input_ids"]), batch["modality_ids"], features)
        hidden = model.backbone(inputs_embeds=embeds, position_ids=batch["position_ids"], document_ids=batch["document_ids"])
        loss, _, per_token_loss = model.next_token_loss(hidden, batch["labels"], batch["document_ids"])
        names = sorted(features)
        grads = torch.autograd.grad(loss / len(batches), [features[n] for n in names], retain_graph=True)
        for name, grad in zip(names, grads):
            feature_sumsq[name] = feature_sumsq.get(name, 0.0) + float(grad.double().pow(2).sum())
        (loss / len(batches)).backward()
        for doc, sample in enumerate(batch["samples"]):  # a sample's tokens: its document's positions
            task_sums[sample["task"]] = task_sums.get(sample["task"], 0.0) + float(per_token_loss.detach()[batch["document_ids"] == doc].double().sum())
    by_hand = {name: math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in child.parameters()))
               for name, child in model.named_children() if any(p.requires_grad for p in child.parameters())}

    result = engine.train_step(batches, grad_norms=True)
    assert result["module_grad_norms"].keys() == by_hand.keys() == {
        "audio_encoder", "audio_projector", "vision_encoder", "vision_projector", "backbone"}
    for name, value in by_hand.items():
        assert result["module_grad_norms"][name] == pytest.approx(value, rel=1e-6), name
    # the modules' squares add up to the clipped-over norm the engine reports
    assert math.sqrt(sum(v * v for v in result["module_grad_norms"].values())) == pytest.approx(result["grad_norm"], rel=1e-5)
    assert set(result["feature_grad_norms"]) == set(feature_sumsq) == {"audio", "image", "video"}
    for name, sumsq in feature_sumsq.items():
        assert result["feature_grad_norms"][name] == pytest.approx(math.sqrt(sumsq), rel=1e-6), name
    shares = loss_share_metrics(result["task_losses"], engine.dist)
    total = sum(task_sums.values())
    assert sum(v for k, v in shares.items() if k.startswith("loss_share/")) == pytest.approx(1.0, abs=1e-12)
    for task, loss_sum in task_sums.items():
        assert shares[f"loss_share/{task}"] == pytest.approx(loss_sum / total, rel=1e-6), task
    # measuring changes nothing: the same step without diagnostics gives bit-identical weights
    torch.manual_seed(0)
    plain = Engine(build_model(cfg.model, vocab_size=tokenizer.vocab_size), cfg.train, init_distributed("single"),
                   micro_batch_size=2)
    plain.cfg = dataclasses.replace(cfg.train, diagnostics=dataclasses.replace(cfg.train.diagnostics, loss_share=False))
    assert plain.train_step(batches)["loss"] == result["loss"]
    for (name, p), q in zip(plain.module.named_parameters(), engine.module.parameters()):
        assert torch.equal(p, q), name
    print("\nhand vs engine: " + " ".join(f"{k}={v:.4f}" for k, v in sorted({**result["module_grad_norms"], **shares}.items())))


@pytest.mark.multiproc
@pytest.mark.parametrize("engines", ["zero2,zero3", pytest.param("ddp,zero1", marks=pytest.mark.slow)])
def test_diagnostics_under_ddp_and_zero_equal_one_process(engines, tmp_path, capsys):
    """Gradient norms (per module, per modality's features), loss shares and reliance of a 2-rank step equal
    one process's over both ranks' batches, within 1e-5 (measured 2.4e-7 to 2.8e-7 for DDP and ZeRO 1-3)."""
    result = torchrun("tests/dist_diagnostics.py", str(tmp_path), engines, timeout_s=400)
    with capsys.disabled():
        print("\n" + "\n".join(line for line in result.stdout.splitlines() if "difference" in line or "consistent" in line))
    assert "consistent" in result.stdout


# ------------------------------------------------------------------------------------------------ reliance

WORDS = ["red", "blue", "green", "yellow"]
CLIP_S = 0.8  # every clip padded to this length: the number of audio tokens says nothing about the word


def write_wav(path: Path, samples: np.ndarray, rate_hz: int) -> None:
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate_hz)
        f.writeframes(samples.astype(np.int16).tobytes())


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path), "rb") as f:
        return np.frombuffer(f.readframes(f.getnframes()), dtype=np.int16), f.getframerate()


@pytest.fixture(scope="module")
def word_shards(tmp_path_factory) -> dict[str, Path]:
    """Spoken words -> their text, twice: the espeak speech, and white noise of the same length in its place."""
    from omni_train.cli import main

    root = tmp_path_factory.mktemp("words")
    rng = np.random.default_rng(0)
    shards = {}
    for kind in ("speech", "noise"):
        media = root / kind / "media"
        media.mkdir(parents=True)
        entries = []
        for word in WORDS:
            for pitch in (30, 60, 90):
                for rate_wpm in (140, 200):
                    name = f"{word}-{pitch}-{rate_wpm}.wav"
                    if kind == "speech":
                        speech, rate_hz = read_wav(synth.speech(media / name, word, pitch=pitch, rate_wpm=rate_wpm))
                        clip = np.zeros(int(CLIP_S * rate_hz), dtype=np.int16)
                        clip[:min(len(speech), len(clip))] = speech[:len(clip)]
                    else:
                        rate_hz = 22050
                        clip = (rng.standard_normal(int(CLIP_S * rate_hz)) * 3000).clip(-32767, 32767)
                    write_wav(media / name, clip, rate_hz)
                    entries.append({"messages": [{"role": "user", "content": "<audio>"}, {"role": "assistant", "content": word}],
                                    "meta": {"task": "word", "language": "en", "transcript": word}, "audios": [name]})
        manifest = root / kind / "manifest.jsonl"
        manifest.write_text("".join(json.dumps(e) + "\n" for e in entries))
        assert main(["shards", "build", "--manifest", str(manifest), "--media-root", str(media), "--out",
                     str(root / kind / "shards"), "--max-samples", "100"]) == 0
        shards[kind] = root / kind / "shards" / "train-000000.tar"
    return shards


def train_words(shard: Path, run: Path) -> tuple[list[dict], list[dict]]:
    """20 single-engine steps with reliance every 10 (eval batches: the training shard): (metrics rows, probe rows)."""
    from omni_train.train.loop import train

    cfg = load_recipe("recipes/smoke.yaml", [
        f"name={run.name}", f"output_dir={run}", f"data.train.0.shards={shard}", f"data.eval.0.shards={shard}",
        "data.seq_len=256", "data.batch_size=2", "data.num_workers=0", "data.pack_pool=8", "data.decode_cache_mb=64",
        "train.engine=single", "train.steps=20", "train.warmup_steps=5", "train.log_every=10", "train.eval_every=0",
        "train.eval_batches=2", "train.checkpoint_every=20", "train.progress=false",
        "train.diagnostics.reliance_every=10", "train.diagnostics.reliance_min=0.02",
        "train.diagnostics.collapse_min_loss=0.1", "train.diagnostics.collapse_patience=2"])
    # speech/text alignment at the end: recall@k and CKA at two backbone layers
    cfg.probes = [ProbeConfig(name="align", kind="retrieval", shards=str(shard), k=[1], layers=[1, 3], batch_size=24)]
    train(cfg)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    probes = [json.loads(line) for line in (run / "probes.jsonl").read_text().splitlines()]
    return [r for r in rows if "reliance/audio" in r], probes


@pytest.mark.outcome
def test_reliance_alarm_fires_when_the_audio_is_noise_and_stays_quiet_when_it_is_needed(word_shards, tmp_path, capsys):
    checks, probes, logs = {}, {}, {}
    for kind in ("speech", "noise"):
        checks[kind], probes[kind] = train_words(word_shards[kind], tmp_path / kind)
        logs[kind] = capsys.readouterr().out
    with capsys.disabled():
        for kind in ("speech", "noise"):
            align = {r["metric"]: r["value"] for r in probes[kind] if r["task"] == "all" and r["language"] == "all"}
            print(f"\n{kind}: " + "; ".join(
                f"step {r['step']} reliance/audio {r['reliance/audio']:.4f} modality_loss/audio "
                f"{r['modality_loss/audio']:.3f} collapse {r['collapse/audio']}" for r in checks[kind])
                + "; " + " ".join(f"{k}={v:.3f}" for k, v in sorted(align.items())))
    speech, noise = checks["speech"], checks["noise"]
    assert [r["step"] for r in speech] == [r["step"] for r in noise] == [10, 20]
    # speech: the model reads the word from the audio; its mean in place of each clip costs many nats per token
    assert speech[-1]["reliance/audio"] > 0.1 and speech[-1]["reliance/audio"] > 100 * abs(noise[-1]["reliance/audio"])
    assert all(r["collapse/audio"] == 0 for r in speech) and "collapse alarm" not in logs["speech"]
    # noise: nothing to read, the loss stays at the words' prior (about ln 4 over the answer), the alarm fires
    assert all(abs(r["reliance/audio"]) < 0.02 and r["modality_loss/audio"] > 0.1 for r in noise)
    assert [r["collapse/audio"] for r in noise] == [0, 1]  # patience 2: the second check
    assert logs["noise"].count("collapse alarm: the model ignores audio") == 1
    for kind in ("speech", "noise"):
        cka = [r for r in probes[kind] if r["metric"].startswith("cka/layer") and r["task"] == "all" and r["language"] == "all"]
        assert sorted(r["metric"] for r in cka) == ["cka/layer1", "cka/layer3"]
        assert all(0.0 <= r["value"] <= 1.0 + 1e-9 and r["n"] == 24 for r in cka)
