"""Text and tokenization: special tokens, one `Tokenizer` over three backends, tokenizer training, the chat template.

Backends (same interface, picked by `Tokenizer.from_path`):
    "byte"               bytes 0-255 + SPECIAL_TOKENS; needs no training (tests, fallback)
    tok.model            sentencepiece model trained by `train_tokenizer` / `omni-train tokenizer train`
    dir/tokenizer.json   a local Hugging Face tokenizer (e.g. Qwen's); missing special tokens are added

The chat template (Qwen-style ChatML) turns a validated conversation plus its decoded media into a
`TokenizedSample` (N: the item's encoder tokens, or the positions the fusion makes of them, `sequence_tokens.py`):
    <|im_start|>user\\n<|audio_start|><|audio_pad|> x N<|audio_end|>What was said?<|im_end|>\\n
    <|im_start|>assistant\\nThree plus five.<|im_end|>\\n<|endoftext|>
Special ids are only ever inserted by the template: `Tokenizer.encode` never returns one, even for
text that spells `<|im_end|>` literally, so user text cannot inject control tokens.
A video with audio in video is laid out as Qwen2.5-Omni does (`<|video_start|><|audio_start|>`, frame
and audio pads in 2 s chunks, `<|audio_end|><|video_end|>`); with `model.positions` mrope or tmrope the
rendered sample carries its 3-D positions, computed from the rendered structure (`positions.py`).
"""

from __future__ import annotations

import argparse
import io
import json
import re
import tarfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm
import torch

from omni_train.data import positions as positions_lib
from omni_train.data.format import MODALITIES, parse_sample, split_member_name
from omni_train.data.sample import MODALITY_IDS, EncodedMedia, TokenizedSample

SPECIAL_TOKENS: tuple[str, ...] = (
    "<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    *(f"<|{modality}_{marker}|>" for modality in MODALITIES for marker in ("start", "pad", "end")),
)
# Qwen2.5-Omni's own tokens for our template's roles (its processor's placeholders): one <|vision_bos|> /
# <|vision_eos|> pair opens and closes images and videos alike, and <|endoftext|> pads.
QWEN_OMNI_TOKENS: dict[str, str] = {
    "<|pad|>": "<|endoftext|>",
    "<|audio_start|>": "<|audio_bos|>", "<|audio_pad|>": "<|AUDIO|>", "<|audio_end|>": "<|audio_eos|>",
    "<|image_start|>": "<|vision_bos|>", "<|image_pad|>": "<|IMAGE|>", "<|image_end|>": "<|vision_eos|>",
    "<|video_start|>": "<|vision_bos|>", "<|video_pad|>": "<|VIDEO|>", "<|video_end|>": "<|vision_eos|>",
}
# Qwen3-Omni's (Qwen3-VL's vision markers, its own audio ones): <|vision_start|> / <|vision_end|> around images and videos
QWEN3_OMNI_TOKENS: dict[str, str] = {
    "<|pad|>": "<|endoftext|>",
    "<|audio_start|>": "<|audio_start|>", "<|audio_pad|>": "<|audio_pad|>", "<|audio_end|>": "<|audio_end|>",
    "<|image_start|>": "<|vision_start|>", "<|image_pad|>": "<|image_pad|>", "<|image_end|>": "<|vision_end|>",
    "<|video_start|>": "<|vision_start|>", "<|video_pad|>": "<|video_pad|>", "<|video_end|>": "<|vision_end|>",
}
IGNORE_INDEX = -100  # torch.nn.functional.cross_entropy's default ignore_index
NUM_BYTES = 256
BYTE_TOKENIZER_FILE = "omni_tokenizer.json"  # what `Tokenizer.save` writes for the byte-level backend
_SPECIAL_RE = re.compile("(" + "|".join(re.escape(t) for t in sorted(SPECIAL_TOKENS, key=len, reverse=True)) + ")")
# sentencepiece skips training sentences longer than max_sentence_length bytes; texts are cut into lines
# and lines into chunks of at most this many characters (4 bytes per character at most in UTF-8).
_MAX_TRAIN_CHUNK_CHARS = 4096


# ---------------------------------------------------------------------------------------------- backends
# Each backend: `kind`, `vocab_size`, `encode(text)` (may still yield special ids; `Tokenizer.encode`
# guards that), `decode(ids, skip_special)`, `id_of(token) -> int | None`, `save(dir)`.


