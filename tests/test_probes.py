"""Probes: metrics (sandboxed execution included), greedy generation, the runner on real shards, the CLI.

Shards are built with `omni-train shards build` from espeak-ng speech and text; the models are
tiny. A model trained in-process on a few text -> code samples must reproduce them through the
probe (exact = 1.0), an untrained one must fail them, so the probe can tell the two apart.

Run as a script under torchrun (see `test_run_probes_under_torchrun`), this file is also the
two-rank worker that checks the gather.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from omni_train.config import RecipeError, load_recipe, to_yaml
from omni_train.data import synth
from omni_train.data.pipeline import DataConfig, decode_sample, read_entry
from omni_train.data.packing import collate_packed
from omni_train.data.text import Tokenizer, render_prompt
from omni_train.model.backbone import BackboneConfig
from omni_train.model.omni import OmniConfig, OmniModel, build_model
from omni_train.probes import ProbeConfig, format_table, generate, generate_from_text, mean_hidden, probes_due, run_probes
from omni_train.probes.generate import generate_ids, text_messages
from omni_train.probes.metrics import (char_error_rate, check_code, exact_match, execution_matches, recall_at_k,
                                       run_code, word_error_rate)
from omni_train.probes.runner import _with_instruction, list_items
from omni_train.train.engine import Dist

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = Tokenizer.byte_level()
SINGLE = Dist(0, 1, 0, torch.device("cpu"), None)
VOICES = {"en-us": "en", "de": "de", "fr-fr": "fr"}
EXPRESSIONS = [("3", "plus", "+", "5"), ("7", "minus", "-", "2")]
TEXT_TO_CODE = [("3 plus 5", "print(3 + 5)"), ("7 minus 2", "print(7 - 2)"), ("4 times 6", "print(4 * 6)"),
                ("9 plus 1", "print(9 + 1)"), ("8 minus 3 times 2", "print(8 - 3 * 2)")]


# ------------------------------------------------------------------------------------------- corpora


def build(root: Path, entries: list[dict], media: Path | None = None, max_samples: int = 6) -> str:
    """Shards from manifest entries with the real CLI; returns their glob pattern."""
    from omni_train.cli import main

    root.mkdir(parents=True, exist_ok=True)
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries))
    out = root / "shards"
    assert main(["shards", "build", "--manifest", str(manifest), "--media-root", str(media or root), "--out", str(out),
                 "--max-samples", str(max_samples)]) == 0
    return str(out / "train-*.tar")


def speech_entries(media: Path) -> list[dict]:
    """asr and speech2code from espeak speech in three languages, text2code in two; meta.transcript on speech.
    The layout of the demo corpus: input, then an instruction part opening with a newline."""
    media.mkdir(parents=True, exist_ok=True)
    entries = []
    for voice, language in VOICES.items():
        for i, (a, word, op, b) in enumerate(EXPRESSIONS):
            name = f"{language}{i}.flac"
            synth.speech(media / name, f"{a} {word} {b}", voice=voice)
            transcript = f"{a} {op} {b}"
            meta = {"language": language, "transcript": transcript}
            entries.append({"messages": [{"role": "user", "content": "<audio>\nTranscribe."},
                                         {"role": "assistant", "content": transcript}],
                            "audios": [name], "meta": {**meta, "task": "asr"}})
            entries.append({"messages": [{"role": "user", "content": "<audio>\nWrite the code."},
                                         {"role": "assistant", "content": f"print({transcript})"}],
                            "audios": [name], "meta": {**meta, "task": "speech2code"}})
            if language != "fr":
                entries.append({"messages": [{"role": "user", "content": f"{transcript}\nWrite the code."},
                                             {"role": "assistant", "content": f"print({transcript})"}],
                                "meta": {"task": "text2code", "language": language}})
    return entries


@pytest.fixture(scope="module")
def speech_shards(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("probe_speech")
    return build(root, speech_entries(root / "media"), root / "media")


@pytest.fixture(scope="module")
def recipe():
    return load_recipe(REPO / "recipes" / "smoke.yaml", ["name=probe-test"])


@pytest.fixture(scope="module")
def omni(recipe) -> OmniModel:
    """The smoke recipe's tiny model (audio and vision encoders), untrained."""
    torch.manual_seed(0)
    return build_model(recipe.model, vocab_size=TOKENIZER.vocab_size).eval()


