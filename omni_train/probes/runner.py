"""Probes: what a checkpoint can do, per task and per language, logged as the run trains.

    probes:
      - {name: speech2code, kind: generative, shards: "shards/demo/probe-*.tar", tasks: [speech2code], every: 200}
      - {name: speech2code_pipeline, kind: pipeline, shards: "shards/demo/probe-*.tar", tasks: [speech2code]}
      - {name: speech_text_retrieval, kind: retrieval, shards: "shards/demo/probe-*.tar", tasks: [asr], k: [1, 5]}

Kinds:
- generative: greedy output for the sample's own prompt (its messages minus the final assistant
  turn) against the sample's assistant text. Metrics: `exact` (stripped strings) on every item,
  `execution` (both snippets run in the sandbox and print the same; without bubblewrap a probe that
  would score it stops with one line, unless `metrics` leaves it out) on code tasks — tasks whose
  name ends in "code" — `item_precision` / `item_recall` on item-list tasks — tasks whose name
  ends in "items", such as a meeting's action items: the assistant text is one item per line,
  "- " in front, and an item counts as found when its normalized text equals a reference item's —
  and corpus `wer` / `cer` on the other tasks (transcripts, captions).
- pipeline: the two-step baseline for spoken instructions. For each item with audio, first a
  transcript from the same audio with the instruction part (the user turn's last text part)
  replaced by `transcribe_instruction`, then code from that transcript given as a text part
  followed by `code_instruction` as a second part; both instructions keep the whitespace that
  opened the sample's own instruction part (the demo corpus writes "\\nWrite the code.").
  Scored like generative against the sample's reference; `wer` / `cer` here score the
  intermediate transcripts against `meta.transcript` (rows transcript_wer / transcript_cer).
- retrieval: for each item with one audio part and a `meta.transcript`, the mean of the
  backbone's final hidden states over the user turn's audio span (without its start/end markers;
  after any transfer mechanism, so a compressed prefix is what gets pooled) and, separately,
  over the transcript given as text. The backbone's states rather than
  `encode_media(pooled=True)`: the question is whether speech and text meet inside the shared
  model, and the projector output does not go through it. Cosine similarity; recall@k
  speech -> text (gallery: the distinct transcripts) and text -> speech (any recording of it counts).
  With `layers: [i, ...]`, also `cka/layer<i>`: linear CKA between the items' pooled speech states and
  their transcripts' pooled states at the output of backbone layer i, pooled over the same positions
  in the same forward (`train.diagnostics.linear_cka`, `backbone_with_layers`).

Every probe reads all of its shards' items in one fixed order (shard order, then tar order),
keeps those of `tasks` (and those its kind can use), the first `per_language` of each language if set,
at most `max_items`, and gives rank r the items r, r + W, ..., which it batches shortest media first
(`meta.duration_s`). Every rank runs the same number of batches (a rank short of items runs a
one-token text prompt whose output is dropped), and `generate` stops once every row of a batch has
ended: the probe model holds whole parameters on every rank (`run_probes`; under ZeRO-3 a replica),
so no forward is collective and ranks may run different numbers of decoding steps (on the demo's
final probes 34 s against 72 s in one process for the same 830 rows). Results are gathered to rank
0, which computes the metrics per (task, language), per task over all languages ("all"), per
language over all tasks and over everything, appends
`{"step", "probe", "task", "language", "metric", "value", "n"}` rows to `probes.jsonl` and a few
examples to `probe_examples.jsonl`.

Grouping by other meta fields: `group_by: [num_speakers, duration_s]` adds, per task, one row per
value of each field, with `"group_by": field, "group": value` (language "all");
`buckets: {duration_s: [10, 30]}` turns a numeric field into ranges ("<10", "10-30", ">=30").
Items without the field form the group "unknown". So held-out meeting turns are scored
per speaker count and per length, by the same metrics as the whole probe:

    - {name: meeting_asr, shards: "shards/meeting/eval-*.tar", tasks: [transcribe, action_items],
       group_by: [num_speakers, duration_s], buckets: {duration_s: [10, 20]}}

Degradations (issue 14): with `degrade:` (the spec of data/degrade.py) the probe runs its items once clean and
once per condition, each item's media degraded as it is decoded (`decode_sample(transform=Degradation(...))`,
seeded by [seed, item index]), and every row of the probe gains `degradation` ("none" for the clean pass)
and `severity` (null for the clean pass):

    - {name: speech2code, shards: "shards/demo/probe-*.tar", tasks: [speech2code],
       degrade: [{op: white_noise, snr_db: [20, 10, 5]}, {op: mp3, kbps: 16}, {op: speed, factor: [0.9, 1.1]}]}

A condition runs only the items it can change (`Condition.applies_to`: an audio op on items with audio or
video, a video op on items with video); an item none of whose parts it changed (a video without an audio
track) leaves that condition's scores. Babble and overlap add other items' audio, decoded clean: the first
ones of a permutation of the probe's audio items seeded by [seed, item index, op], never the item itself nor
an item with the same audio bytes. Each condition's pass batches and pads like the clean one, so every rank
still runs the same number of batches. Examples (probe_examples.jsonl) come from the clean pass.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import re
import zlib
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import nn

from omni_train.data.audio import decode_audio
from omni_train.data.degrade import CLEAN, Condition, Degradation, parse_degrade, severity_label
from omni_train.data.format import MODALITIES, ShardFormatError, parse_sample
from omni_train.data.pipeline import TarEntry, decode_sample, expand_shards, index_tar, read_entry
from omni_train.data.text import Tokenizer, render_prompt
from omni_train.probes.generate import generate, mean_hidden, text_messages
from omni_train.probes.metrics import (char_error_rate, exact_match, execution_matches, item_matches, recall_at_k,
                                       require_sandbox, word_error_rate)
from omni_train.train.diagnostics import backbone_with_layers, linear_cka

log = logging.getLogger(__name__)

PROBE_KINDS = ("generative", "pipeline", "retrieval")
PROBE_METRICS = ("exact", "execution", "wer", "cer", "item_precision", "item_recall")
ALL = "all"
UNKNOWN = "unknown"
CODE_TASK_SUFFIX = "code"
ITEMS_TASK_SUFFIX = "items"


@dataclass(kw_only=True)
class ProbeConfig:
    name: str                           # the `probe` column of probes.jsonl
    kind: str = "generative"            # generative | pipeline | retrieval (module docstring)
    shards: str                         # local shard path, brace pattern or glob
    tasks: list[str] = field(default_factory=list)  # meta.task values to keep; empty: all
    every: int = 0                      # run every N training steps; 0: only after training and offline
    max_items: int = 0                  # at most this many items (the first in the fixed order); 0: all
    per_language: int = 0               # at most this many items of each language (the first of each); 0: no cap
    max_new_tokens: int = 64            # per generation
    batch_size: int = 8                 # prompts per forward, per rank
    metrics: list[str] = field(default_factory=lambda: list(PROBE_METRICS))  # generative / pipeline: a subset of PROBE_METRICS
    transcribe_instruction: str = "Transcribe."     # pipeline, step 1
    code_instruction: str = "Write the code."       # pipeline, step 2
    k: list[int] = field(default_factory=lambda: [1, 5])  # retrieval: recall@k for each k
    layers: list[int] = field(default_factory=list)       # retrieval: linear CKA at these backbone layers
    timeout_s: float = 2.0              # execution match: per snippet
    num_examples: int = 8               # items written to probe_examples.jsonl
    group_by: list[str] = field(default_factory=list)   # meta fields to score separately, e.g. num_speakers
    buckets: dict[str, list[float]] = field(default_factory=dict)  # numeric group_by field -> increasing range edges
    degrade: list[dict[str, Any]] = field(default_factory=list)   # data/degrade.py's spec: conditions run besides clean
    seed: int = 0                       # the degradations' draws: [seed, item index] per item

    def __post_init__(self):
        if not self.name or any(ch.isspace() for ch in self.name):
            raise ValueError(f"name must be a non-empty name without spaces, got {self.name!r}")
        if self.kind not in PROBE_KINDS:
            raise ValueError(f"kind must be one of {', '.join(PROBE_KINDS)}, got {self.kind!r}")
        if not self.shards:
            raise ValueError("shards must name at least one shard")
        bad = [m for m in self.metrics if m not in PROBE_METRICS]
        if bad:
            raise ValueError(f"metrics must be a subset of {', '.join(PROBE_METRICS)}, got {bad[0]!r}")
        for name in ("max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("every", "max_items", "per_language", "num_examples"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.k or any(k < 1 for k in self.k):
            raise ValueError(f"k must be a non-empty list of integers >= 1, got {self.k}")
        if self.layers and (self.kind != "retrieval" or any(not isinstance(i, int) or i < 0 for i in self.layers)):
            raise ValueError(f"layers (CKA of the retrieval kind) must be backbone layer indices >= 0 of a retrieval "
                             f"probe, got {self.layers} with kind {self.kind}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        reserved = [f for f in self.group_by if f in ("task", "language")]
        if reserved:
            raise ValueError(f"group_by names {reserved[0]}, which is always grouped; name other meta fields")
        for name, edges in self.buckets.items():
            if name not in self.group_by:
                raise ValueError(f"buckets names {name}, which is not in group_by {self.group_by}")
            if not edges or any(not isinstance(e, (int, float)) for e in edges) or list(edges) != sorted(set(edges)):
                raise ValueError(f"buckets of {name} must be a non-empty list of increasing numbers, got {edges}")
        self.conditions()  # a bad op or field stops here, at recipe load

    def conditions(self) -> list[Condition]:
        """The `degrade:` list's conditions, in order (ValueError naming the field)."""
        return parse_degrade(self.degrade)


