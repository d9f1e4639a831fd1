"""`omni-train shards demo`: the embedded corpus builds, decodes, is deterministic and keeps its probe honest.

The `tiny` corpus is built through the real CLI (espeak-ng, ffmpeg and PIL on this machine) and read
back with tarfile, the training decoders and `inspect_shards`; the split rules are also checked on
the full `demo` plan, which is drawn without rendering any media, and so is what the unseen-voice
probe items may change: nothing but the probe split they are added to.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
import subprocess
import tarfile
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from omni_train.cli import main
from omni_train.data import demo
from omni_train.data.format import media_parts, split_member_name
from omni_train.data.text import Tokenizer

TRAINED = {"asr", "text2code", "text_copy", "image2text", "video2steps", "video2code"}
PROBED = {"speech2code", "image2code"}
CODE = re.compile(r"print\(([\d +\-*()]+)\)")


def build(out: Path, *args: str) -> int:
    return main(["shards", "demo", "--out", str(out), "--size", "tiny", *args])


def read_shard(path: Path) -> dict[str, dict]:
    """key -> {"json": parsed sample, member suffix: bytes}."""
    samples: dict[str, dict] = defaultdict(dict)
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, suffix = split_member_name(member.name)
            data = tar.extractfile(member).read()
            samples[key][suffix] = json.loads(data) if suffix == "json" else data
    return dict(samples)


def split_samples(out: Path) -> dict[str, list[dict]]:
    return {split: [s for shard in sorted(out.glob(f"{split}-*.tar")) for s in read_shard(shard).values()]
            for split in ("train", "eval", "probe")}


def strings(value) -> list[str]:
    """Every string inside a JSON value (keys included)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in [k, *strings(v)]]
    if isinstance(value, list):
        return [s for v in value for s in strings(v)]
    return []


