"""Runs that start from other runs, LoRA checkpoints, and `omni-train export` + `load_exported` round trips.

Small single-process runs on the shared multimodal corpus (audio, images, video, text): a base
pre-trained for a few steps, a LoRA fine-tune of it on every module group, a full fine-tune with
a frozen module. Exports must reload to the run's outputs within 1e-4 (fp32; a merge reorders the float sums,
~1e-5 on any CPU kernel set, a merge scale 1% off gives ~0.1), merged and with
the adapters kept apart; LoRA checkpoints hold only the adapters and resume exactly.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from omni_train.config import RecipeError, load_recipe
from omni_train.train.loop import train

LORA = "{r: 4, alpha: 8, targets: [backbone.attention, backbone.mlp, projectors, audio_encoder, vision_encoder]}"


def run_recipe(corpus, run: Path, *overrides: str) -> Path:
    base = [f"name={run.name}", f"output_dir={run}", f"data.train.0.shards={corpus['pattern']}",
            f"data.eval.0.shards={corpus['shards'][-1]}", "train.engine=single", "train.precision=fp32", "train.tracker=none",
            "train.progress=false", "train.log_every=1", "train.eval_every=0", "data.num_workers=0"]
    train(load_recipe("recipes/smoke.yaml", [*base, *overrides]))
    return run


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    base = run_recipe(corpus, root / "base", "train.steps=2", "train.checkpoint_every=2")
    lora = run_recipe(corpus, root / "lora", f"init.run={base}", f"train.lora={LORA}", "train.steps=4",
                      "train.checkpoint_every=2", "train.lr=1e-2", "train.warmup_steps=0")
    return {"base": base, "lora": lora}


@pytest.fixture(scope="module")
def batch(corpus, runs) -> dict:
    from omni_train.data.pipeline import DataPipeline
    from omni_train.data.text import Tokenizer

    cfg = load_recipe(runs["lora"] / "config.yaml")
    pipeline = DataPipeline(dataclasses.replace(cfg.data, num_workers=0), cfg.data.eval,
                            tokenizer=Tokenizer.from_path(cfg.data.tokenizer), epochs=1)
    return next(iter(pipeline))


def test_export_reloads_to_the_same_outputs_merged_and_separate(runs, batch, tmp_path):
    from omni_train.cli import main
    from omni_train.export import load_exported, max_output_difference
    from omni_train.train.runs import load_run

    for name, flags in (("lora", ["--merge-lora"]), ("lora", ["--keep-lora"]), ("base", [])):
        reference, *_ = load_run(runs[name])
        out = tmp_path / f"{name}{''.join(flags)}"
        assert main(["export", "--run", str(runs[name]), "--out", str(out), *flags]) == 0
        model, tokenizer, cfg = load_exported(out)
        assert max_output_difference(reference, model, batch) < 1e-4, (name, flags)
        assert tokenizer.vocab_size == reference.cfg.backbone.vocab_size
        assert cfg.model.pretrained_backbone is None


def test_kept_adapters_are_peft_files_over_the_unchanged_base(runs, tmp_path):
    import peft

    from omni_train.cli import main
    from omni_train.train.runs import load_run

    out = tmp_path / "separate"
    assert main(["export", "--run", str(runs["lora"]), "--out", str(out), "--keep-lora"]) == 0
    adapter_cfg = peft.LoraConfig.from_pretrained(str(out))
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert adapter_cfg.r == 4 and "backbone.layers.0.self_attn.q_proj" in adapter_cfg.target_modules
    assert "audio_encoder.layers.0.fc1" in adapter_cfg.target_modules and "vision_projector.fc2" in adapter_cfg.target_modules
    assert adapter and all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in adapter)
    assert any(v.abs().max() > 0 for k, v in adapter.items() if k.endswith("lora_B.weight"))  # trained, not the zero init
    base, *_ = load_run(runs["base"])  # LoRA leaves the base weights as they were
    exported = load_file(str(out / "model.safetensors"))
    assert exported.keys() == base.state_dict().keys()
    assert all(torch.equal(exported[k], v) for k, v in base.state_dict().items())


def test_lora_checkpoint_holds_the_adapters_and_resumes_exactly(corpus, runs, tmp_path):
    checkpoint = runs["lora"] / "checkpoints" / "step_00000002"
    saved = load_file(str(checkpoint / "model.safetensors"))
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)
    summary = json.loads((checkpoint / "adapter.json").read_text())
    assert summary["init"]["run"] == str(runs["base"]) and sorted(saved) == summary["saved_parameters"]
    # the frozen base, once per run, as an export directory: the base run's weights
    from omni_train.export import load_exported
    from omni_train.train.runs import load_run

    frozen, *_ = load_exported(runs["lora"] / summary["base"].removeprefix("../../"))
    base, *_ = load_run(runs["base"])
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in frozen.state_dict().items())
    resumed = run_recipe(corpus, tmp_path / "resumed", f"init.run={runs['base']}", f"train.lora={LORA}", "train.steps=4",
                         "train.checkpoint_every=2", "train.lr=1e-2", "train.warmup_steps=0", f"train.resume={checkpoint}")
    expected, again = losses(runs["lora"]), losses(resumed)
    assert sorted(again) == [3, 4]
    assert all(abs(again[s] - expected[s]) < 1e-6 for s in again), (again, expected)


def test_full_finetune_inherits_the_model_and_freezes_a_module(corpus, runs, tmp_path):
    from omni_train.train.runs import load_run

    # the base has a vision encoder and the smoke recipe's model; a fine-tune recipe need not repeat it
    cfg = load_recipe("recipes/smoke.yaml", [f"init.run={runs['base']}", "model.preset=0.5b"])
    assert cfg.model.backbone.dim == 128 and cfg.init.step == 2  # step: resolved to the latest, recorded
    run = run_recipe(corpus, tmp_path / "full", f"init.run={runs['base']}", "train.steps=2", "train.checkpoint_every=2",
                     "train.modules={audio_encoder: {freeze: true}, backbone: {lr_scale: 0.5}}")
    base, *_ = load_run(runs["base"])
    tuned, *_ = load_run(run)
    before, after = base.state_dict(), tuned.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("audio_encoder."))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("backbone."))


@pytest.mark.parametrize("override,key", [
    ("train.lora={r: 0}", "train.lora.r"),
    ("train.lora={targets: [backbone.everything]}", "train.lora.targets"),
    ("train.lora={full_modules: [decoder]}", "train.lora.full_modules"),
    ("init.run=/nonexistent/run", "init.run"),
    ("init.step=3", "init.step"),
])
def test_lora_and_init_errors_name_the_key(override, key):
    with pytest.raises(RecipeError) as info:
        load_recipe("recipes/smoke.yaml", [override])
    assert str(info.value).startswith(key) and "\n" not in str(info.value), str(info.value)


def test_init_step_that_the_run_does_not_have(runs):
    with pytest.raises(RecipeError, match=r"^init.step: .* has no checkpoint of step 7 \(steps: 2\)"):
        load_recipe("recipes/smoke.yaml", [f"init.run={runs['base']}", "init.step=7"])


def test_export_cli_errors_are_one_line(runs, tmp_path, capsys):
    from omni_train.cli import main

    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "file").write_text("x")
    for args, reason in ((["--run", str(runs["lora"]), "--out", str(occupied)], "not empty"),
                         (["--run", str(tmp_path / "nope"), "--out", str(tmp_path / "o")], "not a run directory"),
                         (["--run", str(runs["lora"]), "--out", str(tmp_path / "o"), "--step", "9"], "no checkpoint of step 9")):
        assert main(["export", *args]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("omni-train: error:") and reason in lines[0], lines
    assert not (tmp_path / "o").exists()


def test_export_never_replaces_a_run_or_a_folder_that_is_not_an_export(runs, tmp_path, capsys):
    """--overwrite replaces an earlier export only: never the run itself, a folder holding it, another run, or a
    folder of other files; a sibling named like the old temporary folder (OUT.tmp) is left alone."""
    import shutil

    from omni_train.cli import main

    def listing(root: Path) -> dict[str, int]:
        return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}

    run = tmp_path / "run"
    shutil.copytree(runs["lora"], run)
    other_run = runs["base"]
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "meeting.txt").write_text("keep me")
    before = {path: listing(path) for path in (run, other_run, notes)}
    for out, reason in ((run, "is or holds the run"), (tmp_path, "is or holds the run"),
                        (other_run, "is a run directory"), (notes, "is not an earlier omni_train export")):
        assert main(["export", "--run", str(run), "--out", str(out), "--overwrite"]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("omni-train: error: --out") and reason in lines[0], lines
    assert {path: listing(path) for path in (run, other_run, notes)} == before  # nothing lost

    out = tmp_path / "export"
    (tmp_path / "export.tmp").mkdir()
    (tmp_path / "export.tmp" / "mine.txt").write_text("not the exporter's")
    assert main(["export", "--run", str(run), "--out", str(out), "--step", "2"]) == 0
    assert json.loads((out / "config.json").read_text())["source"]["step"] == 2
    assert main(["export", "--run", str(run), "--out", str(out), "--overwrite"]) == 0  # an earlier export: replaced
    assert json.loads((out / "config.json").read_text())["source"]["step"] == 4
    assert (tmp_path / "export.tmp" / "mine.txt").read_text() == "not the exporter's"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".export.")]  # no temporary left behind


def test_a_damaged_export_is_one_line_naming_the_file(runs, tmp_path):
    import shutil

    from omni_train.cli import main
    from omni_train.export import load_exported

    good = tmp_path / "export"
    assert main(["export", "--run", str(runs["base"]), "--out", str(good)]) == 0
    weights = load_file(str(good / "model.safetensors"))
    damages = {
        "garbage": ("model.safetensors", b"\x00" * 64, "model.safetensors: not a readable safetensors file"),
        "truncated": ("model.safetensors", (good / "model.safetensors").read_bytes()[:1000],
                      "model.safetensors: not a readable safetensors file"),
        "other weights": ("model.safetensors", None, "model.safetensors: the weights do not fit config.json's model"),
        "config": ("config.json", b'{"format": "omni_train", "model": {"fusion": "concat"}}', "model.fusion"),
    }
    for name, (file, content, expected) in damages.items():
        damaged = tmp_path / name.replace(" ", "_")
        shutil.copytree(good, damaged)
        if content is None:
            from safetensors.torch import save_file

            save_file({k: v for k, v in list(weights.items())[1:]}, str(damaged / file))
        else:
            (damaged / file).write_bytes(content)
        with pytest.raises(ValueError) as error:
            load_exported(damaged)
        assert expected in str(error.value) and "\n" not in str(error.value), (name, str(error.value))


def test_lora_on_a_pretrained_backbone_directory_exports_without_it(corpus, batch, tmp_path):
    """init.run=null: the weights come from a local HF Qwen3 directory (through build_model); the export needs it no more."""
    import os
    import subprocess
    import sys

    from distributed import REPO
    from omni_train.cli import main
    from omni_train.export import load_exported, max_output_difference
    from omni_train.train.runs import load_run

    transformers = pytest.importorskip("transformers")
    hf = tmp_path / "qwen3"
    torch.manual_seed(0)
    transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)).save_pretrained(hf, safe_serialization=True)
    run = tmp_path / "from_qwen"
    result = subprocess.run(
        [sys.executable, "launch/finetune.py", "--recipe", "recipes/smoke.yaml", f"name={run.name}", f"output_dir={run}",
         f"model.pretrained_backbone={hf}", "train.lora={targets: [backbone.attention]}", "train.engine=single",
         "train.steps=2", "train.checkpoint_every=2", "train.eval_every=0", "train.precision=fp32", "train.tracker=none",
         "train.progress=false", f"data.train.0.shards={corpus['pattern']}", "data.num_workers=0"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "WANDB_MODE": "disabled"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "starting from model.pretrained_backbone, LoRA r=8 on backbone.attention" in result.stdout
    # 2 layers x rank 8 x (in + out): q and o 64 + 64, k and v 64 + 32
    assert "7,168 trainable, 7,168 in LoRA adapters" in result.stdout, result.stdout[-2000:]
    import shutil

    shutil.rmtree(hf)  # the run kept its base (base/): the directory it came from is no longer needed
    out = tmp_path / "export"
    assert main(["export", "--run", str(run), "--out", str(out)]) == 0
    model, _, cfg = load_exported(out)
    assert cfg.model.pretrained_backbone is None and cfg.model.backbone.dim == 64
    reference, *_ = load_run(run)
    assert max_output_difference(reference, model, batch) < 1e-4