def probes_due(probes: Sequence[ProbeConfig], step: int, *, final: bool = False) -> list[ProbeConfig]:
    """The probes to run at `step`: those whose `every` divides it, and all of them at the end of training."""
    return [p for p in probes if final or (p.every > 0 and step % p.every == 0)]


# ---------------------------------------------------------------------------------------------- items


@dataclass
class ProbeItem:
    index: int          # position in the probe's fixed order
    url: str
    entry: TarEntry
    sample: dict        # the parsed sample JSON (messages, meta)

    @property
    def id(self) -> str:
        return f"{self.url}:{self.entry.key}"

    @property
    def task(self) -> str:
        return str(self.sample["meta"].get("task") or "unknown")

    @property
    def language(self) -> str:
        return str(self.sample["meta"].get("language") or "unknown")

    def group(self, name: str, edges: list[float] | None) -> str:
        """The item's value of meta field `name` as a group label, in the range of `edges` when given."""
        value = self.sample["meta"].get(name)
        if value is None or isinstance(value, (dict, list)):
            return UNKNOWN
        if edges is None:
            return str(value)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return UNKNOWN
        return bucket_label(float(value), edges)

    @property
    def reference(self) -> str:
        """The final assistant turn's text."""
        message = self.sample["messages"][-1]
        if message["role"] != "assistant":
            return ""
        return "".join(part["text"] for part in message["content"] if part["type"] == "text")

    @property
    def transcript(self) -> str | None:
        value = self.sample["meta"].get("transcript")
        return value if isinstance(value, str) and value.strip() else None

    def user_media(self) -> list[str]:
        return [part["type"] for message in self.sample["messages"] if message["role"] == "user"
                for part in message["content"] if part["type"] in MODALITIES]