def texts(sample: dict, role: str) -> list[str]:
    return [p["text"] for m in sample["messages"] if m["role"] == role for p in m["content"] if p["type"] == "text"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "tiny"
    assert build(out) == 0
    return out


def test_tiny_layout_tasks_and_inspect(tiny):
    from omni_train.data.inspect import inspect_shards

    corpus = json.loads((tiny / "corpus.json").read_text())
    assert sorted(p.name for p in tiny.iterdir()) == sorted(
        ["corpus.json", "eval-000000.tar", "probe-000000.tar", "tokenizer.model", *corpus["splits"]["train"]["shards"]])
    assert corpus["splits"]["train"]["shards"] == ["train-000000.tar", "train-000001.tar"]
    assert corpus["size"] == "tiny" and corpus["seed"] == 0 and re.fullmatch(r"[0-9a-f]{64}", corpus["sha256"])
    expected_tasks = {"train": TRAINED, "eval": TRAINED, "probe": PROBED}
    total = 0
    for split, info in corpus["splits"].items():
        pattern = " ".join(str(tiny / name) for name in info["shards"])
        report = inspect_shards(pattern, decode=True)
        assert report["unusable"] == [] and report["refused_shards"] == []
        assert report["samples"] == info["num_samples"] and report["tasks"] == info["tasks"]
        assert set(report["tasks"]) == expected_tasks[split]
        assert report["languages"] == info["languages"]
        assert report["audio_items"] > 0
        total += report["samples"]
    assert total == corpus["num_samples"] and 35 <= corpus["splits"]["train"]["num_samples"] <= 60
    # every tiny voice speaks in every split that has speech
    for split in ("train", "eval", "probe"):
        assert set(demo.TINY_VOICES) <= set(corpus["splits"][split]["languages"])


def test_media_decode_and_targets(tiny):
    import torch
    from PIL import Image
    from torchcodec.decoders import VideoDecoder

    from omni_train.data.audio import AudioConfig, decode_audio

    instructions = defaultdict(set)
    seen = set()
    for split, samples in split_samples(tiny).items():
        for sample in samples:
            data, meta = sample["json"], sample["json"]["meta"]
            task, expr = meta["task"], meta["expression"]
            seen.add(task)
            assert meta["source"] == "demo" and meta["language"]
            # the user turn: the input, then the task family's one instruction string
            user = data["messages"][0]["content"]
            assert len(user) == 2 and user[1]["type"] == "text"
            instructions[demo.TASKS[task][1]].add(user[1]["text"])
            assert user[0]["type"] == demo.TASKS[task][0]
            (target,) = texts(data, "assistant")
            if task in ("asr", "text_copy", "image2text"):
                assert target == expr
            elif task == "video2steps":
                assert target == ", ".join(f"press {k}" for k in expr.replace(" ", "") + "=")
            else:
                assert CODE.fullmatch(target) and target == f"print({expr})"
                assert eval(CODE.fullmatch(target).group(1)) == eval(expr)  # noqa: S307 - digits and + - * ( )
            if task == "text_copy":
                assert user[0]["text"] == expr
            if user[0]["type"] in ("audio", "image"):
                assert meta["transcript"] == expr
            for part in media_parts(data):
                payload = sample[part["member"]]
                if part["type"] == "audio":
                    waveform = decode_audio(payload, AudioConfig())
                    assert abs(waveform.numel() / 16000 - meta["duration_s"]) < 0.01
                    assert waveform.abs().max() > 0.05 and 0.3 < meta["duration_s"] < 10
                    assert "(" not in expr  # speech never speaks parentheses
                elif part["type"] == "image":
                    with Image.open(io.BytesIO(payload)) as image:
                        assert image.size == (meta["width"], meta["height"]) and min(image.size) >= 30
                else:
                    decoder = VideoDecoder(payload)
                    assert decoder.metadata.num_frames == meta["num_frames"]
                    frames = decoder.get_frames_at(indices=[0, meta["num_frames"] - 1]).data
                    assert frames.shape == (2, 3, demo.VIDEO_SIZE[1], demo.VIDEO_SIZE[0]) and frames.dtype == torch.uint8
                    # one press every ~0.5 s, plus the idle calculator before and after
                    assert 0.39 < meta["video_duration_s"] / (meta["num_presses"] + 2) < 0.61
    assert seen == TRAINED | PROBED
    assert instructions == {family: {"\n" + text} for family, text in demo.INSTRUCTIONS.items()}


def test_spoken_text_matches_voice_words(tiny):
    for samples in split_samples(tiny).values():
        for sample in samples:
            meta = sample["json"]["meta"]
            if "voice" in meta:
                plus, minus, times = demo.SPEECH_OPERATOR_WORDS[meta["voice"]]
                expected = meta["expression"].replace("+", plus).replace("-", minus).replace("*", times)
                assert meta["utterance"] == expected and meta["language"] == meta["voice"]


def test_same_seed_is_byte_identical_other_seed_differs(tiny, tmp_path, capsys):
    again, other = tmp_path / "again", tmp_path / "other"
    assert build(again, "--workers", "1") == 0
    assert build(other, "--seed", "1") == 0
    corpus = json.loads((tiny / "corpus.json").read_text())
    assert json.loads((again / "corpus.json").read_text())["sha256"] == corpus["sha256"]
    for path in tiny.glob("*.tar"):
        assert (again / path.name).read_bytes() == path.read_bytes(), path.name
    assert (again / "corpus.json").read_bytes() == (tiny / "corpus.json").read_bytes()
    assert (again / "tokenizer.model").read_bytes() == (tiny / "tokenizer.model").read_bytes()
    tokenizer = Tokenizer.from_path(tiny / "tokenizer.model")  # trained on the train split: the template is in pieces
    assert len(tokenizer.encode("assistant\n")) <= 2 and tokenizer.decode(tokenizer.encode("print(3 + 5)")) == "print(3 + 5)"
    assert json.loads((other / "corpus.json").read_text())["sha256"] != corpus["sha256"]
    assert (other / "train-000000.tar").read_bytes() != (tiny / "train-000000.tar").read_bytes()
    capsys.readouterr()
    # a rebuild of the same corpus into the same place is a no-op
    assert build(again) == 0 and "already up to date" in capsys.readouterr().out


def test_refuses_to_replace_foreign_shards(tmp_path, capsys):
    (tmp_path / "train-000000.tar").write_bytes(b"not ours")
    assert build(tmp_path) == 2
    err = capsys.readouterr().err
    assert "train-000000.tar already exists" in err and "--force" in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "train-000000.tar").read_bytes() == b"not ours"


