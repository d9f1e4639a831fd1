"""Probes on a degradation axis (issue 14): a probe with `degrade:` runs its items clean and under each condition
through the pipeline's transform hook, on real espeak shards and the smoke recipe's tiny model; `format_table`,
`omni-train compare` and `omni-train plot` keep the degraded rows apart from the clean ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from omni_train.cli import main
from omni_train.config import load_recipe
from omni_train.data.degrade import Degradation, parse_degrade
from omni_train.data.pipeline import decode_sample, read_entry
from omni_train.model.omni import build_model
from omni_train.probes import ProbeConfig, format_table, run_probes
from omni_train.probes.compare import aggregate, format_markdown
from omni_train.probes.runner import _Context, list_items
from omni_train.train.engine import Dist
from test_probes import TOKENIZER, build, speech_entries

REPO = Path(__file__).resolve().parents[1]
SINGLE = Dist(0, 1, 0, torch.device("cpu"), None)
DEGRADE = [{"op": "white_noise", "snr_db": [20, 5]}, {"op": "babble", "snr_db": 5, "talkers": 2},
           {"op": "overlap", "level_db": -10}, {"op": "mp3"}, {"op": "frame_drop", "rate": 0.5}]
AUDIO_CONDITIONS = [("white_noise", 20), ("white_noise", 5), ("babble", 5), ("overlap", -10), ("mp3", 16)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("robustness")
    return build(root, speech_entries(root / "media"), root / "media")


@pytest.fixture(scope="module")
def recipe():
    return load_recipe(REPO / "recipes" / "smoke.yaml", ["name=robustness-test"])


@pytest.fixture(scope="module")
def model(recipe):
    torch.manual_seed(0)
    return build_model(recipe.model, vocab_size=TOKENIZER.vocab_size).eval()


def probe(shards: str, **kwargs) -> ProbeConfig:
    return ProbeConfig(name="asr", shards=shards, tasks=["asr"], max_new_tokens=2, batch_size=6, **kwargs)


def without_degradation(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in ("degradation", "severity")}


def test_a_degraded_probe_writes_rows_per_condition_and_clean_rows_as_without(model, recipe, shards, tmp_path):
    rows = run_probes(model, [probe(shards, degrade=DEGRADE)], data_cfg=recipe.data, tokenizer=TOKENIZER, dist=SINGLE,
                      step=4, output_dir=tmp_path)
    plain = run_probes(model, [probe(shards)], data_cfg=recipe.data, tokenizer=TOKENIZER, dist=SINGLE, step=4)
    assert all(set(r) == {"step", "probe", "task", "language", "metric", "value", "n"} for r in plain)  # unchanged
    clean = [r for r in rows if r["degradation"] == "none"]
    assert all(r["severity"] is None for r in clean) and [without_degradation(r) for r in clean] == plain
    conditions = list(dict.fromkeys((r["degradation"], r["severity"]) for r in rows if r["degradation"] != "none"))
    assert conditions == AUDIO_CONDITIONS  # frame_drop changes no part of a speech item: no rows
    for condition in conditions:  # each condition scores every item, in the clean rows' layout
        mine = [r for r in rows if (r["degradation"], r["severity"]) == condition]
        assert [(r["task"], r["language"], r["metric"], r["n"]) for r in mine] == \
               [(r["task"], r["language"], r["metric"], r["n"]) for r in plain], condition
    assert [json.loads(line) for line in (tmp_path / "probes.jsonl").read_text().splitlines()] == rows
    table = format_table(rows)
    assert table.startswith(format_table(plain))  # the clean table first, as it was
    block = table.splitlines()[len(format_table(plain).splitlines()):]
    assert block[0].split() == ["degradation", "white_noise", "clean", "snr_db=20", "snr_db=5"]
    assert [line.split()[0] for line in block if line.split()[0] == "degradation"] == ["degradation"] * 4


def test_degradation_reaches_the_features_the_same_on_every_run_and_rank(model, recipe, shards):
    """Through the runner's decode: the item's audio features change under a condition, identically on a second
    context (another run, or a rank that decodes other items first)."""
    config = probe(shards, degrade=DEGRADE)
    items = list_items(config)
    babble, white = [c for c in config.conditions() if c.op in ("babble", "white_noise")][-2:]
    features = []
    for order in (items, items[::-1]):
        ctx = _Context(model, TOKENIZER, recipe.data, stop_early=True, probe=config, items=items)
        for item in order:  # decode others first on the second pass: what an item gets depends on it alone
            ctx.condition = white
            ctx.decode(item)
        ctx.condition = babble
        features.append(ctx.decode(items[1])[0].tensors["mel"])
    clean = decode_sample(read_entry(items[1].url, items[1].entry), items[1].id, recipe.data, TOKENIZER).media[0]
    assert torch.equal(features[0], features[1]) and not torch.equal(features[0], clean.tensors["mel"])
    transform = Degradation(parse_degrade([{"op": "white_noise", "snr_db": 10}])[0], [0, 1])
    decode_sample(read_entry(items[1].url, items[1].entry), items[1].id, recipe.data, TOKENIZER, transform=transform)
    assert transform.applied


def test_babble_never_adds_the_item_or_its_own_recording(model, recipe, shards):
    """asr and speech2code items share recordings: 12 items, 6 recordings; each item's 5 talkers are the 5 others."""
    config = ProbeConfig(name="b", shards=shards, tasks=["asr", "speech2code"], degrade=[{"op": "babble", "snr_db": 0,
                                                                                          "talkers": 5}])
    items = list_items(config)
    ctx = _Context(model, TOKENIZER, recipe.data, stop_early=True, probe=config, items=items)
    ctx.condition = config.conditions()[0]
    recordings = {item.index: ctx.clean_audio(item)[1] for item in items}
    assert len(items) == 12 and len({tuple(w.tolist()) for w in recordings.values()}) == 6
    for item in items:
        others = ctx.others(item, 5)
        same = [[o.shape == w.shape and torch.equal(o, w) for w in [recordings[item.index], *others]] for o in others]
        assert len(others) == 5 and not any(row[0] for row in same), item.index  # never its own recording
        assert all(sum(row[1:]) == 1 for row in same)  # five different ones