@pytest.fixture(scope="module")
def code_shards(tmp_path_factory) -> str:
    entries = [{"messages": [{"role": "user", "content": f"{x}\nWrite the code."}, {"role": "assistant", "content": y}],
                "meta": {"task": "text2code", "language": "en" if i % 2 else "de", "parity": "odd" if i % 2 else "even"}}
               for i, (x, y) in enumerate(TEXT_TO_CODE)]
    return build(tmp_path_factory.mktemp("probe_code"), entries)


def text_model(seed: int = 0) -> OmniModel:
    torch.manual_seed(seed)
    backbone = BackboneConfig(vocab_size=TOKENIZER.vocab_size, dim=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=128)
    return OmniModel(OmniConfig(backbone=backbone))


@pytest.fixture(scope="module")
def trained(code_shards) -> OmniModel:
    """A text-only model trained on the code shards' samples (decoded by the training pipeline) until it knows them."""
    probe = ProbeConfig(name="train", shards=code_shards)
    samples = [decode_sample(read_entry(item.url, item.entry), item.id, DataConfig(), TOKENIZER) for item in list_items(probe)]
    batch = collate_packed([[s] for s in samples], max(map(len, samples)), TOKENIZER.pad_id)
    model = text_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(80):
        loss = model(batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1, loss.item()
    return model.eval()


def by_key(rows: list[dict]) -> dict[tuple[str, str, str], dict]:
    return {(r["task"], r["language"], r["metric"]): r for r in rows}


# ------------------------------------------------------------------------------------------- metrics


def test_exact_match_strips_whitespace_only():
    assert exact_match(" print(3 + 5)\n", "print(3 + 5)")
    assert not exact_match("print(3+5)", "print(3 + 5)")


def test_execution_match_compares_output_and_fails_crashes_and_timeouts():
    start = time.perf_counter()
    matches = execution_matches(
        ["print(3+5)", "print(8)", "print(9)", "1/0", "while True: pass", "print(", "print(2)"],
        ["print(3 + 5)", "print(3 + 5)", "print(3 + 5)", "print(3 + 5)", "print(3 + 5)", "print(3 + 5)", "1/0"],
        timeout_s=1.0)
    elapsed = time.perf_counter() - start
    # same output from different code matches; a wrong value, a crash, a hang, a syntax error, a crashing reference do not
    assert matches == [True, True, False, False, False, False, False]
    assert elapsed < 8.0, elapsed  # the infinite loop was cut at its timeout
    assert run_code("while True: pass", timeout_s=0.5).error.startswith("timeout")


def test_sandbox_contains_what_the_code_does(tmp_path):
    outside = tmp_path / "outside.txt"
    # the allowlist refuses these before anything runs
    for code in ("import os", "open('x', 'w')", "().__class__.__bases__", "__import__('os')", "from subprocess import run"):
        assert check_code(code) is not None, code
        assert run_code(code).error.startswith("refused")
    assert check_code("import math\nprint(math.sqrt(16))") is None
    assert run_code("import math\nprint(math.sqrt(16))").stdout == "4.0\n"

    # without the allowlist, the sandbox and its limits still hold (tests/test_sandbox.py: the escapes)
    made = f"made_by_{tmp_path.name}"
    env = run_code(f"import os; os.mkdir({made!r}); print(sorted(set(os.environ) - {{'LC_CTYPE', 'PWD'}})); "
                   "print(os.getcwd())", check=False)
    names, cwd = env.stdout.splitlines()
    assert env.ok and names == "[]"  # empty environment (Python may coerce LC_CTYPE; bwrap sets PWD)
    assert cwd == "/tmp" and not (Path("/tmp") / made).exists()  # a private tmpfs, gone afterwards
    spawn = run_code(f"import os; print(os.system('echo leaked > {outside}'))", check=False)
    assert spawn.ok and spawn.stdout.strip() != "0" and not outside.exists()  # no process can be started
    write = run_code(f"f = open({str(outside)!r}, 'w'); f.write('leaked'); f.close()", check=False)
    assert not write.ok and (not outside.exists() or outside.stat().st_size == 0)  # no file data written
    assert not run_code("x = bytearray(4 << 30)", check=False).ok  # address-space limit
    flood = run_code("while True: print('x' * 1000)", check=False, timeout_s=5.0)
    assert not flood.ok and "output" in flood.error and len(flood.stdout) <= 64 * 1024


def test_wer_and_cer_values():
    assert word_error_rate(["(3 + 5) * 2"], ["(3 + 5) * 3"]) == pytest.approx(1 / 5)
    assert char_error_rate(["(3 + 5) * 2"], ["(3 + 5) * 3"]) == pytest.approx(1 / 11)
    # corpus level: edits over all reference words; an empty prediction deletes every word
    assert word_error_rate(["a b c", "d e"], ["a x c", ""]) == pytest.approx(3 / 5)
    assert word_error_rate(["a b"], [" a b "]) == 0.0


def test_recall_at_k_on_a_hand_made_matrix():
    similarity = torch.tensor([[0.9, 0.1, 0.0],
                               [0.8, 0.7, 0.1],
                               [0.1, 0.3, 0.2]])
    assert recall_at_k(similarity, [0, 1, 2], 1) == pytest.approx(1 / 3)
    assert recall_at_k(similarity, [0, 1, 2], 2) == pytest.approx(3 / 3)
    assert recall_at_k(similarity, [{1, 2}, {0}, {0}], 1) == pytest.approx(1 / 3)
    assert recall_at_k(similarity, [0, 1, 2], 10) == 1.0


@dataclass(kw_only=True)
class _ProbesOnly:  # the recipe key the integrator adds: probes: list[ProbeConfig]
    probes: list[ProbeConfig] = field(default_factory=list)


@pytest.mark.parametrize("override,message", [
    ("probes=[{name: a, kind: bogus, shards: x}]", "probes[0].kind must be one of generative, pipeline, retrieval"),
    ("probes=[{name: a, shards: x}, {name: b, shards: y, metrics: [bleu]}]", "probes[1].metrics must be a subset of"),
    ("probes=[{name: a, shards: x, batch_size: 0}]", "probes[0].batch_size must be >= 1"),
    ("probes=[{name: a, kind: retrieval, shards: x, k: []}]", "probes[0].k must be"),
])
def test_probe_config_errors_name_the_field(override, message):
    with pytest.raises(RecipeError) as error:
        load_recipe(None, [override], schema=_ProbesOnly)
    assert str(error.value).startswith(message), str(error.value)


def test_probes_due():
    probes = [ProbeConfig(name="a", shards="x", every=10), ProbeConfig(name="b", shards="x")]
    assert [p.name for p in probes_due(probes, 20)] == ["a"]
    assert probes_due(probes, 15) == []
    assert [p.name for p in probes_due(probes, 15, final=True)] == ["a", "b"]


def test_per_language_keeps_the_first_items_of_each_language(speech_shards):
    every = list_items(ProbeConfig(name="all", shards=speech_shards, tasks=["asr", "speech2code"]))
    capped = list_items(ProbeConfig(name="capped", shards=speech_shards, tasks=["asr", "speech2code"], per_language=3))
    languages = sorted({item.language for item in every})
    assert len(languages) == 3 and len(every) > 9
    first = [item for language in languages for item in [i for i in every if i.language == language][:3]]
    assert [item.entry.key for item in capped] == sorted((i.entry.key for i in first), key=[i.entry.key for i in every].index)
    assert [item.index for item in capped] == list(range(9))  # indexes stay contiguous: the degradations' seeds


# ---------------------------------------------------------------------------------------- generation


@pytest.mark.outcome
def test_trained_model_reproduces_its_targets_and_untrained_fails(trained, code_shards, tmp_path):
    probe = ProbeConfig(name="t2c", shards=code_shards, max_new_tokens=24, batch_size=3)
    items = list_items(probe)
    targets = [item.reference for item in items]
    media = [decode_sample(read_entry(i.url, i.entry), i.id, DataConfig(), TOKENIZER).media for i in items]
    prompts = [render_prompt(item.sample["messages"], m, TOKENIZER) for item, m in zip(items, media)]
    # one batch of prompts of different lengths: each row stops at its own <|im_end|>, exactly the target
    assert generate(trained, prompts, TOKENIZER, max_new_tokens=24) == targets
    assert generate(trained, prompts, TOKENIZER, max_new_tokens=24, stop_early=True) == targets
    assert generate_from_text(trained, TOKENIZER, [x + "\nWrite the code." for x, _ in TEXT_TO_CODE],
                              max_new_tokens=24) == [y for _, y in TEXT_TO_CODE]

    rows = by_key(run_probes(trained, [probe], data_cfg=DataConfig(), tokenizer=TOKENIZER, dist=SINGLE, step=7,
                             output_dir=tmp_path))
    assert rows[("text2code", "all", "exact")]["value"] == 1.0
    assert rows[("text2code", "all", "execution")]["value"] == 1.0
    assert rows[("all", "all", "exact")]["n"] == len(TEXT_TO_CODE)
    assert ("text2code", "de", "exact") in rows and ("text2code", "en", "exact") in rows
    assert not any(metric in ("wer", "cer") for _, _, metric in rows)  # code targets: no WER

    untrained = by_key(run_probes(text_model(seed=1), [probe], data_cfg=DataConfig(), tokenizer=TOKENIZER, dist=SINGLE,
                                  step=0))
    assert untrained[("all", "all", "exact")]["value"] == 0.0
    assert untrained[("all", "all", "execution")]["value"] == 0.0
    assert "t2c" in format_table(list(rows.values())) and "100.0" in format_table(list(rows.values()))


def test_generation_reads_row_ends_from_the_fused_rows(speech_shards, recipe):
    """A transfer mechanism (token_rate) replaces audio spans by fewer vectors: decoding continues each
    row at its fused end, not at the prompt's."""
    cfg = load_recipe(REPO / "recipes" / "smoke.yaml", ["name=probe-test", "model.transfer.kind=token_rate"])
    torch.manual_seed(0)
    model = build_model(cfg.model, vocab_size=TOKENIZER.vocab_size).eval()
    items = list_items(ProbeConfig(name="g", shards=speech_shards, tasks=["speech2code"]))[:3]
    prompts = [render_prompt(i.sample["messages"], decode_sample(read_entry(i.url, i.entry), i.id, cfg.data,
                                                                 TOKENIZER).media, TOKENIZER) for i in items]
    with torch.no_grad():
        fused = model.fuse(collate_packed([[p] for p in prompts], max(map(len, prompts)), TOKENIZER.pad_id, cfg.data.audio))
        hidden = model.backbone(inputs_embeds=fused.embeds, position_ids=fused.position_ids, document_ids=fused.document_ids)
    ends = [int((fused.document_ids[row] >= 0).nonzero().max()) for row in range(len(prompts))]
    assert all(end + 1 < len(p) for end, p in zip(ends, prompts)), (ends, [len(p) for p in prompts])  # shortened
    first = [int(model.backbone.logits(hidden[row, end]).argmax()) for row, end in enumerate(ends)]
    batched = generate_ids(model, prompts, TOKENIZER, max_new_tokens=4, audio_cfg=cfg.data.audio)
    assert [row[0] for row in batched] == first  # stop tokens are not expected from this seed's untrained model
    assert [generate_ids(model, [p], TOKENIZER, max_new_tokens=4, audio_cfg=cfg.data.audio)[0] for p in prompts] == batched


def test_rank_views_make_the_same_number_of_forward_calls(omni, speech_shards, recipe):
    """ZeRO-3's rule: every rank runs as many forwards as every other, whatever its share of items."""
    counts = []
    for rank in range(2):
        calls = []
        hook = omni.backbone.register_forward_hook(lambda *_: calls.append(1))
        try:
            for kind, tasks in (("generative", ["speech2code"]), ("pipeline", ["speech2code"]), ("retrieval", ["asr"])):
                probe = ProbeConfig(name=kind, kind=kind, shards=speech_shards, tasks=tasks, max_items=5, batch_size=2,
                                    max_new_tokens=3)
                run_probes(omni, [probe], data_cfg=recipe.data, tokenizer=TOKENIZER,
                           dist=Dist(rank, 2, rank, torch.device("cpu"), None), step=0)
        finally:
            hook.remove()
        counts.append(len(calls))
    # 5 items over 2 ranks in batches of 2: rank 0 has 3 items, rank 1 has 2 and a filler batch
    per_generation = 2 * 3  # batches x steps
    assert counts == [per_generation * 3 + 2 * 2] * 2  # generative 1 + pipeline 2 generations, retrieval 2 forwards


# ---------------------------------------------------------------------------------------- the runner


def test_generative_rows_per_task_and_language_and_batch_invariant(omni, speech_shards, recipe, tmp_path):
    probe = ProbeConfig(name="all_tasks", shards=speech_shards, max_new_tokens=6, batch_size=16)
    rows = run_probes(omni, [probe], data_cfg=recipe.data, tokenizer=TOKENIZER, dist=SINGLE, step=3, output_dir=tmp_path)
    keyed = by_key(rows)
    assert {r["metric"] for r in rows} == {"exact", "execution", "wer", "cer"}
    for language in ("en", "de", "fr"):
        assert keyed[("asr", language, "wer")]["n"] == 2
        assert keyed[("speech2code", language, "execution")]["n"] == 2
    assert keyed[("all", "all", "exact")]["n"] == 16
    assert ("text2code", "fr", "exact") not in keyed  # no French text item
    assert keyed[("all", "all", "execution")]["n"] == 10  # code tasks only
    assert keyed[("all", "all", "wer")]["n"] == 6  # transcripts only
    assert ("speech2code", "all", "wer") not in keyed and ("asr", "all", "execution") not in keyed
    assert all(0.0 <= r["value"] <= 1.0 for r in rows if r["metric"] in ("exact", "execution"))
    assert all(set(r) == {"step", "probe", "task", "language", "metric", "value", "n"} and r["step"] == 3 for r in rows)
    written = [json.loads(line) for line in (tmp_path / "probes.jsonl").read_text().splitlines()]
    assert written == rows
    examples = [json.loads(line) for line in (tmp_path / "probe_examples.jsonl").read_text().splitlines()]
    assert len(examples) == probe.num_examples and all({"id", "prediction", "reference"} <= set(e) for e in examples)

    # the same items in batches of 1 and 5: the same generations, so the same rows
    for batch_size in (1, 5):
        again = run_probes(omni, [ProbeConfig(name="all_tasks", shards=speech_shards, max_new_tokens=6,
                                              batch_size=batch_size)], data_cfg=recipe.data, tokenizer=TOKENIZER,
                           dist=SINGLE, step=3)
        assert again == rows, batch_size
    table = format_table(rows)
    assert "probe all_tasks (step 3)" in table and all(lang in table.splitlines()[1] for lang in ("de", "en", "fr"))


def test_pipeline_transcribes_then_writes_code_from_the_transcript(omni, speech_shards, recipe, tmp_path):
    probe = ProbeConfig(name="pipe", kind="pipeline", shards=speech_shards, tasks=["speech2code"], max_new_tokens=5,
                        batch_size=4, num_examples=2)
    rows = by_key(run_probes(omni, [probe], data_cfg=recipe.data, tokenizer=TOKENIZER, dist=SINGLE, step=1,
                             output_dir=tmp_path))
    assert rows[("speech2code", "all", "exact")]["n"] == 6
    assert {"exact", "execution", "transcript_wer", "transcript_cer"} == {m for _, _, m in rows}
    example = json.loads((tmp_path / "probe_examples.jsonl").read_text().splitlines()[0])
    # step 1 is a generation from the audio with the transcribe instruction; step 2 one from that transcript as text
    item = list_items(probe)[0]
    media = decode_sample(read_entry(item.url, item.entry), item.id, recipe.data, TOKENIZER).media
    messages, separator = _with_instruction(item.sample["messages"], "Transcribe.")
    assert separator == "\n" and [p["text"] for p in messages[0]["content"] if p["type"] == "text"] == ["\nTranscribe."]
    transcript = generate(omni, [render_prompt(messages, media, TOKENIZER)], TOKENIZER, max_new_tokens=5,
                          audio_cfg=recipe.data.audio)[0]
    assert example["id"] == item.id and example["transcript"] == transcript
    assert example["prediction"] == generate_from_text(omni, TOKENIZER, [transcript], instruction="\nWrite the code.",
                                                       max_new_tokens=5)[0]
    assert example["reference"] == item.reference == "print(3 + 5)"


def test_retrieval_rows_and_pooled_span(omni, speech_shards, recipe):
    probe = ProbeConfig(name="ret", kind="retrieval", shards=speech_shards, tasks=["asr"], k=[1, 100], batch_size=4)
    rows = by_key(run_probes(omni, [probe], data_cfg=recipe.data, tokenizer=TOKENIZER, dist=SINGLE, step=0))
    overall = rows[("asr", "all", "recall@1_speech2text")]
    assert overall["n"] == 6 and 0.0 <= overall["value"] <= 1.0
    assert rows[("asr", "all", "recall@1_text2speech")]["n"] == 2  # two distinct transcripts
    assert rows[("asr", "all", "recall@100_speech2text")]["value"] == 1.0
    assert rows[("asr", "de", "recall@100_text2speech")]["value"] == 1.0

    # the speech vector is the mean over exactly the audio positions (no role header, markers or turn end)
    item = list_items(probe)[0]
    audio = decode_sample(read_entry(item.url, item.entry), item.id, recipe.data, TOKENIZER).media
    prompt = render_prompt([{"role": "user", "content": [{"type": "audio", "member": "a"}]}], audio, TOKENIZER)
    head = 1 + len(TOKENIZER.encode("user\n"))  # <|im_start|>user\n
    tail = len(render_prompt(text_messages(""), [], TOKENIZER)) - head  # <|im_end|>\n<|im_start|>assistant\n
    markers = [TOKENIZER.token_id("<|audio_start|>"), TOKENIZER.token_id("<|audio_end|>")]
    pooled = mean_hidden(omni, [prompt], TOKENIZER, trims=[(head, tail)], exclude_ids=markers, audio_cfg=recipe.data.audio)
    batch = collate_packed([[prompt]], len(prompt), TOKENIZER.pad_id, recipe.data.audio)
    with torch.no_grad():
        fused = omni.fuse(batch)
        hidden = omni.backbone(inputs_embeds=fused.embeds, position_ids=fused.position_ids, document_ids=fused.document_ids)
    is_audio = batch["modality_ids"][0] == 1
    assert int(is_audio.sum()) == audio[0].num_tokens
    torch.testing.assert_close(pooled[0], hidden[0, is_audio].mean(dim=0))


# ------------------------------------------------------------------------------------------------ CLI


def test_probe_cli_on_a_checkpoint(recipe, code_shards, tmp_path, capsys):
    from safetensors.torch import save_file

    from omni_train.cli import main

    run = tmp_path / "runs" / "probe-test"
    torch.manual_seed(0)
    model = build_model(recipe.model, vocab_size=TOKENIZER.vocab_size)
    (run / "checkpoints" / "step_00000002").mkdir(parents=True)
    (run / "config.yaml").write_text(to_yaml(recipe))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(run / "checkpoints" / "step_00000002" / "model.safetensors"))

    assert main(["probe", "--run", str(run), "--probe-shards", code_shards, "--max-items", "3"]) == 0
    out = capsys.readouterr().out
    assert "probe adhoc (step 2)" in out and "exact" in out and "execution" in out
    rows = [json.loads(line) for line in (run / "probes.jsonl").read_text().splitlines()]
    assert rows and all(r["step"] == 2 and r["probe"] == "adhoc" for r in rows)
    assert by_key(rows)[("all", "all", "exact")]["n"] == 3
    assert not any("group_by" in r for r in rows)

    # --group-by scores a meta field apart in every probe, as a recipe's group_by would (here the ad-hoc probe's)
    assert main(["probe", "--run", str(run), "--probe-shards", code_shards, "--max-items", "3", "--group-by", "parity"]) == 0
    assert "by parity: even" in capsys.readouterr().out
    grouped = [json.loads(line) for line in (run / "probes.jsonl").read_text().splitlines()][len(rows):]
    counts = {r["group"]: r["n"] for r in grouped if r.get("group_by") == "parity" and r["metric"] == "exact"}
    assert counts == {"even": 2, "odd": 1}, counts  # the first three items: indices 0, 1, 2

    for argv, words in ((["--run", str(tmp_path / "nope")], "is not a run directory"),
                        (["--run", str(run), "--probe-shards", code_shards, "--group-by", "language"],
                         "--group-by: group_by names language, which is always grouped"),
                        (["--run", str(run), "--step", "5", "--probe-shards", code_shards], "no checkpoint of step 5"),
                        (["--run", str(run)], "defines no probes"),
                        (["--run", str(run), "--probe-shards", code_shards, "--probe-kind", "bogus"], "kind must be one of")):
        assert main(["probe", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], err


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize("stage", [0, 3])
def test_probe_cli_on_a_deepspeed_checkpoint(speech_shards, tmp_path, capsys, stage):
    """A real run: `launch/pretrain.py` under DeepSpeed, then the CLI consolidates its checkpoint and probes it."""
    from distributed import torchrun

    from omni_train.cli import main

    run = tmp_path / f"zero{stage}"
    torchrun("launch/pretrain.py", "--recipe", "recipes/smoke.yaml", f"name={run.name}", f"output_dir={run}",
             f"data.train.0.shards={speech_shards}", f"data.eval.0.shards={speech_shards}", "train.steps=2",
             "train.checkpoint_every=2", "train.eval_every=0", "train.engine=deepspeed", f"train.zero_stage={stage}",
             "train.precision=fp32", "train.tracker=none", "train.progress=false", timeout_s=400)
    assert main(["probe", "--run", str(run), "--probe-shards", speech_shards, "--probe-tasks", "asr,speech2code",
                 "--max-items", "4"]) == 0
    assert "probe adhoc (step 2)" in capsys.readouterr().out
    rows = [json.loads(line) for line in (run / "probes.jsonl").read_text().splitlines()]
    assert by_key(rows)[("all", "all", "exact")]["n"] == 4


# ------------------------------------------------------------------------------------------ torchrun


@pytest.mark.multiproc
def test_run_probes_under_torchrun(speech_shards, omni, recipe, tmp_path):
    """Two gloo ranks split the items, pad to equal batches and gather: the same rows as one process."""
    from distributed import torchrun

    probe = dict(name="dist", shards=speech_shards, max_new_tokens=4, batch_size=2, max_items=7)
    expected = run_probes(omni, [ProbeConfig(**probe)], data_cfg=recipe.data, tokenizer=TOKENIZER, dist=SINGLE, step=0)
    torch.save(omni.state_dict(), tmp_path / "model.pt")
    torchrun("tests/test_probes.py", str(tmp_path), json.dumps(probe), timeout_s=240)
    assert json.loads((tmp_path / "rows.json").read_text()) == expected


def _worker(out: Path, probe: dict) -> None:
    import torch.distributed as torch_dist

    torch_dist.init_process_group("gloo")
    rank, world_size = torch_dist.get_rank(), torch_dist.get_world_size()
    recipe = load_recipe(REPO / "recipes" / "smoke.yaml", ["name=probe-test"])
    model = build_model(recipe.model, vocab_size=TOKENIZER.vocab_size)
    model.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    rows = run_probes(model.eval(), [ProbeConfig(**probe)], data_cfg=recipe.data, tokenizer=TOKENIZER,
                      dist=Dist(rank, world_size, rank, torch.device("cpu"), "gloo"), step=0)
    if rank == 0:
        (out / "rows.json").write_text(json.dumps(rows))
    else:
        assert rows == []
    torch_dist.barrier()
    torch_dist.destroy_process_group()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), json.loads(sys.argv[2]))