def test_no_probe_expression_or_utterance_in_train_or_eval(tiny):
    samples = split_samples(tiny)
    probe_strings = set()
    for sample in samples["probe"]:
        meta = sample["json"]["meta"]
        probe_strings.add(meta["expression"])
        if "utterance" in meta:
            probe_strings.add(meta["utterance"])
    patterns = [re.compile(rf"(?<![\w]){re.escape(s)}(?![\w])") for s in probe_strings]
    for split in ("train", "eval"):
        for sample in samples[split]:
            for text in strings(sample["json"]):
                assert not any(p.search(text) for p in patterns), (split, text)
            has_audio = any(part["type"] == "audio" for part in media_parts(sample["json"]))
            if has_audio:  # audio is never paired with code in training or eval
                assert sample["json"]["meta"]["task"] == "asr"
                assert not any(t.lstrip().startswith("print(") for t in texts(sample["json"], "assistant"))


def test_demo_plan_keeps_probe_expressions_out_of_training():
    """The split rule on the whole `demo` plan (thousands of expressions; nothing rendered)."""
    plan = demo.plan_corpus(demo.demo_config("demo", seed=3))
    probe = {s.expression.text for s in plan["probe"]}
    spoken_probe = {s.job.text for s in plan["probe"] if isinstance(s.job, demo.SpeechJob)}
    assert len(probe) > 250 and {s.task for s in plan["probe"]} == PROBED  # spoken digits: ~45 two-number probe expressions
    pattern = re.compile(r"(?<![\w])(" + "|".join(map(re.escape, sorted(probe | spoken_probe, key=len, reverse=True)))
                         + r")(?![\w])")
    trained = {s.expression.text for split in ("train", "eval") for s in plan[split]}
    assert trained and not trained & probe
    for split in ("train", "eval"):
        for s in plan[split]:
            assert s.task in TRAINED
            shown = [s.expression.text, s.expression.code, s.input_text or "", s.meta.get("utterance", ""),
                     s.meta.get("text", "")]
            assert not any(pattern.search(t) for t in shown), shown
    asr = [s for s in plan["train"] if s.task == "asr"]
    assert len(asr) == 3000 and {s.language for s in asr} == set(demo.CALIBRATION_VOICES)
    assert {s.task for s in plan["train"]} == TRAINED and not any("(" in s.expression.text for s in asr)
    # the demo speaks digits (as the calibration did); written inputs keep numbers up to 99
    speech = [s for split in plan.values() for s in split if isinstance(s.job, demo.SpeechJob)]
    assert max(n for s in speech for n in s.expression.numbers) == 9
    assert max(n for s in plan["train"] if s.task == "text2code" for n in s.expression.numbers) > 9
    full = demo.plan_corpus(demo.demo_config("full", per_voice=4))
    assert max(n for s in full["train"] if s.task == "asr" for n in s.expression.numbers) > 9
    copy = sum(s.task == "text_copy" for s in plan["train"]) / sum(s.task in ("text2code", "text_copy") for s in plan["train"])
    assert 0.27 < copy < 0.33


def speech_plan_digest(plan: dict[str, list]) -> str:
    """SHA-256 over the train and eval utterances' jobs and meta (`voice_seen` and the label `variant: base`, both
    added after the golden digests were recorded, aside), ordered by file name.

    Speech is drawn first from the planner's RNG, so this part of the plan does not depend on the
    machine's fonts."""
    def recorded(key: str, value) -> bool:
        return key != "voice_seen" and (key, value) != ("variant", demo.BASE_VARIANT)

    rows = sorted([s.job.name, s.job.voice, s.job.text, s.job.rate_wpm, s.job.pitch, s.job.snr_db, s.job.noise,
                   s.job.noise_seed, s.expression.text, sorted([k, v] for k, v in s.meta.items() if recorded(k, v))]
                  for split in ("train", "eval") for s in plan[split] if isinstance(s.job, demo.SpeechJob))
    return hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode()).hexdigest()


