"""Fine-tuning on synthetic meetings: folder-mode shards, LoRA under DeepSpeed ZeRO-2 on 2 ranks, evaluation, export.

A meeting is made by `synth.synth_meeting` (espeak-ng voices as speakers, background noise,
an SRT of the turns) and turned into shards by `omni-train shards build --audio-dir`; two other
meetings, one with an action item (JSON transcript), are the held-out recordings. The base is
the tiny preset pre-trained briefly on the training meeting; `launch/finetune.py` trains LoRA
adapters on it under ZeRO-2. The run must train nothing but the adapters (counts printed; every
base weight of the fine-tuned model bit-identical to the base run's, every adapter moved), lower
the held-out loss clearly against the base, log WER per speaker count and length and action-item
precision/recall, and export merged and unmerged to directories that reload to the same outputs
within 1e-4. The slow test does it for 10- and 30-minute meetings and prints the peak memory of
the shard build and of each training rank for both.

Models this small, trained for a minute on a CPU, do not transcribe: their WER stays above 100%
(insertions) and moves with the CPU's float kernels (146.6% -> 134.8% with AVX-512, 133.2% with
AVX2, 126.5% with the default kernels), so WER is printed, never asserted; the held-out loss is
what LoRA must lower (tests marked `outcome` run under every kernel set with `make test-cpus`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from distributed import REPO, torchrun
from omni_train.data import synth
from omni_train.probes.metrics import item_matches
from omni_train.probes.runner import UNKNOWN, ProbeConfig, _score_generation, bucket_label, format_table

PROBE = ("{name: meeting, shards: '%s', tasks: [transcribe, action_items], max_new_tokens: 80, batch_size: 8, "
         "group_by: [num_speakers, duration_s], buckets: {duration_s: [3, 5]}}")
PEAK_RSS = "import resource, sys; from omni_train.cli import main; code = main(sys.argv[1:]); " \
           "print('peak_rss_mb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024); sys.exit(code)"


def build_meeting_shards(root: Path, *, minutes: float, seed: int = 0) -> dict:
    """A training meeting of `minutes`; held out, a 1-minute one and a 20 s one with an action item (JSON
    transcript). As folder-mode shards root/shards/train-*.tar and eval-*.tar, and the build's peak memory."""
    synth.synth_meeting(root / "meetings", minutes, num_speakers=3, seed=seed)
    synth.synth_meeting(root / "heldout", 1, num_speakers=3, seed=seed + 1, name="standup")
    synth.synth_meeting(root / "heldout", 1 / 3, num_speakers=3, seed=seed + 2, num_action_items=1, transcript="json",
                        name="wrapup")
    peaks = []
    for folder, out, fraction in (("meetings", "shards", "0"), ("heldout", "heldout_shards", "1")):
        result = subprocess.run([sys.executable, "-c", PEAK_RSS, "shards", "build", "--audio-dir", str(root / folder),
                                 "--out", str(root / out), "--segment-s", "6", "--eval-fraction", fraction],
                                cwd=REPO, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        peaks.append(float(re.search(r"peak_rss_mb ([\d.]+)", result.stdout).group(1)))
    (root / "heldout_shards" / "eval-000000.tar").rename(root / "shards" / "eval-000000.tar")
    return {"train": str(root / "shards" / "train-*.tar"), "eval": str(root / "shards" / "eval-*.tar"),
            "build_rss_mb": peaks[0]}


def common(shards: dict, run: Path) -> list[str]:
    return [f"name={run.name}", f"output_dir={run}", f"data.train.0.shards={shards['train']}",
            f"data.eval.0.shards={shards['eval']}", "data.seq_len=1024", "data.num_workers=0", "train.precision=fp32",
            "train.tracker=none", "train.progress=false", "train.log_every=5", "train.warmup_steps=3"]


def pretrain_base(shards: dict, run: Path, steps: int = 30) -> Path:
    """The "pretrained" model: the tiny preset without vision, trained briefly on the meeting (DDP, 2 ranks)."""
    torchrun("launch/pretrain.py", "--recipe", "recipes/smoke.yaml", *common(shards, run), "model.vision=null",
             "train.engine=ddp", f"train.steps={steps}", f"train.checkpoint_every={steps}", "train.eval_every=0",
             "train.lr=4e-3", "data.overlong=skip", "probes=[]", timeout_s=600)
    return run


def finetune(shards: dict, base: Path, run: Path, *extra: str, steps: int = 40) -> str:
    result = torchrun("launch/finetune.py", "--recipe", "recipes/meeting-finetune.yaml", *common(shards, run),
                      f"init.run={base}", f"train.steps={steps}", f"train.checkpoint_every={steps // 2}",
                      f"train.eval_every={steps // 2}", "train.lr=5e-3", f"probes=[{PROBE % shards['eval']}]", *extra,
                      timeout_s=900)
    return result.stdout + result.stderr


def parameter_counts(output: str) -> tuple[int, int, int]:
    counts = re.search(r"parameters: ([\d,]+) total, ([\d,]+) trainable, ([\d,]+) in LoRA adapters", output)
    assert counts, output[-3000:]
    return tuple(int(c.replace(",", "")) for c in counts.groups())


def probe_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "probes.jsonl").read_text().splitlines()]