def test_every_rank_runs_as_many_batches_with_degradations(model, recipe, shards):
    """ZeRO-3's rule holds per condition: 5 items over 2 ranks, batches of 2, the same forwards on both ranks."""
    counts = []
    for rank in range(2):
        calls = []
        hook = model.backbone.register_forward_hook(lambda *_: calls.append(1))
        try:
            config = ProbeConfig(name="r", shards=shards, tasks=["asr"], max_items=5, batch_size=2, max_new_tokens=2,
                                 degrade=[{"op": "clip", "level": [0.3]}, {"op": "jpeg", "quality": 10}])
            run_probes(model, [config], data_cfg=recipe.data, tokenizer=TOKENIZER,
                       dist=Dist(rank, 2, rank, torch.device("cpu"), None), step=0)
        finally:
            hook.remove()
        counts.append(len(calls))
    assert counts == [2 * 2 * 2] * 2  # (clean + clip; jpeg applies to none) x 2 batches x 2 generated tokens


# ------------------------------------------------------------------------------------------ compare and plot


def rows_of(step: int, clean: float, degraded: dict[tuple[str, float], float]) -> list[dict]:
    base = {"step": step, "probe": "asr", "task": "all", "metric": "exact", "n": 6}
    rows = [{**base, "language": language, "value": clean, "degradation": "none", "severity": None}
            for language in ("all", "de")]
    rows += [{**base, "language": "all", "value": value, "degradation": op, "severity": severity}
             for (op, severity), value in degraded.items()]
    return rows