@pytest.mark.parametrize("size", ["tiny", "demo"])
def test_unseen_voices_only_add_probe_items(size):
    """Unseen-voice items are probe-only, paired with seen probe items, and change nothing else in the plan:
    the demo's measured runs trained on exactly these train and eval utterances (their voices aside: the demo
    says some in train_variants, test_train_variants_change_only_the_voices_of_trained_speech)."""
    cfg = dataclasses.replace(demo.demo_config(size), train_variants=())
    plan = demo.plan_corpus(cfg, fonts=[])
    without = demo.plan_corpus(dataclasses.replace(cfg, probe_unseen_per_voice=0), fonts=[])
    assert plan["train"] == without["train"] and plan["eval"] == without["eval"]
    num_seen = len(without["probe"])
    assert plan["probe"][:num_seen] == without["probe"]
    # recorded from the plan before unseen voices existed (commit 4c06630)
    golden = {"tiny": "246a02d2bbd0f810dd3ec97cf76970b31b2b559f467a266a0e82f14f6406dd59",
              "demo": "9643edea4514227617f557a509cdda76c0ff514d6d3f9b5d434f96ee08d250c0"}
    assert speech_plan_digest(plan) == golden[size]

    speech = {split: [s for s in samples if isinstance(s.job, demo.SpeechJob)] for split, samples in plan.items()}
    for split in ("train", "eval"):
        assert {s.meta["voice_seen"] for s in speech[split]} == {"seen"}
        assert not any("+" in s.job.voice for s in speech[split])  # no variant is ever trained
        assert {s.meta["variant"] for s in speech[split]} == {demo.BASE_VARIANT}  # each voice's own settings
    unseen = plan["probe"][num_seen:]
    assert {s.meta["voice_seen"] for s in speech["probe"][:len(speech["probe"]) - len(unseen)]} == {"seen"}
    assert len(unseen) == cfg.probe_unseen_per_voice * len(cfg.voices) == {"tiny": 8, "demo": 80}[size]
    seen_by_utterance = {(s.meta["voice"], s.job.text, s.job.noise_seed): s for s in speech["probe"][:-len(unseen)]}
    for s in unseen:
        assert s.task == "speech2code" and s.meta["voice_seen"] == "unseen" and s.meta["variant"] in cfg.unseen_variants
        assert s.job.voice == demo.espeak_voice(s.language, s.meta["variant"]) and s.meta["voice"] == s.language
        twin = seen_by_utterance[(s.meta["voice"], s.job.text, s.job.noise_seed)]  # the same item in a trained voice
        assert dataclasses.replace(s.job, name=twin.job.name, voice=twin.job.voice) == twin.job
        assert {k: v for k, v in s.meta.items() if k not in ("voice_seen", "variant")} == \
            {k: v for k, v in twin.meta.items() if k not in ("voice_seen", "variant")}
        assert twin.meta["variant"] == demo.BASE_VARIANT
        assert s.expression == twin.expression and s.job.name not in {x.job.name for x in speech["probe"] if x is not s}
    per_voice = Counter(s.language for s in unseen)
    assert per_voice == {voice: cfg.probe_unseen_per_voice for voice in cfg.voices}
    variants = Counter(s.meta["variant"] for s in unseen)
    assert set(variants) == set(cfg.unseen_variants) and max(variants.values()) - min(variants.values()) <= 1


def test_unseen_voice_items_decode(tiny):
    from omni_train.data.audio import AudioConfig, decode_audio

    samples = split_samples(tiny)
    corpus = json.loads((tiny / "corpus.json").read_text())
    for split, items in samples.items():
        speech = [s for s in items if s["json"]["meta"].get("voice")]
        assert speech and all(s["json"]["meta"]["voice_seen"] in ("seen", "unseen") for s in speech)
        assert corpus["splits"][split]["voice_seen"] == dict(Counter(s["json"]["meta"]["voice_seen"] for s in speech))
    assert corpus["splits"]["probe"]["voice_seen"] == {"seen": 8, "unseen": 8}
    seen = {(s["json"]["meta"]["voice"], s["json"]["meta"]["utterance"]): s for s in samples["probe"]
            if s["json"]["meta"].get("voice_seen") == "seen"}
    for sample in samples["probe"]:
        meta = sample["json"]["meta"]
        if meta.get("voice_seen") != "unseen":
            continue
        assert meta["variant"] in demo.UNSEEN_VARIANTS and meta["language"] == meta["voice"]
        (part,) = media_parts(sample["json"])
        waveform = decode_audio(sample[part["member"]], AudioConfig())
        assert abs(waveform.numel() / 16000 - meta["duration_s"]) < 0.01 and waveform.abs().max() > 0.05
        twin = seen[(meta["voice"], meta["utterance"])]
        assert sample["json"]["messages"] == twin["json"]["messages"]  # the same question, in another voice
        assert sample[part["member"]] != twin[part["member"]]