def overall(rows: list[dict], step: int, metric: str, task: str = "transcribe") -> float:
    (row,) = [r for r in rows if r["step"] == step and r["task"] == task and r["metric"] == metric
              and r["language"] == "all" and "group_by" not in r]
    return row["value"]


def peak_rss_mb(run: Path) -> float:
    return max(row["max_rss_mb"] for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()))


@pytest.fixture(scope="module")
def meeting(tmp_path_factory) -> dict:
    return build_meeting_shards(tmp_path_factory.mktemp("meeting"), minutes=4)


@pytest.fixture(scope="module")
def base_run(meeting, tmp_path_factory) -> Path:
    return pretrain_base(meeting, tmp_path_factory.mktemp("runs") / "base")


# The fine-tuned model's held-out loss over the base's. Measured on a Zen 4 EPYC: 2.5772 -> 2.5088 (0.973) with
# AVX-512 kernels, 2.5077 (0.973) with ATEN_CPU_CAPABILITY=avx2, 2.5063 (0.972) with =default. The kernel sets move
# the ratio by 0.001; the limit asks for at least half the measured fall. (80 steps fall further, 0.954, but the
# 40 more steps cost a minute: the fall is what shows the adapters learn, not its size.)
MAX_HELD_OUT_LOSS_RATIO = 0.985