def write_run(root: Path, name: str, seed: int, augment: bool, rows: list[dict]) -> Path:
    run = root / f"{name}-s{seed}"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"name": f"{name}-s{seed}", "output_dir": str(run), "seed": seed,
                                                     "train": {"steps": 20}, "augment": augment}))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 5.0 / s}) + "\n" for s in (10, 20)))
    (run / "probes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def test_compare_and_plot_keep_degraded_rows_apart(tmp_path, capsys):
    noise = {("white_noise", 20): 0.5, ("white_noise", 5): 0.2, ("mp3", 16): 0.4}
    plain = write_run(tmp_path / "single", "plain", 0, False, rows_of(20, 0.6, noise))
    augmented = write_run(tmp_path / "single", "augmented", 0, True,
                          rows_of(20, 0.7, {k: v + 0.2 for k, v in noise.items()}))
    assert main(["compare", str(plain), str(augmented)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines.index("asr exact (all tasks), degraded") == 2  # no headline probe: the block follows the steps
    assert [line.split()[:2] for line in lines[3:]] == [["clean", "60.0"], ["white_noise", "snr_db=20"],
                                                        ["white_noise", "snr_db=5"], ["mp3", "kbps=16"]]
    assert lines[5].split()[2:] == ["20.0", "(n=6)", "40.0", "(n=6)"]

    assert main(["plot", str(plain), str(augmented)]) == 0
    written = capsys.readouterr().out.split()
    assert written[-2:] == ["wrote", str(plain / "plots" / "robustness.png")]
    with Image.open(plain / "plots" / "robustness.png") as image:
        assert image.size[0] > 800 and len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 100

    # over seeds: each degraded pass a row of its own, the clean rows under the plain probe name
    for name, bonus in (("plain", 0.0), ("aug", 0.2)):
        for seed in range(2):
            write_run(tmp_path / "sweep", name, seed, name == "aug",
                      rows_of(20, 0.6 + 0.1 * seed + bonus, {k: v + bonus for k, v in noise.items()}))
    agg = aggregate([tmp_path / "sweep"], with_parameters=False)
    keys = [row["key"] for row in agg.rows]
    assert keys == [("train", "", "", "loss"), ("asr", "all", "all", "exact"), ("asr", "all", "de", "exact"),
                    ("asr · white_noise snr_db=20", "all", "all", "exact"), ("asr · white_noise snr_db=5", "all", "all", "exact"),
                    ("asr · mp3 kbps=16", "all", "all", "exact")]
    assert agg.conditions["asr · white_noise snr_db=5"] == ("asr", "white_noise", 5)
    assert agg.variants == ["aug", "plain"]  # the folder's order: aug is the baseline
    assert agg.rows[4]["diffs"]["plain"].mean == pytest.approx(-0.2) and agg.rows[4]["stats"]["plain"].mean == pytest.approx(0.2)
    assert "| asr · mp3 kbps=16 | all | all | exact |" in format_markdown(agg)
    assert main(["plot", str(tmp_path / "sweep")]) == 0
    assert capsys.readouterr().out.split()[-1] == str(tmp_path / "sweep" / "plots" / "robustness.png")


@pytest.mark.slow  # ~30 s of torchrun start-up on 2 cores: over this file's budget, in `make test-all`
@pytest.mark.multiproc
def test_two_ranks_degrade_and_score_as_one_process(model, recipe, shards, tmp_path):
    """Two gloo ranks (test_probes.py's worker) split the items of every pass, draw the same noise and babble for
    each item as one process does, and gather: the same rows."""
    from distributed import torchrun

    config = dict(name="dist", shards=shards, tasks=["asr"], max_new_tokens=2, batch_size=2, max_items=5, seed=3,
                  degrade=[{"op": "white_noise", "snr_db": [0]}, {"op": "babble", "snr_db": 0, "talkers": 2}])
    expected = run_probes(model, [ProbeConfig(**config)], data_cfg=recipe.data, tokenizer=TOKENIZER, dist=SINGLE, step=0)
    assert {r["degradation"] for r in expected} == {"none", "white_noise", "babble"}
    torch.save(model.state_dict(), tmp_path / "model.pt")
    torchrun("tests/test_probes.py", str(tmp_path), json.dumps(config), timeout_s=240)
    assert json.loads((tmp_path / "rows.json").read_text()) == expected