def test_expression_forms_and_number_words():
    expr = demo.Expression(numbers=(3, 5, 2), ops=("+", "*"), parens="left")
    assert expr.text == "(3 + 5) * 2" and expr.code == "print((3 + 5) * 2)" and expr.value == 16
    assert expr.steps == "press (, press 3, press +, press 5, press ), press *, press 2, press ="
    assert expr.words("de") == "(drei plus fünf) mal zwei"
    assert expr.words("zh") == "(三 加 五) 乘 二"
    assert demo.Expression(numbers=(37, 5), ops=("-",)).spoken("de") == "37 minus 5"
    words = {("de", 37): "siebenunddreißig", ("de", 21): "einundzwanzig", ("de", 1): "eins", ("de", 60): "sechzig",
             ("en", 45): "forty-five", ("en", 13): "thirteen", ("es", 22): "veintidós", ("es", 31): "treinta y uno",
             ("fr", 71): "soixante et onze", ("fr", 80): "quatre-vingts", ("fr", 97): "quatre-vingt-dix-sept",
             ("fr", 21): "vingt et un", ("fr", 17): "dix-sept", ("ru", 40): "сорок", ("ru", 23): "двадцать три",
             ("zh", 10): "十", ("zh", 23): "二十三", ("ja", 0): "零", ("ko", 23): "이십삼", ("ar", 21): "واحد وعشرون",
             ("ar", 13): "ثلاثة عشر", ("tr", 11): "on bir", ("sw", 23): "ishirini na tatu", ("el", 24): "είκοσι τέσσερα",
             ("hi", 7): "सात", ("hi", 42): "४२"}
    for (lang, n), expected in words.items():
        assert demo.TEXT_LANGUAGES[lang].number(n) == expected
    scripts = {"Latin": "de", "Cyrillic": "ru", "Arabic": "ar", "Devanagari": "hi", "Han": "zh"}
    assert len(demo.TEXT_LANGUAGES) >= 10 and set(scripts.values()) <= set(demo.TEXT_LANGUAGES)
    # splits come from the text alone: a probe expression stays a probe expression for every seed
    assert demo.expression_split(expr) == demo.expression_split(demo.Expression(numbers=(3, 5, 2), ops=("+", "*"), parens="left"))


def test_full_voice_list_exists_in_espeak():
    listed = subprocess.run(["espeak-ng", "--voices"], capture_output=True, text=True, check=True).stdout
    installed = {line.split()[1] for line in listed.splitlines()[1:] if line.strip()}
    assert len(demo.ALL_VOICES) >= 74
    assert set(demo.ALL_VOICES) <= installed, sorted(set(demo.ALL_VOICES) - installed)
    assert set(demo.CALIBRATION_VOICES) | set(demo.TINY_VOICES) <= set(demo.ALL_VOICES)
    assert demo.demo_config("full").voices == demo.ALL_VOICES
    # the unseen voices are installed variants, and change the speaker, not the phonemes
    listed = subprocess.run(["espeak-ng", "--voices=variant"], capture_output=True, text=True, check=True).stdout
    variants = {word.removeprefix("!v/") for line in listed.splitlines() for word in line.split() if word.startswith("!v/")}
    assert set(demo.UNSEEN_VARIANTS) <= variants, sorted(set(demo.UNSEEN_VARIANTS) - variants)
    def espeak(*args: str) -> bytes:
        return subprocess.run(["espeak-ng", *args], capture_output=True, check=True).stdout

    for i, voice in enumerate(demo.ALL_VOICES):  # espeak-ng ignores a variant it cannot attach: the audio must change
        spoken = demo.Expression(numbers=(3, 5, 2), ops=("+", "*")).spoken(voice)
        variant = demo.UNSEEN_VARIANTS[i % len(demo.UNSEEN_VARIANTS)]
        assert espeak("-v", demo.espeak_voice(voice, variant), "--stdout", spoken) != espeak("-v", voice, "--stdout", spoken), voice
        if voice in demo.CALIBRATION_VOICES + demo.TINY_VOICES:
            phonemes = {espeak("-q", "-x", "-v", demo.espeak_voice(voice, v), spoken) for v in (None, *demo.UNSEEN_VARIANTS)}
            assert len(phonemes) == 1, (voice, phonemes)
    # every voice reads the digits and operator words itself: espeak-ng marks a switch to another
    # language's rules with "(en)" and the like, and says nothing for text it cannot read
    for voice in demo.ALL_VOICES:
        spoken = demo.Expression(numbers=(37, 5, 2), ops=("+", "-")).spoken(voice) + " " + demo.SPEECH_OPERATOR_WORDS[voice][2]
        phonemes = subprocess.run(["espeak-ng", "-q", "-x", "-v", voice, spoken], capture_output=True, text=True).stdout
        assert phonemes.strip() and not re.search(r"\([a-z]{2,3}\)", phonemes), (voice, spoken, phonemes)