@pytest.mark.slow
@pytest.mark.outcome
@pytest.mark.multiproc
def test_lora_zero2_trains_only_adapters_lowers_held_out_loss_and_exports(meeting, base_run, tmp_path, capsys):
    import torch

    run = tmp_path / "lora"
    out = finetune(meeting, base_run, run)

    total, trainable, adapter = parameter_counts(out)  # only the adapters train
    assert trainable == adapter and 0 < adapter < total / 5, (total, trainable, adapter)

    base, tuned, tuned_cfg, tokenizer = assert_only_adapters_changed(base_run, run)

    # the held-out loss (every held-out segment, one process, the training pipeline's batches) falls from the
    # base's (the fine-tune's step 0: its adapters are still zero) by a clear margin
    before, after = held_out_loss(base, tuned_cfg, tokenizer), held_out_loss(tuned, tuned_cfg, tokenizer)
    logged = {row["step"]: row["eval_loss"] for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
              if "eval_loss" in row}
    rows = probe_rows(run)
    with capsys.disabled():
        print(f"\nLoRA ZeRO-2 ({torch.backends.cpu.get_cpu_capability()} kernels): {trainable:,} trainable = "
              f"{adapter:,} adapter parameters of {total:,}; held-out loss {before:.4f} -> {after:.4f} "
              f"(ratio {after / before:.3f}, limit {MAX_HELD_OUT_LOSS_RATIO}; logged eval loss {logged}); "
              f"held-out WER {overall(rows, 0, 'wer'):.1%} -> {overall(rows, 40, 'wer'):.1%}, "
              f"CER {overall(rows, 0, 'cer'):.1%} -> {overall(rows, 40, 'cer'):.1%} (printed only)")
    assert after < MAX_HELD_OUT_LOSS_RATIO * before, (before, after)
    assert sorted(logged) == [20, 40], logged

    # the probe's rows: WER per speaker count and length bucket, action items as items
    groups = {(r["group_by"], r["group"]) for r in rows if r["step"] == 40 and r["metric"] == "wer" and "group_by" in r}
    assert {name for name, _ in groups} == {"num_speakers", "duration_s"}, groups
    assert {g for name, g in groups if name == "duration_s"} <= {"<3", "3-5", ">=5"}
    items = {r["metric"]: r for r in rows if r["step"] == 40 and r["task"] == "action_items" and "group_by" not in r}
    assert {"item_precision", "item_recall"} <= set(items) and items["item_recall"]["n"] == 1

    # the checkpoint holds the adapters, the run its frozen base (base/) once, adapter.json where it came from
    checkpoint = run / "checkpoints" / "step_00000040"
    summary = json.loads((checkpoint / "adapter.json").read_text())
    assert summary["init"] == {"run": str(base_run), "step": 30} and (run / "base" / "model.safetensors").is_file()
    assert summary["saved_parameters"] and all(".lora_" in name for name in summary["saved_parameters"])
    assert (checkpoint / "engine" / "mp_rank_00_model_states.pt").stat().st_size < 4 * 4 * adapter

    # export merged and unmerged; both reload to the run's outputs. Kept apart, the adapters give the same logits
    # bit for bit; merged (W + B A alpha / r) the sums round differently: measured up to 8.3e-6 on logits up to 6.2
    # (AVX-512, AVX2 and default kernels alike), while a merge scale 1% off moves them 0.10 and the adapters 3.0
    from omni_train.cli import main
    from omni_train.export import load_exported, max_output_difference

    batch = eval_batch(tuned_cfg, tokenizer)
    for flag in ("--merge-lora", "--keep-lora"):
        directory = tmp_path / f"export{flag}"
        assert main(["export", "--run", str(run), "--out", str(directory), flag]) == 0
        model, _, exported = load_exported(directory)
        difference = max_output_difference(tuned, model, batch)
        with capsys.disabled():
            print(f"export {flag}: max |logit difference| after reload {difference:.2e}")
        assert difference < 1e-4, (flag, difference)
        assert exported.source["lora"] == ("merged" if flag == "--merge-lora" else "separate")


def assert_only_adapters_changed(base_run: Path, run: Path) -> tuple:
    """Every base weight of the LoRA run `run` is `base_run`'s, bit for bit; every adapter has moved from its
    start (peft's lora_B starts at zero); merging adds exactly B A alpha / r to the adapted layers and nothing
    elsewhere. Returns the base model, and the fine-tuned one (adapters apart) with its config and tokenizer."""
    import torch

    from omni_train.train.lora import is_adapter_parameter
    from omni_train.train.runs import load_run

    base = load_run(base_run)[0]
    tuned, cfg, tokenizer, _ = load_run(run)
    merged = load_run(run, merge=True)[0]
    base_weights, tuned_weights = base.state_dict(), tuned.state_dict()
    frozen = {name.replace(".base_layer.", "."): value for name, value in tuned_weights.items() if not is_adapter_parameter(name)}
    assert frozen.keys() == base_weights.keys(), sorted(frozen.keys() ^ base_weights.keys())[:5]
    changed = [name for name, value in frozen.items() if not torch.equal(value, base_weights[name])]
    assert not changed, f"{len(changed)} base weights changed: {changed[:5]}"
    adapted = {name.rsplit(".lora_B.", 1)[0] for name in tuned_weights if ".lora_B." in name}
    unmoved = [layer for layer in adapted if not tuned_weights[f"{layer}.lora_B.default.weight"].abs().max() > 0]
    assert adapted and not unmoved, f"adapters still zero: {unmoved[:5]}"
    for name, value in merged.state_dict().items():
        layer = name.rsplit(".", 1)[0]
        if layer in adapted and name.endswith(".weight"):
            delta = tuned_weights[f"{layer}.lora_B.default.weight"] @ tuned_weights[f"{layer}.lora_A.default.weight"]
            torch.testing.assert_close(value - base_weights[name], delta * cfg.train.lora.alpha / cfg.train.lora.r,
                                       rtol=1e-4, atol=1e-6)
        else:
            assert torch.equal(value, base_weights[name]), name
    return base, tuned, cfg, tokenizer