def bucket_label(value: float, edges: list[float]) -> str:
    """The range of `edges` that holds `value`: "<a", "a-b" (a <= value < b), ">=z"."""
    text = [f"{e:g}" for e in edges]
    if value < edges[0]:
        return f"<{text[0]}"
    for low, high, low_text, high_text in zip(edges, edges[1:], text, text[1:]):
        if low <= value < high:
            return f"{low_text}-{high_text}"
    return f">={text[-1]}"


def _media_seconds(item: ProbeItem) -> float:
    """The item's `meta.duration_s` (its media's length, as the writers record it), 0 when unknown."""
    value = item.sample["meta"].get("duration_s")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def _usable(item: ProbeItem, kind: str) -> bool:
    if kind == "generative":
        return item.sample["messages"][-1]["role"] == "assistant"
    if kind == "pipeline":
        return item.sample["messages"][-1]["role"] == "assistant" and "audio" in item.user_media()
    return item.user_media() == ["audio"] and item.transcript is not None


def list_items(probe: ProbeConfig) -> list[ProbeItem]:
    """The probe's items in their fixed order (reads only the samples' JSON), filtered and capped."""
    items: list[ProbeItem] = []
    per_language: dict[str, int] = defaultdict(int)
    for url in expand_shards(probe.shards):
        with open(url, "rb") as f:
            for entry in index_tar(url):
                if entry.error or "json" not in entry.members:
                    continue
                offset, size = entry.members["json"]
                f.seek(offset)
                try:
                    sample = parse_sample(f.read(size), f"{url}:{entry.key}")
                except ShardFormatError as e:
                    log.warning("probe %s: %s", probe.name, e)
                    continue
                item = ProbeItem(len(items), url, entry, sample)
                if (not probe.tasks or item.task in probe.tasks) and _usable(item, probe.kind):
                    if probe.per_language:
                        if per_language[item.language] == probe.per_language:
                            continue
                        per_language[item.language] += 1
                    items.append(item)
                    if probe.max_items and len(items) == probe.max_items:
                        return items
    return items


# --------------------------------------------------------------------------------------------- prompts


def _with_instruction(messages: list[dict], instruction: str) -> tuple[list[dict], str]:
    """The conversation with its last user turn's instruction (its last text part) replaced by `instruction`,
    and the whitespace that opened the old one (kept in front of the new one: the corpus's separator)."""
    messages = copy.deepcopy(messages)
    user = [m for m in messages if m["role"] == "user"][-1]
    texts = [i for i, part in enumerate(user["content"]) if part["type"] == "text"]
    old = user["content"][texts[-1]]["text"] if texts else ""
    separator = old[:len(old) - len(old.lstrip())]
    if texts:
        user["content"][texts[-1]] = {"type": "text", "text": separator + instruction}
    else:
        user["content"].append({"type": "text", "text": instruction})
    return messages, separator


MAX_CLEAN_AUDIO = 256  # other items' clean waveforms kept for babble and overlap