class _ByteBackend:
    kind = "byte"
    vocab_size = NUM_BYTES + len(SPECIAL_TOKENS)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int], skip_special: bool) -> str:
        parts: list[str] = []
        pending = bytearray()
        for i in ids:
            if 0 <= i < NUM_BYTES:
                pending.append(i)
                continue
            if not NUM_BYTES <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the byte-level vocabulary (0..{self.vocab_size - 1})")
            parts.append(pending.decode("utf-8", errors="replace"))
            pending.clear()
            if not skip_special:
                parts.append(SPECIAL_TOKENS[i - NUM_BYTES])
        parts.append(pending.decode("utf-8", errors="replace"))
        return "".join(parts)

    def id_of(self, token: str) -> int | None:
        return NUM_BYTES + SPECIAL_TOKENS.index(token) if token in SPECIAL_TOKENS else None

    def save(self, out_dir: Path) -> None:
        (out_dir / BYTE_TOKENIZER_FILE).write_text(json.dumps({"kind": "byte", "special_tokens": list(SPECIAL_TOKENS)}) + "\n")


class _SentencePieceBackend:
    kind = "sentencepiece"

    def __init__(self, processor: spm.SentencePieceProcessor):
        self.processor = processor
        self.vocab_size = processor.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self.processor.encode(text)

    def decode(self, ids: list[int], skip_special: bool) -> str:
        return self.processor.decode(ids)  # user-defined pieces decode to their own text; skipping is done by Tokenizer

    def id_of(self, token: str) -> int | None:
        i = self.processor.piece_to_id(token)
        return i if self.processor.id_to_piece(i) == token else None  # a missing piece maps to <unk>

    def save(self, out_dir: Path) -> None:
        (out_dir / "tokenizer.model").write_bytes(self.processor.serialized_model_proto())


class _HFBackend:
    kind = "hf"

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)  # includes added tokens, unlike tokenizer.vocab_size

    def encode(self, text: str) -> list[int]:
        # split_special_tokens: text spelling a special token is tokenized as text, not as the special id.
        return self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)

    def decode(self, ids: list[int], skip_special: bool) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special, clean_up_tokenization_spaces=False)

    def id_of(self, token: str) -> int | None:
        return self.tokenizer.get_vocab().get(token)

    def save(self, out_dir: Path) -> None:
        self.tokenizer.save_pretrained(str(out_dir))


# --------------------------------------------------------------------------------------------- Tokenizer