def test_config_errors_name_the_field(tmp_path, capsys):
    with pytest.raises(ValueError, match="--size must be one of tiny, demo, full"):
        demo.demo_config("huge")
    with pytest.raises(ValueError, match="unknown: \\['xx'\\]"):
        demo.DemoCorpusConfig(size="tiny", voices=("xx",), asr_per_voice=1, eval_asr_per_voice=1,
                              probe_speech_per_voice=1, probe_unseen_per_voice=0, num_text2code=1, num_eval_text2code=1,
                              num_image2text=0, num_eval_image2text=0, num_probe_image2code=0, num_videos=0,
                              num_eval_videos=0, num_train_shards=1)
    tiny = demo.demo_config("tiny")
    with pytest.raises(ValueError, match="probe_unseen_per_voice \\(3\\).*at most probe_speech_per_voice \\(2\\)"):
        dataclasses.replace(tiny, probe_unseen_per_voice=3)
    with pytest.raises(ValueError, match="unseen_variants must be a non-empty list of espeak-ng variant names"):
        dataclasses.replace(tiny, unseen_variants=("de+f2",))
    assert demo.demo_config("demo", per_voice=30).probe_unseen_per_voice == 1
    # espeak-ng would render the plain voice for a variant it lacks: the build refuses before rendering
    with pytest.raises(ValueError, match=r"unseen_variants \['nosuchvariant'\] are not voice variants"):
        demo.build_demo_corpus(tmp_path, cfg=dataclasses.replace(tiny, unseen_variants=("f2", "nosuchvariant")), log=None)
    assert not any(tmp_path.iterdir())
    with pytest.raises(ValueError, match="--per-voice must be at least 1"):
        demo.demo_config("tiny", per_voice=0)
    # --train-variants reaches the config, checked against espeak-ng before anything is rendered
    assert main(["shards", "demo", "--out", str(tmp_path / "v"), "--size", "tiny", "--train-variants", "f1,nosuch"]) == 2
    assert "train_variants ['nosuch'] are not voice variants" in capsys.readouterr().err
    assert not (tmp_path / "v").exists()


@pytest.mark.slow
def test_full_corpus_covers_every_voice(tmp_path):
    from omni_train.data.inspect import inspect_shards

    out = tmp_path / "full"
    assert main(["shards", "demo", "--out", str(out), "--size", "full", "--per-voice", "1"]) == 0
    corpus = json.loads((out / "corpus.json").read_text())
    train = " ".join(str(out / name) for name in corpus["splits"]["train"]["shards"])
    report = inspect_shards(train)
    assert report["unusable"] == []
    speech_languages = {lang for lang in report["languages"] if lang in demo.SPEECH_OPERATOR_WORDS}
    assert len(speech_languages) >= 74 and speech_languages == set(demo.ALL_VOICES)
    probe = inspect_shards(" ".join(str(out / name) for name in corpus["splits"]["probe"]["shards"]), decode=True)
    assert probe["unusable"] == [] and len(probe["languages"]) >= 74