class _Context:
    """What every probe kind needs: model, tokenizer, data settings, the one decode of each item (degraded
    by `condition` while a degraded pass runs)."""

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, data_cfg: Any, stop_early: bool,
                 probe: ProbeConfig, items: list[ProbeItem]):
        self.model, self.tokenizer, self.data_cfg, self.stop_early = model, tokenizer, data_cfg, stop_early
        self.probe, self.items = probe, items
        self.condition: Condition | None = None
        self.skipped: list[str] = []
        self._clean_audio: dict[int, tuple[str, torch.Tensor] | None] = {}
        header = [tokenizer.im_start_id, *tokenizer.encode("user\n")]
        footer = render_prompt(text_messages(""), [], tokenizer)
        self.head_len = len(header)                   # tokens before a user turn's content
        self.tail_len = len(footer) - self.head_len   # tokens after it, to the end of the prompt

    def decode(self, item: ProbeItem):
        """The item's decoded media (the training pipeline's decoding, under the pass's degradation), or None
        when it cannot be used (or the degradation changes none of its parts)."""
        transform = None
        if self.condition is not None:
            others = self.others(item, self.condition.num_others) if self.condition.num_others else []
            if self.condition.num_others and not others:
                return None
            transform = Degradation(self.condition, [self.probe.seed, item.index], others)
        try:
            media = decode_sample(read_entry(item.url, item.entry), item.id, self.data_cfg, self.tokenizer,
                                  transform=transform).media
        except Exception as e:  # noqa: BLE001 - a bad item is reported and left out, never stops the probe
            self.skipped.append(f"{item.id}: {type(e).__name__}: {e}")
            return None
        return None if transform is not None and not transform.applied else media

    def clean_audio(self, item: ProbeItem) -> tuple[str, torch.Tensor] | None:
        """(digest of the audio's bytes, waveform) of the item's first audio part, decoded clean; None if it has none."""
        if item.index not in self._clean_audio:
            if len(self._clean_audio) >= MAX_CLEAN_AUDIO:
                self._clean_audio.pop(next(iter(self._clean_audio)))
            value = None
            member = next((part["member"] for message in item.sample["messages"] if message["role"] == "user"
                           for part in message["content"] if part["type"] == "audio"), None)
            if member is not None:
                try:
                    data = read_entry(item.url, item.entry)[member]
                    value = (hashlib.sha1(data).hexdigest(), decode_audio(data, self.data_cfg.audio, where=item.id))
                except Exception:  # noqa: BLE001 - an undecodable neighbour is only not chosen
                    value = None
            self._clean_audio[item.index] = value
        return self._clean_audio[item.index]

    def others(self, item: ProbeItem, count: int) -> list[torch.Tensor]:
        """Up to `count` other items' clean audio for babble and overlap (module docstring): the same for every
        severity of the op, on every rank."""
        own = self.clean_audio(item)
        chosen: list[tuple[str, torch.Tensor]] = []
        rng = np.random.default_rng([self.probe.seed, item.index, zlib.crc32(self.condition.op.encode())])
        for index in rng.permutation(len(self.items)).tolist():
            candidate = self.items[index]
            other = self.clean_audio(candidate) if index != item.index and "audio" in candidate.user_media() else None
            if other is not None and other[0] != (own[0] if own else None) and all(other[0] != c[0] for c in chosen):
                chosen.append(other)
                if len(chosen) == count:
                    break
        return [waveform for _, waveform in chosen]

    def filler(self):
        """A one-token text prompt: a batch for a rank that has run out of items."""
        return render_prompt(text_messages("."), [], self.tokenizer)

    def generate(self, prompts, max_new_tokens: int) -> list[str]:
        return generate(self.model, prompts, self.tokenizer, max_new_tokens=max_new_tokens,
                        audio_cfg=self.data_cfg.audio, stop_early=self.stop_early)


def _padded(prompts: list, ctx: _Context) -> list:
    """A rank with no item left in this batch still runs it (the same forwards on every rank), on a filler."""
    return prompts if prompts else [ctx.filler()]


def _run_generative(items: list[ProbeItem], probe: ProbeConfig, ctx: _Context) -> list[dict]:
    decoded = [(item, ctx.decode(item)) for item in items]
    decoded = [(item, media) for item, media in decoded if media is not None]
    prompts = [render_prompt(item.sample["messages"], media, ctx.tokenizer, where=item.id, positions=ctx.data_cfg.positions)
               for item, media in decoded]
    outputs = ctx.generate(_padded(prompts, ctx), probe.max_new_tokens)
    return [{"index": item.index, "prediction": out} for (item, _), out in zip(decoded, outputs)]


def _run_pipeline(items: list[ProbeItem], probe: ProbeConfig, ctx: _Context) -> list[dict]:
    decoded = [(item, ctx.decode(item)) for item in items]
    decoded = [(item, media) for item, media in decoded if media is not None]
    prompts, separators = [], []
    for item, media in decoded:
        messages, separator = _with_instruction(item.sample["messages"], probe.transcribe_instruction)
        prompts.append(render_prompt(messages, media, ctx.tokenizer, where=item.id, positions=ctx.data_cfg.positions))
        separators.append(separator)
    transcripts = ctx.generate(_padded(prompts, ctx), probe.max_new_tokens)[:len(decoded)]
    # step 2: the transcript as the text input, then the code instruction as its own part (text -> code's layout)
    text_prompts = [render_prompt(text_messages(transcript, separator + probe.code_instruction), [], ctx.tokenizer)
                    for transcript, separator in zip(transcripts, separators)]
    code = ctx.generate(_padded(text_prompts, ctx), probe.max_new_tokens)
    return [{"index": item.index, "prediction": out, "transcript": transcript}
            for (item, _), transcript, out in zip(decoded, transcripts, code)]