def held_out_loss(model, cfg, tokenizer) -> float:
    """Mean next-token loss over every batch of `data.eval`, as the trainer's Evaluator sums it (one process)."""
    import dataclasses

    import torch

    from omni_train.data.pipeline import DataPipeline

    pipeline = DataPipeline(dataclasses.replace(cfg.data, num_workers=0), cfg.data.eval, tokenizer=tokenizer, epochs=1)
    total = count = 0.0
    with torch.no_grad():
        for batch in pipeline:
            out = model(batch)
            total, count = total + float(out.lm_loss) * out.num_loss_tokens, count + out.num_loss_tokens
    assert count > 0
    return total / count


def eval_batch(cfg, tokenizer) -> dict:
    import dataclasses

    from omni_train.data.pipeline import DataPipeline

    pipeline = DataPipeline(dataclasses.replace(cfg.data, num_workers=0), cfg.data.eval, tokenizer=tokenizer, epochs=1)
    return next(iter(pipeline))


@pytest.mark.slow
@pytest.mark.multiproc
def test_memory_does_not_grow_with_meeting_length(tmp_path, capsys, monkeypatch):
    """10- and 30-minute meetings: the same base, the same LoRA run; peak memory of the build and of each rank."""
    # glibc raises its mmap threshold as large blocks are freed, after which freed tensors stay in the heap and
    # peak RSS depends on the order of batch shapes (about +-10% between two runs); a fixed threshold hands them
    # back, so RSS follows what is live. Inherited by every process the test starts.
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    report, runs = {}, {}
    base = None
    for minutes in (10, 30):
        shards = build_meeting_shards(tmp_path / f"m{minutes}", minutes=minutes)
        base = base or pretrain_base(shards, tmp_path / "base")
        runs[minutes] = tmp_path / f"lora{minutes}"
        out = finetune(shards, base, runs[minutes], "train.eval_every=0")
        total, trainable, adapter = parameter_counts(out)
        assert trainable == adapter
        rows = probe_rows(runs[minutes])
        report[minutes] = (shards["build_rss_mb"], peak_rss_mb(runs[minutes]), overall(rows, 0, "wer"), overall(rows, 40, "wer"))
    with capsys.disabled():
        for minutes, (build, train, before, after) in report.items():
            print(f"\n{minutes}-minute meeting: shard build peak RSS {build:.0f} MiB, training peak RSS per rank "
                  f"{train:.0f} MiB, held-out WER {before:.1%} -> {after:.1%}", end="")
        print()
    (build10, train10, _, _), (build30, train30, _, _) = report[10], report[30]
    assert build30 < 1.15 * build10 + 50, (build10, build30)
    assert train30 < 1.15 * train10 + 50, (train10, train30)


# ------------------------------------------------------------------------------------ evaluation units


def test_action_items_precision_recall_and_length_buckets():
    assert item_matches("- Send the report.\n- book a room", "- send the report\n- fix the bug\n- book a room") == (2, 2, 3)
    assert item_matches("", "- fix the bug") == (0, 0, 1)
    assert item_matches("- fix the bug\n- fix the bug", "- fix the bug") == (1, 2, 1)  # each reference item counts once
    assert [bucket_label(v, [3, 5]) for v in (0.5, 3.0, 4.9, 5.0, 60.0)] == ["<3", "3-5", "3-5", ">=5", ">=5"]