def test_train_variants_change_only_the_voices_of_trained_speech():
    """train_variants say a share of the train and eval utterances in other espeak-ng variants; the words, prosody,
    noise and every probe item stay what they were, and no unseen variant is ever trained."""
    cfg = dataclasses.replace(demo.demo_config("demo"), train_variants=())
    varied_cfg = dataclasses.replace(cfg, train_variants=("f1", "m3", "klatt2"), train_variant_fraction=0.5)
    plain, varied = demo.plan_corpus(cfg, fonts=[]), demo.plan_corpus(varied_cfg, fonts=[])
    assert varied["probe"] == plain["probe"]
    said = Counter()
    for split in ("train", "eval"):
        assert len(varied[split]) == len(plain[split])
        for a, b in zip(plain[split], varied[split]):
            if not isinstance(a.job, demo.SpeechJob) or b.meta["variant"] == demo.BASE_VARIANT:
                assert a == b
                continue
            said[b.meta["variant"]] += 1
            assert b.job.voice == demo.espeak_voice(a.language, b.meta["variant"])
            assert dataclasses.replace(b.job, voice=a.job.voice) == a.job
            assert {k: v for k, v in b.meta.items() if k != "variant"} == {k: v for k, v in a.meta.items() if k != "variant"}
            assert a.meta["variant"] == demo.BASE_VARIANT
    speech = sum(isinstance(s.job, demo.SpeechJob) for split in ("train", "eval") for s in plain[split])
    assert set(said) == {"f1", "m3", "klatt2"} and abs(sum(said.values()) / speech - 0.5) < 0.05, (said, speech)
    with pytest.raises(ValueError, match=r"train_variants \['f2'\] are also unseen_variants"):
        dataclasses.replace(cfg, train_variants=("f1", "f2"))
    with pytest.raises(ValueError, match="train_variant_fraction must lie in \\[0, 1\\]"):
        dataclasses.replace(cfg, train_variants=("f1",), train_variant_fraction=1.5)
    demo_plan = demo.plan_corpus(demo.demo_config("demo"), fonts=[])  # the demo's own: no unseen variant trained
    trained = {s.meta["variant"] for split in ("train", "eval") for s in demo_plan[split] if isinstance(s.job, demo.SpeechJob)}
    assert trained == {demo.BASE_VARIANT, *demo.DEMO_TRAIN_VARIANTS} and not trained & set(demo.UNSEEN_VARIANTS)


def test_synthetic_speakers_are_espeak_variants_drawn_from_the_seed(tmp_path):
    """synthetic_speakers: variant files drawn from the seed (the same text for the same seed and index), said by
    espeak-ng through a data directory of its own (the audio differs from the plain voice's, which espeak-ng would
    give for a variant it does not find), drawn like train_variants for train and eval speech only."""
    assert demo.synthetic_speaker(3, 0) == demo.synthetic_speaker(3, 0) != demo.synthetic_speaker(3, 1)
    for i in range(40):
        lines = demo.synthetic_speaker(i, 0).splitlines()
        scales = [int(line.split()[2]) for line in lines if line.startswith("formant ")]
        assert len(scales) == 9 and 83 <= min(scales) and max(scales) <= 135, lines
    cfg = dataclasses.replace(demo.demo_config("tiny"), synthetic_speakers=3, train_variants=("f1",),
                              train_variant_fraction=1.0)
    plan = demo.plan_corpus(cfg, fonts=[])
    assert plan["probe"] == demo.plan_corpus(dataclasses.replace(cfg, synthetic_speakers=0), fonts=[])["probe"]
    said = Counter(s.meta["variant"] for split in ("train", "eval") for s in plan[split] if isinstance(s.job, demo.SpeechJob))
    assert set(said) <= {"f1", *demo.synthetic_speaker_names(3)} and len(set(said) - {"f1"}) >= 2, said

    with pytest.raises(ValueError, match="synthetic_speakers must be at most 150"):
        dataclasses.replace(cfg, synthetic_speakers=151)
    path = demo.espeak_data_with_speakers(tmp_path / "espeak", 3, cfg.seed, ["f1", *cfg.unseen_variants])
    listed = subprocess.run(["espeak-ng", "--path", str(path), "--voices=variant"], capture_output=True, text=True,
                            check=True).stdout
    assert all(f"!v/{name}" in listed for name in ("f1", "f2", *demo.synthetic_speaker_names(3))), listed
    job = next(s.job for s in plan["train"] if s.meta.get("variant", "").startswith(demo.SYNTHETIC_PREFIX))
    plain = dataclasses.replace(job, name="plain.wav", voice=job.voice.split("+")[0])
    demo.render_speech(job, tmp_path, path)
    demo.render_speech(plain, tmp_path, path)
    assert (tmp_path / job.name).read_bytes() != (tmp_path / plain.name).read_bytes()
    again = dataclasses.replace(job, name="again.wav")
    demo.render_speech(again, tmp_path, path)
    assert (tmp_path / again.name).read_bytes() == (tmp_path / job.name).read_bytes()