def _run_retrieval(items: list[ProbeItem], probe: ProbeConfig, ctx: _Context) -> list[dict]:
    decoded = [(item, ctx.decode(item)) for item in items]
    decoded = [(item, media) for item, media in decoded if media is not None]
    speech = [render_prompt([{"role": "user", "content": [{"type": "audio", "member": "audio"}]}],
                            [next(m for m in media if m.modality == "audio")], ctx.tokenizer,
                            positions=ctx.data_cfg.positions) for _, media in decoded]
    text = [render_prompt(text_messages(item.transcript), [], ctx.tokenizer) for item, _ in decoded]
    # the user turn's content: between the role header and the end of the turn; <|audio_start|> and
    # <|audio_end|> are left out by their embedding (a transfer mechanism may have dropped them)
    trims = [(ctx.head_len, ctx.tail_len)] * max(len(decoded), 1)
    markers = [ctx.tokenizer.token_id("<|audio_start|>"), ctx.tokenizer.token_id("<|audio_end|>")]
    with backbone_with_layers(ctx.model, probe.layers):  # (B, D * (1 + len(layers))): final, then each layer
        speech_vectors = mean_hidden(ctx.model, _padded(speech, ctx), ctx.tokenizer, audio_cfg=ctx.data_cfg.audio,
                                     trims=trims, exclude_ids=markers)
        text_vectors = mean_hidden(ctx.model, _padded(text, ctx), ctx.tokenizer, audio_cfg=ctx.data_cfg.audio,
                                   trims=trims, exclude_ids=markers)
    parts = 1 + len(probe.layers)
    speech_vectors, text_vectors = (v.unflatten(-1, (parts, -1)) for v in (speech_vectors, text_vectors))  # (B, parts, D)
    return [{"index": item.index, "speech": s[0].cpu(), "text": t[0].cpu(), "speech_layers": s[1:].cpu(),
             "text_layers": t[1:].cpu()} for (item, _), s, t in zip(decoded, speech_vectors, text_vectors)]


RUNNERS: dict[str, Callable[[list[ProbeItem], ProbeConfig, _Context], list[dict]]] = {
    "generative": _run_generative, "pipeline": _run_pipeline, "retrieval": _run_retrieval}


# --------------------------------------------------------------------------------------------- metrics


def check_probe(probe: ProbeConfig, items: list[ProbeItem] | None = None) -> None:
    """What `run_probe` stops on, also checked before a run trains: its shards (`list_items` reads them when
    `items` is not given), and the sandbox that execution match on a code task needs."""
    items = list_items(probe) if items is None else items
    if probe.kind != "retrieval" and "execution" in probe.metrics and any(_is_code_task(i.task) for i in items):
        require_sandbox()


def _is_code_task(task: str) -> bool:
    return task.endswith(CODE_TASK_SUFFIX)


def _is_items_task(task: str) -> bool:
    return task.endswith(ITEMS_TASK_SUFFIX)


Group = tuple[str, str, dict[str, str], list[dict]]  # (task, language, {"group_by": field, "group": value} or {}, results)


def _groups(results: list[dict], probe: ProbeConfig) -> list[Group]:
    """Every task x language pair, each task and language over "all", and everything; then, per task,
    one group per value of each `probe.group_by` field (module docstring)."""
    keyed: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in results:
        for task in (r["task"], ALL):
            for language in (r["language"], ALL):
                keyed[(task, language)].append(r)
    groups: list[Group] = [(task, language, {}, group) for (task, language), group in sorted(keyed.items())]
    for name in probe.group_by:  # per task only: rows of task "all" are the probe's overall numbers (plots read them)
        by_value: dict[tuple[str, str], list[dict]] = defaultdict(list)
        applies = {r["task"] for r in results if r["groups"][name] != UNKNOWN}  # tasks whose items have the field
        for r in results:
            if r["task"] in applies:
                by_value[(r["task"], r["groups"][name])].append(r)
        groups += [(task, ALL, {"group_by": name, "group": value}, group)
                   for (task, value), group in sorted(by_value.items(), key=lambda kv: (kv[0][0], _group_order(kv[0][1])))]
    return groups


def _group_order(label: str) -> tuple:
    """Numbers and ranges in numeric order ("<10" < "10-20" < ">=20"), other labels after them."""
    number = re.search(r"-?\d+(\.\d+)?", label)
    if number is None:
        return (1, 0.0, label)
    return (0, float(number.group()) - (0.5 if label.startswith("<") else 0.0), label)


Score = tuple[str, str, dict[str, str], str, float, int]  # (task, language, group, metric, value, n)


def _score_generation(results: list[dict], probe: ProbeConfig) -> list[Score]:
    """(task, language, group, metric, value, n) for generative and pipeline results (each with prediction, reference)."""
    wanted = set(probe.metrics)
    for r in results:
        r["exact"] = exact_match(r["prediction"], r["reference"])
        if _is_items_task(r["task"]):
            r["items"] = item_matches(r["prediction"], r["reference"])  # (found, predicted, reference)
    code = [r for r in results if _is_code_task(r["task"])]
    if "execution" in wanted and code:
        for r, ok in zip(code, execution_matches([r["prediction"] for r in code], [r["reference"] for r in code],
                                                 timeout_s=probe.timeout_s)):
            r["execution"] = ok
    scores = []
    for task, language, key, group in _groups(results, probe):
        n = len(group)
        if "exact" in wanted:
            scores.append((task, language, key, "exact", sum(r["exact"] for r in group) / n, n))
        executed = [r for r in group if "execution" in r]
        if executed:
            scores.append((task, language, key, "execution", sum(r["execution"] for r in executed) / len(executed), len(executed)))
        listed = [r["items"] for r in group if "items" in r]
        if listed:
            found, predicted, reference = (sum(counts) for counts in zip(*listed))
            if "item_precision" in wanted:  # no prediction at all: nothing wrong was said
                scores.append((task, language, key, "item_precision", found / predicted if predicted else 1.0, len(listed)))
            if "item_recall" in wanted:
                scores.append((task, language, key, "item_recall", found / reference if reference else 1.0, len(listed)))
        if probe.kind == "generative":
            texts = [r for r in group if not _is_code_task(r["task"]) and not _is_items_task(r["task"])]
            pairs = ([r["reference"] for r in texts], [r["prediction"] for r in texts])
        else:  # pipeline: the intermediate transcripts against the known ones
            texts = [r for r in group if r.get("reference_transcript")]
            pairs = ([r["reference_transcript"] for r in texts], [r["transcript"] for r in texts])
        prefix = "" if probe.kind == "generative" else "transcript_"
        for metric, fn in (("wer", word_error_rate), ("cer", char_error_rate)):
            if metric in wanted and texts:
                scores.append((task, language, key, prefix + metric, fn(*pairs), len(texts)))
    return scores