def test_rows_per_speaker_count_and_length_beside_the_overall_ones():
    probe = ProbeConfig(name="m", shards="x.tar", group_by=["num_speakers", "duration_s"], buckets={"duration_s": [3, 5]})
    results = [
        {"task": "transcribe", "language": "en", "prediction": "a b", "reference": "a b", "groups": {"num_speakers": "1", "duration_s": "<3"}},
        {"task": "transcribe", "language": "en", "prediction": "a x", "reference": "a b", "groups": {"num_speakers": "2", "duration_s": ">=5"}},
        {"task": "action_items", "language": "en", "prediction": "- fix it", "reference": "- fix it\n- ship it",
         "groups": {"num_speakers": "2", "duration_s": ">=5"}},
    ]
    scores = {(task, language, group.get("group_by"), group.get("group"), metric): value
              for task, language, group, metric, value, _ in _score_generation(results, probe)}
    assert scores[("transcribe", "all", None, None, "wer")] == 0.25
    assert scores[("transcribe", "all", "num_speakers", "1", "wer")] == 0.0
    assert scores[("transcribe", "all", "num_speakers", "2", "wer")] == 0.5
    assert scores[("transcribe", "all", "duration_s", ">=5", "cer")] == 1 / 3
    assert not [k for k in scores if k[0] == "all" and k[2]]  # the overall rows stay the only "all" ones
    assert scores[("action_items", "all", None, None, "item_precision")] == 1.0
    assert scores[("action_items", "all", None, None, "item_recall")] == 0.5
    assert ("action_items", "all", None, None, "wer") not in scores  # item lists are scored as items, not words
    unknown = [{"task": "text2code", "language": "en", "prediction": "x", "reference": "x",
                "groups": {"num_speakers": UNKNOWN, "duration_s": UNKNOWN}}]
    grouped_tasks = {task for task, _, group, *_ in _score_generation(results + unknown, probe) if group}
    assert grouped_tasks == {"transcribe", "action_items"}  # no field anywhere in a task: no "unknown" rows for it
    rows = [{"step": 5, "probe": "m", "task": t, "language": lang, "metric": m, "value": v, "n": 1,
             **({"group_by": g, "group": gv} if g else {})} for (t, lang, g, gv, m), v in scores.items()]
    table = format_table(rows)
    assert "by num_speakers: 1 0.0 (1)  2 50.0 (1)" in table and "by duration_s: <3 0.0 (1)  >=5 50.0 (1)" in table


@pytest.mark.parametrize("override,key", [("probes.0.buckets={length: [1]}", "probes[0].buckets"),
                                          ("probes.0.buckets.duration_s=[5, 3]", "probes[0].buckets"),
                                          ("probes.0.group_by=[task]", "probes[0].group_by")])
def test_probe_grouping_errors_name_the_key(override, key, tmp_path):
    from omni_train.config import RecipeError, load_recipe

    probe = "probes=[{name: m, shards: x.tar, group_by: [duration_s], buckets: {duration_s: [3]}}]"
    with pytest.raises(RecipeError) as info:
        load_recipe("recipes/smoke.yaml", [probe, override])
    assert str(info.value).startswith(key) and "\n" not in str(info.value), str(info.value)


def test_finetune_without_a_starting_point_stops_with_one_line(tmp_path):
    result = subprocess.run([sys.executable, "launch/finetune.py", "--recipe", "recipes/meeting-finetune.yaml", "init.run=null",
                             f"output_dir={tmp_path / 'run'}"], cwd=REPO, capture_output=True, text=True, timeout=60,
                            env={**os.environ, "WANDB_MODE": "disabled"})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "init.run" in lines[0], result.stderr
    assert not (tmp_path / "run").exists()