def test_klatt_speakers_are_far_from_the_probe_klatt(tmp_path):
    """KLATT_SPEAKERS speak through the Klatt synthesizer in the corpus's own espeak-ng data directory, and each lies
    from the probe's klatt about as far as the unseen f2 lies from the trained f5, its nearest trained voice (DTW over
    log-mel frames, the mean over three sentences, over the distance between two sentences of one voice; at least
    0.9 of it, measured 0.92-1.17): klatt stays a voice never heard in training. A Klatt speaker with the probe voice's
    own vocal tract and pitch, the case this guards against, lies about four times closer."""
    import numpy as np

    from omni_train.data.audio import AudioConfig, decode_audio, log_mel

    assert set(demo.KLATT_SPEAKERS) <= set(demo.DEMO_TRAIN_VARIANTS) and not set(demo.KLATT_SPEAKERS) & set(demo.UNSEEN_VARIANTS)
    path = demo.espeak_data_with_speakers(tmp_path / "espeak", 0, 0, [*demo.KLATT_SPEAKERS, "f5", *demo.UNSEEN_VARIANTS])
    near = "omni-klatt-near"  # the probe klatt's tract and pitch range (espeak-ng's defaults) through another Klatt source
    (path / "espeak-ng-data" / "voices" / "!v" / near).write_text(
        "language variant\nname omni-klatt-near\nklatt 2\npitch 82 118\n", encoding="utf-8")
    cfg = AudioConfig(num_mel_bins=128)

    def frames(voice: str, text: str = "3 plus 5 mal 2") -> np.ndarray:
        job = demo.SpeechJob(name=f"{voice.replace('+', '_')}-{len(text)}.wav", voice=voice, text=text, rate_wpm=150,
                             pitch=50, snr_db=None, noise="white", noise_seed=0)
        demo.render_speech(job, tmp_path, path)
        return log_mel(decode_audio(tmp_path / job.name, cfg), cfg).T.numpy().astype(np.float64)

    def dtw(a: np.ndarray, b: np.ndarray) -> float:
        cost = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).mean(-1))
        total = np.full((len(a) + 1, len(b) + 1), np.inf)
        total[0, 0] = 0.0
        for i in range(1, len(a) + 1):
            for j in range(1, len(b) + 1):
                total[i, j] = cost[i - 1, j - 1] + min(total[i - 1, j], total[i, j - 1], total[i - 1, j - 1])
        return float(total[-1, -1] / (len(a) + len(b)))

    sentences = ("3 plus 5 mal 2", "7 minus 4 plus 9", "12 mal 6 minus 1")
    mel = {name: [frames(f"de+{name}", text) for text in sentences] for name in [*demo.KLATT_SPEAKERS, near, "f5", "f2", "klatt"]}
    within = dtw(frames("de", sentences[0]), frames("de", sentences[1]))

    def distance(a: str, b: str) -> float:
        return float(np.mean([dtw(x, y) for x, y in zip(mel[a], mel[b])])) / within

    f2_to_trained = distance("f2", "f5")
    to_klatt = {name: distance(name, "klatt") for name in [*demo.KLATT_SPEAKERS, near]}
    print(f"f2 to f5 {f2_to_trained:.2f}; to the probe's klatt:", {k: round(v, 2) for k, v in to_klatt.items()})
    assert all(to_klatt[name] >= 0.9 * f2_to_trained for name in demo.KLATT_SPEAKERS), (f2_to_trained, to_klatt)
    assert to_klatt[near] < 0.4 * f2_to_trained, (f2_to_trained, to_klatt)