def _score_retrieval(results: list[dict], probe: ProbeConfig) -> list[Score]:
    scores = []
    for task, language, key, group in _groups(results, probe):
        gallery = list(dict.fromkeys(r["transcript"] for r in group))           # distinct transcripts
        column = {t: i for i, t in enumerate(gallery)}
        speech = torch.nn.functional.normalize(torch.stack([r["speech"] for r in group]).float(), dim=-1)  # (N, D)
        text_of = {r["transcript"]: r["text"] for r in group}  # the same text gives the same vector
        text = torch.nn.functional.normalize(torch.stack([text_of[t] for t in gallery]).float(), dim=-1)   # (G, D)
        similarity = speech @ text.T                                                                        # (N, G)
        targets = [column[r["transcript"]] for r in group]
        recordings = [{i for i, c in enumerate(targets) if c == g} for g in range(len(gallery))]
        for k in probe.k:
            scores.append((task, language, key, f"recall@{k}_speech2text", recall_at_k(similarity, targets, k), len(group)))
            scores.append((task, language, key, f"recall@{k}_text2speech", recall_at_k(similarity.T, recordings, k), len(gallery)))
        for j, layer in enumerate(probe.layers if len(group) > 1 else []):  # each recording against its transcript
            cka = linear_cka(torch.stack([r["speech_layers"][j] for r in group]), torch.stack([r["text_layers"][j] for r in group]))
            scores.append((task, language, key, f"cka/layer{layer}", cka, len(group)))
    return scores


def _examples(results: list[dict], probe: ProbeConfig) -> list[dict]:
    keep = ("id", "task", "language", "transcript", "prediction", "reference", "retrieved")
    return [{key: r[key] for key in keep if key in r} for r in results[:probe.num_examples]]


def _add_retrieved(results: list[dict]) -> None:
    """For the examples: the transcript each recording retrieves first among all of the probe's transcripts."""
    if not results:
        return
    gallery = list(dict.fromkeys(r["transcript"] for r in results))
    text_of = {r["transcript"]: r["text"] for r in results}
    speech = torch.nn.functional.normalize(torch.stack([r["speech"] for r in results]).float(), dim=-1)
    text = torch.nn.functional.normalize(torch.stack([text_of[t] for t in gallery]).float(), dim=-1)
    for r, best in zip(results, (speech @ text.T).argmax(dim=1).tolist()):
        r["retrieved"] = gallery[best]


# ---------------------------------------------------------------------------------------------- driver


def _gather(objects: list, dist) -> list:
    """Every rank's list, concatenated in rank order, on every rank (all_gather_object when a process group exists)."""
    if dist.backend is None or dist.world_size == 1 or not torch_dist.is_initialized():
        return list(objects)
    gathered: list = [None] * dist.world_size
    torch_dist.all_gather_object(gathered, objects)
    return [x for part in gathered for x in part]


def _run_pass(items: list[ProbeItem], probe: ProbeConfig, ctx: _Context, dist) -> list[dict]:
    """`items` (every rank's same list) split over the ranks, run in batches, gathered in the fixed order."""
    # batches of similar length: without a KV cache every generated token reruns the whole (padded) batch,
    # so one long recording would make every prompt of its batch as costly as itself. Results do not depend
    # on the batching; they are put back in the fixed order below.
    mine = sorted(items[dist.rank::dist.world_size], key=lambda item: _media_seconds(item))
    num_batches = math.ceil(math.ceil(len(items) / dist.world_size) / probe.batch_size)  # the same on every rank
    results: list[dict] = []
    for b in range(num_batches):
        results += RUNNERS[probe.kind](mine[b * probe.batch_size:(b + 1) * probe.batch_size], probe, ctx)
    return sorted(_gather(results, dist), key=lambda r: r["index"])


def run_probe(model: nn.Module, probe: ProbeConfig, *, data_cfg: Any, tokenizer: Tokenizer, dist, step: int
              ) -> tuple[list[dict], list[dict]]:
    """One probe on this rank's share of the items: (rows, examples) on rank 0, ([], []) elsewhere."""
    items = list_items(probe)
    check_probe(probe, items)  # no sandbox: stop with its one line now, on every rank, rather than after generating
    ctx = _Context(model, tokenizer, data_cfg, stop_early=True, probe=probe, items=items)  # whole parameters: no collective
    passes: list[tuple[Condition | None, list[dict]]] = [(None, _run_pass(items, probe, ctx, dist))]
    for condition in probe.conditions():
        ctx.condition = condition
        applicable = [item for item in items if condition.applies_to(item.user_media())]
        passes.append((condition, _run_pass(applicable, probe, ctx, dist)))
    ctx.condition = None
    skipped = _gather(ctx.skipped, dist)
    if not dist.is_main:
        return [], []
    if skipped:
        log.warning("probe %s: %d items could not be decoded (first: %s)", probe.name, len(skipped), skipped[0])
    rows, examples = _score_pass(passes[0][1], items, probe, step)
    if probe.degrade:
        for r in rows:
            r.update(degradation=CLEAN, severity=None)
        for condition, results in passes[1:]:
            degraded, _ = _score_pass(results, items, probe, step, quiet=True)
            rows += [{**r, "degradation": condition.op, "severity": condition.severity} for r in degraded]
    return rows, examples