class Tokenizer:
    """Text <-> ids with the special tokens of the chat template, over a byte, sentencepiece or HF backend.

    `eos_id` is `<|im_end|>` (end of a turn: where generation stops); `endoftext_id` is `<|endoftext|>`
    (end of a document). `num_added` counts special tokens added to an HF tokenizer, so a pretrained
    backbone knows how far to resize its embeddings.
    """

    def __init__(self, backend: _ByteBackend | _SentencePieceBackend | _HFBackend, *, source: str, num_added: int = 0,
                 native: dict[str, str] | None = None):
        self._backend = backend
        self.kind = backend.kind
        self.source = source
        self.num_added = num_added
        self.vocab_size = backend.vocab_size
        self.native = dict(native or {})  # our special token -> the pretrained model's own token that plays its role
        special_ids = {token: backend.id_of(self.native.get(token, token)) for token in SPECIAL_TOKENS}
        missing = [self.native.get(token, token) for token, i in special_ids.items() if i is None]
        if missing:
            raise ValueError(f"tokenizer '{source}' lacks the special tokens {', '.join(missing)}; "
                             "train one with `omni-train tokenizer train`")
        self._special_ids: dict[str, int] = special_ids  # type: ignore[assignment]
        self._special_id_set = frozenset(self._special_ids.values())
        # only native roles may share an id (Qwen2.5-Omni opens images and videos with one <|vision_bos|>)
        assert len(self._special_id_set) == len({self.native.get(t, t) for t in SPECIAL_TOKENS}), special_ids
        self.pad_id = self._special_ids["<|pad|>"]
        self.endoftext_id = self._special_ids["<|endoftext|>"]
        self.im_start_id = self._special_ids["<|im_start|>"]
        self.im_end_id = self._special_ids["<|im_end|>"]
        self.eos_id = self.im_end_id
        self.media_ids: dict[str, tuple[int, int, int]] = {
            m: (self._special_ids[f"<|{m}_start|>"], self._special_ids[f"<|{m}_pad|>"], self._special_ids[f"<|{m}_end|>"])
            for m in MODALITIES
        }

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, source={self.source!r})"

    # -- construction

    @classmethod
    def byte_level(cls) -> Tokenizer:
        return cls(_ByteBackend(), source="byte")

    @classmethod
    def from_sentencepiece(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"sentencepiece model '{path}' does not exist")
        processor = spm.SentencePieceProcessor()
        try:
            processor.load_from_serialized_proto(path.read_bytes())
        except (RuntimeError, OSError) as e:
            raise ValueError(f"'{path}' is not a sentencepiece model ({str(e).splitlines()[0]})") from None
        return cls(_SentencePieceBackend(processor), source=str(path))

    @classmethod
    def from_pretrained_dir(cls, path: str | Path) -> Tokenizer:
        """A local HF tokenizer; the SPECIAL_TOKENS it lacks are added as special tokens.

        Qwen2/2.5 tokenizers already hold `<|endoftext|>`, `<|im_start|>` and `<|im_end|>` (kept, with
        their pretrained ids). Qwen2-VL's `<|vision_start|>` / `<|image_pad|>` / `<|video_pad|>` are not
        reused: their pretrained meaning belongs to Qwen's own vision encoder, and one shared
        `<|vision_start|>` would make image and video spans indistinguishable, so our per-modality
        markers are added as new tokens instead (`num_added` of them, plus `<|pad|>`).

        A Qwen2.5-Omni or Qwen3-Omni tokenizer (it holds every token of QWEN_OMNI_TOKENS or QWEN3_OMNI_TOKENS) is the
        exception: its
        markers were trained with the thinker's own encoders, which are ours when the model is loaded
        from `model.pretrained`, so the template uses them and nothing is added.
        """
        from transformers import AddedToken, AutoTokenizer  # heavy import, only for this backend

        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"tokenizer directory '{path}' does not exist")
        try:
            hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, TypeError) as e:
            raise ValueError(f"'{path}' holds no loadable HF tokenizer ({str(e).strip().splitlines()[0]})") from None
        vocab = hf.get_vocab()
        natives = (QWEN_OMNI_TOKENS, QWEN3_OMNI_TOKENS)
        try:  # a Qwen3-Omni checkpoint directory says so; its vocabulary may hold Qwen2.5-Omni's markers too
            if str(json.loads((path / "config.json").read_text()).get("model_type", "")).startswith("qwen3_omni"):
                natives = (QWEN3_OMNI_TOKENS,)
        except (OSError, ValueError, AttributeError):
            pass
        for native in natives:
            if all(token in vocab for token in native.values()):
                return cls(_HFBackend(hf), source=str(path), native=native)
        missing = [token for token in SPECIAL_TOKENS if token not in vocab]
        num_added = hf.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
        return cls(_HFBackend(hf), source=str(path), num_added=num_added)

    @classmethod
    def from_path(cls, path: str | Path) -> Tokenizer:
        """Dispatch on what `path` is: "byte", a `.model` file, or a directory written by an HF tokenizer or `save`."""
        if str(path) == "byte":
            return cls.byte_level()
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"tokenizer '{path}' does not exist (give 'byte', a .model file or a tokenizer directory)")
        if p.is_file() and p.suffix == ".model":
            return cls.from_sentencepiece(p)
        if p.is_dir():
            if (p / BYTE_TOKENIZER_FILE).is_file():
                kind = json.loads((p / BYTE_TOKENIZER_FILE).read_text()).get("kind")
                if kind != "byte":
                    raise ValueError(f"{p / BYTE_TOKENIZER_FILE}: unknown tokenizer kind {kind!r} (allowed: byte)")
                return cls.byte_level()
            if (p / "tokenizer.json").is_file() or (p / "tokenizer_config.json").is_file():
                return cls.from_pretrained_dir(p)
            if (p / "tokenizer.model").is_file():
                return cls.from_sentencepiece(p / "tokenizer.model")
        raise ValueError(f"tokenizer '{path}' is not 'byte', a sentencepiece .model file, or a directory with "
                         f"tokenizer.json / tokenizer_config.json / tokenizer.model / {BYTE_TOKENIZER_FILE}")

    def save(self, out_dir: str | Path) -> Path:
        """Write the tokenizer into `out_dir` so that `Tokenizer.from_path(out_dir)` loads it back."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self._backend.save(out_dir)
        return out_dir

    # -- use

    def token_id(self, special: str) -> int:
        if special not in self._special_ids:
            raise ValueError(f"'{special}' is not a special token (allowed: {', '.join(SPECIAL_TOKENS)})")
        return self._special_ids[special]

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_id_set

    def encode(self, text: str) -> list[int]:
        """Ids of plain text; never a special id (those are inserted by the chat template only)."""
        ids = self._backend.encode(text)
        if self._special_id_set.isdisjoint(ids):
            return ids
        # The text spells a special token (sentencepiece matches user-defined symbols anywhere in its input):
        # encode every literal occurrence in two halves, so it becomes ordinary pieces.
        ids = []
        for segment in _SPECIAL_RE.split(text):
            for piece in ([segment[:1], segment[1:]] if segment in self._special_ids else [segment]):
                piece_ids = self._backend.encode(piece)
                if not self._special_id_set.isdisjoint(piece_ids):
                    # only reachable through a normalizer that maps look-alikes onto a special token's text
                    piece_ids = [i for char in piece for i in self._backend.encode(char)]
                ids.extend(piece_ids)
        assert self._special_id_set.isdisjoint(ids), text
        return ids

    def decode(self, ids: Iterable[int] | torch.Tensor, skip_special: bool = True) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else [int(i) for i in ids]
        if skip_special:
            ids = [i for i in ids if i not in self._special_id_set]
        return self._backend.decode(ids, skip_special)


# ---------------------------------------------------------------------------------------------- training


def train_tokenizer(texts: Iterable[str], vocab_size: int, out: str | Path) -> Path:
    """Train a multilingual byte-fallback BPE sentencepiece model on `texts` and write it to `out` (.model).

    Lossless by construction (identity normalization, whitespace and newlines kept, no dummy prefix), so
    `decode(encode(x)) == x` for every string and the template's concatenated encodings read back exactly;
    digits are split one per piece so numbers tokenize per digit. `hard_vocab_limit=False` lets a small
    corpus end with fewer pieces than asked. Deterministic: the same texts give the same file.
    """
    out = Path(out)
    if out.suffix != ".model":
        raise ValueError(f"tokenizer output '{out}' must end in .model")
    sentences = [chunk for text in texts for chunk in _training_chunks(text)]
    if not sentences:
        raise ValueError(f"no text to train the tokenizer '{out}' on")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size, model_type="bpe",
            byte_fallback=True, character_coverage=0.9995, user_defined_symbols=list(SPECIAL_TOKENS),
            hard_vocab_limit=False, split_digits=True, normalization_rule_name="identity",
            remove_extra_whitespaces=False, add_dummy_prefix=False, allow_whitespace_only_pieces=True,
            unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,  # the chat template's tokens replace sentencepiece's own
            max_sentence_length=4 * _MAX_TRAIN_CHUNK_CHARS, input_sentence_size=0, minloglevel=2,
        )
    except RuntimeError as e:
        needed = re.search(r"smaller than required_chars\. \d+ vs (\d+)", str(e))
        if needed:
            raise ValueError(f"vocab size {vocab_size} is too small for this corpus: its characters and the "
                             f"special and byte pieces need at least {needed.group(1)}") from None
        raise
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(model.getvalue())
    return out


def _training_chunks(text: str) -> list[str]:
    return [line[i:i + _MAX_TRAIN_CHUNK_CHARS] for line in text.splitlines(keepends=True)
            for i in range(0, len(line), _MAX_TRAIN_CHUNK_CHARS)]


def shard_texts(paths: Sequence[Path]) -> tuple[list[str], int]:
    """All text parts of all messages of the samples in `paths`, each message's role header (`user\n`, as the
    chat template writes it, so that it becomes one piece), and the number of samples read."""
    texts: list[str] = []
    num_samples = 0
    for path in paths:
        try:
            tar = tarfile.open(path)
        except tarfile.TarError as e:
            raise ValueError(f"shard '{path}' is not a readable tar ({e})") from None
        with tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, suffix = split_member_name(member.name)
                if suffix != "json":
                    continue
                sample = parse_sample(tar.extractfile(member).read(), where=f"{path}:{key}")
                num_samples += 1
                for message in sample["messages"]:
                    texts.append(message["role"] + "\n")
                    texts += [part["text"] for part in message["content"] if part["type"] == "text"]
    return texts, num_samples


def train_tokenizer_cli(args: argparse.Namespace) -> int:
    """`omni-train tokenizer train --shards PATTERN --vocab-size N --out FILE`."""
    from omni_train.data.pipeline import expand_shards  # pipeline imports this module

    paths = [Path(url) for url in expand_shards(args.shards)]
    texts, num_samples = shard_texts(paths)
    out = train_tokenizer(texts, args.vocab_size, args.out)
    vocab_size = Tokenizer.from_sentencepiece(out).vocab_size
    print(f"tokenizer: {num_samples} samples from {len(paths)} shards, {sum(map(len, texts))} characters -> "
          f"vocab size {vocab_size} (asked {args.vocab_size}) -> {out}")
    return 0


# ------------------------------------------------------------------------------------------ chat template


def render_chat(messages: list[dict], media: Sequence[EncodedMedia], tokenizer: Tokenizer, *, where: str = "",
                positions: str = "1d") -> TokenizedSample:
    """One training conversation -> ids with labels on assistant content, `<|im_end|>` and a final `<|endoftext|>`.

    Media parts become `<|m_start|>` + `<|m_pad|>` x num_seq_tokens + `<|m_end|>` (the encoder's tokens, or
    the positions the fusion makes of them: `EncodedMedia.seq_tokens`); the pads carry the media's modality
    id and timestamps. A video with its audio track (`EncodedMedia.audio`, audio in video)
    becomes `<|video_start|><|audio_start|>`, its video and audio pads interleaved in 2 s chunks, then
    `<|audio_end|><|video_end|>` (Qwen2.5-Omni's layout, `positions.audio_in_video_chunks`). Media spans
    never carry loss, not even in an assistant turn: their positions are replaced by encoder features, so
    there is no token to predict. `positions` (model.positions) other than 1d stores the document's 3-D
    positions with the sample (`positions.document_positions`).
    """
    _check_media(messages, media, where)
    if not any(m["role"] == "assistant" and _has_content(m) for m in messages):
        raise ValueError(f"{_prefix(where)}no assistant turn with content: nothing to train on")
    seq = _Sequence(positions)
    for message in messages:
        _render_message(seq, message, media, tokenizer)
    seq.add([tokenizer.endoftext_id], train=messages[-1]["role"] == "assistant")
    return seq.build(media, positions)


def render_prompt(messages: list[dict], media: Sequence[EncodedMedia], tokenizer: Tokenizer, *, where: str = "",
                  positions: str = "1d") -> TokenizedSample:
    """The conversation up to the final assistant turn, ending with `<|im_start|>assistant\\n` (for generation).

    `media` are those of all of `messages` (as the pipeline decodes a sample); a final assistant turn and
    any media in it are dropped. No labels. `positions` as in `render_chat`.
    """
    _check_media(messages, media, where)
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
        media = media[:sum(1 for m in messages for p in m["content"] if p["type"] in MODALITIES)]
    seq = _Sequence(positions)
    for message in messages:
        _render_message(seq, message, media, tokenizer, train=False)
    seq.add([tokenizer.im_start_id, *tokenizer.encode("assistant\n")], train=False)
    return seq.build(media, positions)


class _Sequence:
    """Chunks of ids, labels, modality ids and timestamps, concatenated once (a long meeting has 10^5 pads),
    and the document's structure as `positions` spans (text runs, media grids), from which its positions follow."""

    def __init__(self, positions: str = "1d"):
        self.positions = positions  # model.positions: the audio-in-video layout follows it (positions.audio_in_video_runs)
        self.ids: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        self.modality_ids: list[torch.Tensor] = []
        self.timestamps_s: list[torch.Tensor] = []
        self.spans: list[positions_lib.Span | EncodedMedia] = []
        self.next_media = 0

    def add(self, ids: list[int] | torch.Tensor, *, train: bool) -> None:
        """Append text tokens (the template's own, markers, message text): one text run of `spans`."""
        ids = self._append(ids, train=train)
        if self.spans and isinstance(self.spans[-1], positions_lib.TextSpan):
            self.spans[-1] = positions_lib.TextSpan(self.spans[-1].num_tokens + len(ids))
        else:
            self.spans.append(positions_lib.TextSpan(len(ids)))

    def add_media(self, item: EncodedMedia, tokenizer: Tokenizer) -> None:
        """A media item's markers and pads, or for a video with its audio track the interleaved layout."""
        if item.audio is not None:
            self._add_audio_in_video(item, tokenizer)
            return
        start_id, pad_id, end_id = tokenizer.media_ids[item.modality]
        self.add([start_id], train=False)
        # num_seq_tokens: the encoder's tokens, or as many as the fusion turns them into (sequence_tokens.py)
        self._append(torch.full((item.num_seq_tokens,), pad_id), modality=item.modality,
                     timestamps_s=item.placeholder_timestamps_s)
        # an image or video becomes its VisionSpan in `build`, only where positions need its grid (shard inspection
        # renders stand-ins that have no pixels); 3-D positions come with encoder tokens only (refused at recipe load)
        self.spans.append(positions_lib.AudioSpan(item.num_seq_tokens) if item.modality == "audio" else item)
        self.add([end_id], train=False)

    def _add_audio_in_video(self, video: EncodedMedia, tokenizer: Tokenizer) -> None:
        audio = video.audio
        video_start, video_pad, video_end = tokenizer.media_ids["video"]
        audio_start, audio_pad, audio_end = tokenizer.media_ids["audio"]
        span = positions_lib.AudioInVideoSpan(video=positions_lib.vision_span(video), num_audio_tokens=audio.num_tokens)
        self._append([video_start, audio_start])
        for name, first, end in positions_lib.audio_in_video_runs(span, self.positions):
            item, pad_id = (video, video_pad) if name == "video" else (audio, audio_pad)
            self._append(torch.full((end - first,), pad_id), modality=item.modality,
                         timestamps_s=item.token_timestamps_s[first:end])
        self._append([audio_end, video_end])
        self.spans.append(span)  # markers included (tmrope: the two start and the two end markers share a position each)

    def _append(self, ids: list[int] | torch.Tensor, *, train: bool = False, modality: str = "text",
                timestamps_s: torch.Tensor | None = None) -> torch.Tensor:
        ids = torch.as_tensor(ids, dtype=torch.int64)
        self.ids.append(ids)
        self.labels.append(ids if train else torch.full_like(ids, IGNORE_INDEX))
        self.modality_ids.append(torch.full(ids.shape, MODALITY_IDS[modality], dtype=torch.int8))
        self.timestamps_s.append(timestamps_s.to(torch.float32) if timestamps_s is not None else torch.full(ids.shape, -1.0))
        return ids

    def build(self, media: Sequence[EncodedMedia], positions: str = "1d") -> TokenizedSample:
        assert self.next_media == len(media), (self.next_media, len(media))
        sample = TokenizedSample(input_ids=torch.cat(self.ids), labels=torch.cat(self.labels),
                                 modality_ids=torch.cat(self.modality_ids), timestamps_s=torch.cat(self.timestamps_s),
                                 media=list(media))
        if positions != "1d":
            if any(item.seq_tokens is not None for item in media):
                raise ValueError(f"model.positions={positions} places media by their encoder tokens; a fusion or "
                                 "projector that changes their number (data.sequence_tokens) needs model.positions 1d")
            spans = [positions_lib.vision_span(s) if isinstance(s, EncodedMedia) else s for s in self.spans]
            sample.position_ids = positions_lib.document_positions(spans, positions)
        assert sample.position_ids is None or sample.position_ids.shape == (3, len(sample)), \
            (None if sample.position_ids is None else sample.position_ids.shape, len(sample))
        return sample


def _render_message(seq: _Sequence, message: dict, media: Sequence[EncodedMedia], tokenizer: Tokenizer, *, train: bool = True) -> None:
    trained = train and message["role"] == "assistant"
    seq.add([tokenizer.im_start_id, *tokenizer.encode(message["role"] + "\n")], train=False)
    for part in message["content"]:
        if part["type"] == "text":
            seq.add(tokenizer.encode(part["text"]), train=trained)
            continue
        seq.add_media(media[seq.next_media], tokenizer)
        seq.next_media += 1
    seq.add([tokenizer.im_end_id], train=trained)
    seq.add(tokenizer.encode("\n"), train=False)


def _check_media(messages: list[dict], media: Sequence[EncodedMedia], where: str) -> None:
    parts = [part for message in messages for part in message["content"] if part["type"] in MODALITIES]
    if len(parts) != len(media):
        raise ValueError(f"{_prefix(where)}the conversation has {len(parts)} media parts but {len(media)} decoded media were given")
    for i, (part, item) in enumerate(zip(parts, media)):
        if part["type"] != item.modality:
            raise ValueError(f"{_prefix(where)}media part {i} ('{part.get('member', '')}') is {part['type']} "
                             f"but decoded media {i} is {item.modality}")


def _has_content(message: dict) -> bool:
    return any(part["type"] != "text" or part["text"] for part in message["content"])


def _prefix(where: str) -> str:
    return f"{where}: " if where else ""