def _score_pass(results: list[dict], items: list[ProbeItem], probe: ProbeConfig, step: int, *, quiet: bool = False
                ) -> tuple[list[dict], list[dict]]:
    """One pass's results (rank 0, all ranks' in the fixed order) -> (rows, examples)."""
    for r in results:
        item = items[r["index"]]
        r.update(id=item.id, task=item.task, language=item.language,
                 groups={name: item.group(name, probe.buckets.get(name)) for name in probe.group_by})
        if probe.kind == "retrieval":
            r["transcript"] = item.transcript
        else:
            r["reference"] = item.reference
            if item.transcript is not None:
                r["reference_transcript"] = item.transcript
    if not results:
        if not quiet:
            log.warning("probe %s: no usable item in %s (tasks: %s)", probe.name, probe.shards, probe.tasks or "all")
        return [], []
    if probe.kind == "retrieval":
        scores = _score_retrieval(results, probe)
        _add_retrieved(results)
    else:
        scores = _score_generation(results, probe)
    rows = [{"step": step, "probe": probe.name, "task": task, "language": language, "metric": metric,
             "value": float(value), "n": n, **group} for task, language, group, metric, value, n in scores]
    examples = [{"step": step, "probe": probe.name, **e} for e in _examples(results, probe)]
    return rows, examples


def run_probes(model: nn.Module, probes: Sequence[ProbeConfig], *, data_cfg: Any, tokenizer: Tokenizer, dist, step: int,
               output_dir: str | Path | None = None) -> list[dict]:
    """Run `probes` on `model` (the single-device module; every rank calls this) and return rank 0's rows.

    Runs under torch.no_grad() in eval mode and restores the model's mode. Rank 0 appends the rows
    to `output_dir/probes.jsonl` and examples to `output_dir/probe_examples.jsonl`; other ranks return [].

    `model` must hold whole parameters on each rank: the module of a single, DDP or ZeRO-1/2 engine.
    Under ZeRO-3 the model code reaches some weights outside their own module's forward (tied
    output embedding, position tables), which DeepSpeed only gathers inside its engine's forward;
    pass a replica loaded from the consolidated weights instead (`deepspeed.zero.GatheredParameters`
    over the module's parameters, copy its state_dict, load it into a fresh `build_model`).
    """
    was_training = model.training
    model.eval()
    rows: list[dict] = []
    examples: list[dict] = []
    try:
        with torch.no_grad():
            for probe in probes:
                probe_rows, probe_examples = run_probe(model, probe, data_cfg=data_cfg, tokenizer=tokenizer, dist=dist,
                                                       step=step)
                rows += probe_rows
                examples += probe_examples
    finally:
        model.train(was_training)
    if dist.is_main and output_dir is not None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        for name, lines in (("probes.jsonl", rows), ("probe_examples.jsonl", examples)):
            with open(out / name, "a", encoding="utf-8") as f:
                f.writelines(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
    return rows


# ----------------------------------------------------------------------------------------------- table


MAX_LANGUAGE_COLUMNS = 8


def format_table(rows: Sequence[dict]) -> str:
    """Probe rows as text: one line per (probe, task, metric) with the overall value and n, then one
    column per language (or, with many languages, the per-language values on the lines below), then
    the `group_by` rows as "field: value rate (n)" lines under their metric. Rates are percentages.
    A probe with degradations then gets one block per degradation: a line per (task, metric) over all
    languages, the clean value and one column per severity. Rows of several steps: the latest step of each probe."""
    if not rows:
        return "(no probe results)"
    latest = {}
    for r in rows:
        latest[r["probe"]] = max(latest.get(r["probe"], r["step"]), r["step"])
    rows = [r for r in rows if r["step"] == latest[r["probe"]]]
    degraded = [r for r in rows if r.get("degradation", CLEAN) != CLEAN]
    rows = [r for r in rows if r.get("degradation", CLEAN) == CLEAN]
    table: dict[tuple[str, str, str], dict[str, dict]] = defaultdict(dict)
    grouped: dict[tuple[str, str, str], dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    order: list[tuple[str, str, str]] = []
    for r in rows:
        key = (r["probe"], r["task"], r["metric"])
        if key not in table and key not in grouped:
            order.append(key)
        if "group_by" in r:
            grouped[key][r["group_by"]].append(r)
        else:
            table[key][r["language"]] = r
    lines = []
    for probe in dict.fromkeys(p for p, _, _ in order):
        keys = [k for k in order if k[0] == probe]
        tasks = {t for _, t, _ in keys}
        if len(tasks - {ALL}) > 1:  # several tasks: show "all" last; with one task, "all" repeats it
            keys.sort(key=lambda k: (k[1] == ALL, k[1]))
        else:
            keys = [k for k in keys if k[1] != ALL]
        languages = sorted({lang for k in keys for lang in table[k] if lang != ALL})
        columns = languages if len(languages) <= MAX_LANGUAGE_COLUMNS else []
        lines.append(f"probe {probe} (step {latest[probe]}), values in %")
        header = f"  {'task':<16}{'metric':<24}{'all':>7}{'n':>6}" + "".join(f"{lang:>8}" for lang in columns)
        lines.append(header)
        for key in keys:
            by_language = table[key]
            overall = by_language.get(ALL)
            cells = "".join(f"{_cell(by_language.get(lang)):>8}" for lang in columns)
            lines.append(f"  {key[1]:<16}{key[2]:<24}{_cell(overall):>7}{overall['n'] if overall else '':>6}" + cells)
            if not columns and languages:
                pairs = [f"{lang} {_cell(by_language.get(lang))}" for lang in languages]
                for start in range(0, len(pairs), 8):
                    lines.append("      " + "  ".join(pairs[start:start + 8]))
            for field_name, group_rows in grouped.get(key, {}).items():
                cells = [f"{r['group']} {_cell(r)} ({r['n']})" for r in group_rows]
                lines.append(f"      by {field_name}: " + "  ".join(cells))
        lines += _degradation_blocks([r for r in degraded if r["probe"] == probe], keys, table)
    return "\n".join(lines)


def _degradation_blocks(rows: list[dict], keys: list[tuple[str, str, str]], clean: dict) -> list[str]:
    """Per degradation: its header with the severities, then per (task, metric) of the clean table, the clean
    value over all languages and the value under each severity ("-" where no item applied)."""
    rows = [r for r in rows if r["language"] == ALL and "group_by" not in r]
    lines = []
    for degradation in dict.fromkeys(r["degradation"] for r in rows):
        mine = [r for r in rows if r["degradation"] == degradation]
        severities = list(dict.fromkeys(r["severity"] for r in mine))
        values = {(r["task"], r["metric"], r["severity"]): r for r in mine}
        labels = [severity_label(degradation, s).partition(" ")[2] for s in severities]
        width = max(9, *(len(label) + 2 for label in labels))
        header = f"  {'degradation ' + degradation:<40}{'clean':>7}"
        lines.append(header + "".join(f"{label:>{width}}" for label in labels))
        for probe, task, metric in keys:
            cells = [_cell(values.get((task, metric, s))) for s in severities]
            if any(cell != "-" for cell in cells):
                lines.append(f"  {task:<16}{metric:<24}{_cell(clean.get((probe, task, metric), {}).get(ALL)):>7}"
                             + "".join(f"{cell:>{width}}" for cell in cells))
    return lines


def _cell(row: dict | None) -> str:
    return "-" if row is None else f"{100 * row['value']:.1f}"


# ------------------------------------------------------------------------------------------------- CLI


def probe_cli(args) -> int:
    """`omni-train probe --run runs/NAME [--step S] [--probes a,b] [--group-by f,g]`: the recipe's probes on one
    checkpoint."""
    from omni_train.config import load_recipe
    from omni_train.train.engine import Dist
    from omni_train.train.runs import checkpoint_path, load_run

    run = Path(args.run)
    config = run / "config.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"{config} does not exist: '{run}' is not a run directory")
    checkpoint_path(run, args.step)  # the checkpoint exists, before any work
    cfg = load_recipe(config)
    if args.probe_shards:
        probes = [ProbeConfig(name=args.probe_name, kind=args.probe_kind, shards=args.probe_shards,
                              tasks=[t for t in (args.probe_tasks or "").split(",") if t])]
    else:
        probes = list(getattr(cfg, "probes", None) or [])
        if not probes:
            raise ValueError(f"{config} defines no probes: add a `probes:` list to the recipe or pass --probe-shards")
        if args.probes:
            names = [n for n in args.probes.split(",") if n]
            unknown = [n for n in names if n not in {p.name for p in probes}]
            if unknown:
                raise ValueError(f"--probes: no probe named {unknown[0]!r} in {config} "
                                 f"(probes: {', '.join(p.name for p in probes)})")
            probes = [p for p in probes if p.name in names]
    if args.max_items is not None:
        probes = [replace(p, max_items=args.max_items) for p in probes]
    if args.group_by is not None:  # e.g. per voice on a run whose recipe grouped otherwise; buckets kept for the fields kept
        fields = [f for f in args.group_by.split(",") if f]
        try:
            probes = [replace(p, group_by=fields, buckets={k: v for k, v in p.buckets.items() if k in fields})
                      for p in probes]
        except ValueError as e:
            raise ValueError(f"--group-by: {e}") from None

    model, cfg, tokenizer, checkpoint = load_run(run, args.step)  # a LoRA run: its base, then its adapters
    step = int(checkpoint.name.removeprefix("step_"))
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    model.to(device)
    rows = run_probes(model, probes, data_cfg=cfg.data, tokenizer=tokenizer, dist=Dist(0, 1, 0, device, None),
                      step=step, output_dir=run)
    print(format_table(rows))
    return 0
