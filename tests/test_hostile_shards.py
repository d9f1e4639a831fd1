"""Hostile and broken shards: bounded memory, duplicate keys, one-line errors, `pipe:` commands.

Oversized members (a 200 MB `.flac` or `.json`, a 200 MB tar "long name" header) are written as sparse
files, so the shards cost no disk; a child process iterates the pipeline over them and reports its peak
RSS, which is compared with the same child over a shard without the big member.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from omni_train.cli import main
from omni_train.data import synth
from omni_train.data.format import DataError, ShardFormatError, parse_sample
from omni_train.data.pipeline import DataConfig, DataPipeline, OverlongSample, SourceConfig, expand_shards

MB = 2**20
# What a skipped 200 MB member may add to the decoding process's peak RSS: it must not be read at all.
MEMBER_RSS_BOUND_MB = 50


def write_tar(path: Path, members: list[tuple[str, bytes | int]]) -> Path:
    """A tar of (name, data) members; an int is that many bytes of zeros left as a hole (a sparse file).
    A member named `././@LongLink` is a GNU long-name header (its data is the next member's name)."""
    with open(path, "wb") as f:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = data if isinstance(data, int) else len(data)
            if name == "././@LongLink":
                info.type = tarfile.GNUTYPE_LONGNAME
            f.write(info.tobuf(tarfile.GNU_FORMAT))
            if isinstance(data, int):
                f.seek(data, os.SEEK_CUR)
            else:
                f.write(data)
            f.write(b"\0" * (-info.size % tarfile.BLOCKSIZE))
        f.write(b"\0" * 2 * tarfile.BLOCKSIZE)
    return path


def sample_json(answer: str = "ok", *media: str) -> bytes:
    content = [{"type": "text", "text": "say it"}] + [{"type": "audio", "member": m} for m in media]
    return json.dumps({"messages": [{"role": "user", "content": content},
                                    {"role": "assistant", "content": answer}]}).encode()


def text_samples(*keys: str) -> list[tuple[str, bytes]]:
    return [(f"{key}.json", sample_json(f"answer {key}")) for key in keys]


def make_cfg(shards: str, **overrides) -> DataConfig:
    fields = {"seq_len": 1024, "batch_size": 1, "num_workers": 0, "pack_pool": 4, "shuffle": False,
              "train": [SourceConfig(shards=shards)]}
    return DataConfig(**{**fields, **overrides})


def read_keys(cfg: DataConfig, skip_log: Path | None = None) -> list[str]:
    return [s["key"] for batch in DataPipeline(cfg, epochs=1, skip_log=skip_log) for s in batch["samples"]]


def skipped(skip_log: Path) -> dict[str, str]:
    return {row["key"]: row["reason"] for row in map(json.loads, skip_log.read_text().splitlines())}


# The child's peak RSS is its own memory's high-water mark, VmHWM: getrusage's ru_maxrss keeps the mark of
# the memory it had before exec, which with subprocess's vfork is pytest's.
CHILD = r"""
import json, sys
from omni_train.data.pipeline import DataConfig, DataPipeline, SourceConfig
args = json.loads(sys.argv[1])
cfg = DataConfig(seq_len=1024, batch_size=1, num_workers=0, pack_pool=4, shuffle=False, allow_remote=True,
                 overlong="skip", train=[SourceConfig(shards=args["shards"])], **args["overrides"])
keys, error = [], None
try:
    keys = [s["key"] for batch in DataPipeline(cfg, epochs=1, skip_log=args["skip_log"]) for s in batch["samples"]]
except ValueError as e:
    error = str(e)
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(json.dumps({"keys": keys, "error": error, "peak_rss_mb": int(status["VmHWM"].split()[0]) / 1024}))
"""


def run_child(shards: str, skip_log: Path, **overrides) -> dict:
    """Keys read and peak RSS (MB) of a fresh process that decodes the shards in-process (num_workers=0)."""
    args = json.dumps({"shards": shards, "overrides": overrides, "skip_log": str(skip_log)})
    out = subprocess.run([sys.executable, "-c", CHILD, args], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.splitlines()[-1])


def as_source(shard: Path, mode: str) -> str:
    return str(shard) if mode == "local" else f"pipe:cat '{shard}'"


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> dict[str, float]:
    """Peak RSS of the child over a shard of small samples, read locally and through `pipe:cat`."""
    root = tmp_path_factory.mktemp("baseline")
    shard = write_tar(root / "base.tar", text_samples("s0", "s1", "s2", "s3"))
    rss = {}
    for mode in ("local", "pipe"):
        result = run_child(as_source(shard, mode), root / "skipped.jsonl")
        assert result["keys"] == ["s0", "s1", "s2", "s3"]
        rss[mode] = result["peak_rss_mb"]
    return rss


@pytest.mark.parametrize("mode,big", [("local", "flac"), ("pipe", "flac"), ("local", "json"),
                                      ("local", "long name"), ("pipe", "long name")])
def test_a_200mb_member_is_never_read(tmp_path, baseline, mode, big):
    """A sample whose member (or a tar header) is 200 MB is skipped from its header: peak RSS stays within
    MEMBER_RSS_BOUND_MB of the baseline (reading it would add >= 200 MB), and the skip log names it."""
    size = 200 * MB
    if big == "flac":
        bad = [("big.json", sample_json("ok", "audio_0.flac")), ("big.audio_0.flac", size)]
    elif big == "json":
        bad = [("big.json", size)]
    else:  # a GNU long-name header tarfile would read whole before the member it names
        bad = [("././@LongLink", size), ("big.json", sample_json())]
    shard = write_tar(tmp_path / "big.tar", text_samples("s0", "s1") + bad + text_samples("s2", "s3"))
    assert os.stat(shard).st_blocks * 512 < MB  # sparse: the test itself stays light on disk
    skip_log = tmp_path / "skipped.jsonl"
    result = run_child(as_source(shard, mode), skip_log)
    assert result["peak_rss_mb"] < baseline[mode] + MEMBER_RSS_BOUND_MB, (result, baseline)
    assert result["error"] is None

    rows = [json.loads(line) for line in skip_log.read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["shard"] == as_source(shard, mode)
    if big == "long name":  # the samples after an unreadable header are lost, and logged as such
        assert result["keys"] == ["s0", "s1"]
        assert rows[0]["key"] == "<after s1>" and "over 1048576 bytes" in rows[0]["reason"]
    else:
        assert result["keys"] == ["s0", "s1", "s2", "s3"]
        member = "audio_0.flac" if big == "flac" else "json"
        limit = "data.max_member_mb=64" if big == "flac" else "data.max_json_mb=8"
        assert rows[0]["key"] == "big"
        assert rows[0]["reason"] == f"member {member} is 200.0 MB ({size} bytes), over {limit}; not read"


def test_a_40mb_text_is_refused_before_tokenizing(tmp_path, baseline):
    """40 MB of assistant text: the JSON cap refuses the member unread; with that cap raised, the text cap
    refuses it after parsing and before tokenizing (which costs ~1.4 GB more here for this text)."""
    text = "word " * (8 * MB)
    shard = write_tar(tmp_path / "text.tar", text_samples("s0", "s1") + [("long.json", sample_json(text))]
                      + text_samples("s2"))
    json_size = len(sample_json(text))
    del text
    skip_log = tmp_path / "skipped.jsonl"

    result = run_child(str(shard), skip_log)
    assert result["peak_rss_mb"] < baseline["local"] + MEMBER_RSS_BOUND_MB, (result, baseline)
    assert result["keys"] == ["s0", "s1", "s2"]
    assert skipped(skip_log)["long"] == f"member json is 40.0 MB ({json_size} bytes), over data.max_json_mb=8; not read"

    skip_log.unlink()
    result = run_child(str(shard), skip_log, max_json_mb=64)
    # what parsing holds: the member's bytes, the decoded str and the parsed text (3 x 40 MB), nothing per token
    assert result["peak_rss_mb"] < baseline["local"] + 3 * json_size / MB + MEMBER_RSS_BOUND_MB, (result, baseline)
    assert result["keys"] == ["s0", "s1", "s2"]
    num_chars = 8 * MB * 5 + len("say it")
    assert skipped(skip_log)["long"] == (f"sample text is {num_chars} characters, over data.max_text_chars=1000000;"
                                         " not tokenized")


def test_members_of_one_sample_together_are_capped(tmp_path):
    blob = b"\xff" * (600 * 1024)  # two of these are under max_member_mb=1 each, over max_sample_mb=1 together
    shard = write_tar(tmp_path / "s.tar", text_samples("a") + [("two.json", sample_json("ok", "audio_0.flac", "audio_1.flac")),
                                                               ("two.audio_0.flac", blob), ("two.audio_1.flac", blob)])
    skip_log = tmp_path / "skipped.jsonl"
    assert read_keys(make_cfg(str(shard), max_member_mb=1, max_sample_mb=1), skip_log) == ["a"]
    assert skipped(skip_log) == {"two": "members hold 1.2 MB with audio_1.flac, over data.max_sample_mb=1; not read"}


@pytest.mark.parametrize("mode", ["local", "pipe"])
def test_duplicate_keys_are_skipped_and_logged(tmp_path, mode):
    """Two samples with one key never merge: both are skipped (a stream cannot take back a sample it already
    read, so there a key that comes back later skips only its second sample), the others read normally."""
    good_audio = synth.tone(tmp_path / "tone.flac", 0.5).read_bytes()
    members = (text_samples("a")
               + [("twin.json", sample_json("first", "audio_0.flac")), ("twin.audio_0.flac", good_audio)]
               + [("twin.json", sample_json("second", "audio_0.flac")), ("twin.audio_0.flac", good_audio)]
               + text_samples("again", "b", "again", "c"))
    shard = write_tar(tmp_path / "dup.tar", members)
    skip_log = tmp_path / "skipped.jsonl"
    keys = read_keys(make_cfg(as_source(shard, mode), allow_remote=True), skip_log)
    reasons = skipped(skip_log)
    assert set(reasons) == {"twin", "again"}
    assert reasons["twin"] == "duplicate key 'twin': more than one sample in this shard has it; all of them are skipped"
    if mode == "local":
        assert keys == ["a", "b", "c"]
        assert reasons["again"] == reasons["twin"].replace("twin", "again")
    else:
        assert keys == ["a", "again", "b", "c"]
        assert reasons["again"] == ("duplicate key 'again': an earlier sample of this streamed shard has it "
                                    "(already read); this one is skipped")
    rows = [json.loads(line) for line in skip_log.read_text().splitlines()]
    assert {row["shard"] for row in rows} == {as_source(shard, mode)}


@pytest.mark.parametrize("shards,error,names", [
    ("{root}/nothing-*.tar", FileNotFoundError, "{root}/nothing-*.tar"),
    ("{root}/missing-{{000..001}}.tar", FileNotFoundError, "{root}/missing-000.tar"),
    ("{root}", ValueError, "{root} is not a regular file"),
    ("https://example.com/train-000.tar", ValueError, "https://example.com/train-000.tar"),
    ("pipe:cat {root}/x.tar", ValueError, "pipe:cat {root}/x.tar"),
])
def test_launch_errors_are_one_line_naming_the_shard(tmp_path, shards, error, names):
    with pytest.raises(error) as caught:
        DataPipeline(make_cfg(shards.format(root=tmp_path)))
    message = str(caught.value)
    assert "\n" not in message and names.format(root=tmp_path) in message
    if shards.startswith(("https:", "pipe:")):
        assert "data.allow_remote=true" in message


def test_pipe_command_must_be_the_whole_shards_string(tmp_path):
    with pytest.raises(ValueError, match="a pipe: command must be the whole shards string"):
        expand_shards(f"{tmp_path}/a.tar pipe:cat {tmp_path}/b.tar", allow_remote=True)


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("case", ["overlong", "refused member", "failures in a row"])
def test_errors_in_workers_reach_the_main_process_as_one_line(tmp_path, num_workers, case):
    """The one-line user error a worker raises comes out of DataPipeline as itself, not as DataLoader's
    multi-line 'Caught ... in DataLoader worker process' text."""
    shard = tmp_path / "s.tar"
    overrides = {"num_workers": num_workers}
    if case == "overlong":
        write_tar(shard, text_samples("a") + [("long.json", sample_json("x" * 3000))])
        expected, where = OverlongSample, f"{shard}:long: sample has 30"
    elif case == "refused member":
        write_tar(shard, text_samples("a") + [("a.weights.pth", b"\x80\x04K\x01.")])
        expected, where = ShardFormatError, f"{shard}:a: member 'weights.pth' has a refused extension"
    else:
        write_tar(shard, [(f"{i}.json", b"not json") for i in range(6)])
        expected, where, overrides["max_consecutive_failures"] = DataError, "3 samples in a row", 3
    with pytest.raises(ValueError) as caught:
        read_keys(make_cfg(str(shard), **overrides))
    message = str(caught.value)
    assert caught.type is expected
    assert "\n" not in message and where in message and "DataLoader worker" not in message


def test_unreadable_shards_are_skipped_and_logged(tmp_path):
    """A shard that cannot be opened as a tar at all is damage like a truncated one: logged with its name,
    and the run goes on with the shards that can be read."""
    write_tar(tmp_path / "part-0.tar", text_samples("a", "b"))
    (tmp_path / "part-1.tar").write_bytes(b"this is not a tar archive\n" * 100)
    (tmp_path / "part-2.tar").write_bytes(b"")
    skip_log = tmp_path / "run" / "skipped.jsonl"
    keys = read_keys(make_cfg(f"{tmp_path}/part-*.tar", num_workers=2), skip_log)
    assert sorted(keys) == ["a", "b"]
    rows = [json.loads(line) for line in skip_log.read_text().splitlines()]
    assert sorted(row["shard"] for row in rows) == [str(tmp_path / "part-1.tar"), str(tmp_path / "part-2.tar")]
    assert all(row["key"] == "<shard>" and row["reason"].startswith("shard cannot be read as a tar") for row in rows)

    # when no shard can be read, training stops after data.max_consecutive_failures, saying why
    with pytest.raises(DataError) as caught:
        next(iter(DataPipeline(make_cfg(f"{tmp_path}/part-[12].tar", num_workers=2))))
    assert "\n" not in str(caught.value)
    assert "samples in a row could not be used" in str(caught.value) and "cannot be read as a tar" in str(caught.value)

    # a pipe: command that fails is logged the same way
    skip_log.unlink()
    command = f"pipe:cat {tmp_path}/missing.tar 2>/dev/null"
    assert read_keys(make_cfg(command, allow_remote=True), skip_log) == []
    assert skipped(skip_log)["<shard>"].startswith("stream cannot be read as a tar")


def test_pipe_commands_keep_their_spaces(tmp_path):
    folder = tmp_path / "with space"
    folder.mkdir()
    for i in range(2):
        write_tar(folder / f"part-{i:03d}.tar", text_samples(f"k{i}a", f"k{i}b"))
    command = f"pipe:cat '{folder}/part-000.tar'"
    assert read_keys(make_cfg(command, allow_remote=True)) == ["k0a", "k0b"]
    with pytest.raises(ValueError) as caught:
        DataPipeline(make_cfg(command))
    assert str(caught.value) == (f"shard URL {command!r} is remote or runs a command; "
                                 "set data.allow_remote=true to read it")

    # numeric ranges are WebDataset's shard numbering and expand; any other brace is the shell's
    ranged = f"pipe:cat '{folder}/part-{{000..001}}.tar'"
    assert expand_shards(ranged, allow_remote=True) == [f"pipe:cat '{folder}/part-00{i}.tar'" for i in range(2)]
    assert sorted(read_keys(make_cfg(ranged, allow_remote=True))) == ["k0a", "k0b", "k1a", "k1b"]
    awk = "pipe:cat x.tar | awk '{print $1, $2}' | head -c {1,2}"
    assert expand_shards(awk, allow_remote=True) == [awk]


def test_media_named_many_times_stop_decoding_at_seq_len(tmp_path):
    """A sample that names one recording 40 times is refused once its media alone pass seq_len, not after
    decoding all 40 (each is bounded by audio.max_duration_s, their number is not)."""
    audio = synth.tone(tmp_path / "tone.flac", 1.0).read_bytes()
    shard = write_tar(tmp_path / "s.tar", text_samples("a") + [("many.json", sample_json("ok", *["audio_0.flac"] * 40)),
                                                               ("many.audio_0.flac", audio)])
    skip_log = tmp_path / "skipped.jsonl"
    assert read_keys(make_cfg(str(shard), seq_len=256, overlong="skip"), skip_log) == ["a"]
    reason = skipped(skip_log)["many"]
    assert reason.startswith("sample's media alone have") and "> data.seq_len=256" in reason
    assert int(reason.split()[4]) < 256 + 60  # stopped at the first item past seq_len (1 s is 25 tokens)


def test_deeply_nested_json_is_a_format_error():
    with pytest.raises(ShardFormatError, match="nested too deeply"):
        parse_sample(b"[" * 100_000, "s.tar:k")


def test_inspect_lists_skipped_samples_with_their_reason(tmp_path, capsys):
    """`shards inspect` (headers and --decode) reports what the pipeline skips unread, with the same reason."""
    shard = write_tar(tmp_path / "inspect-000.tar",
                      text_samples("a") + [("big.json", sample_json("ok", "audio_0.flac")), ("big.audio_0.flac", 200 * MB)]
                      + text_samples("twin", "b", "twin") + [("long.json", sample_json("w" * 1_100_000))])
    for mode in ([], ["--decode"]):
        assert main(["shards", "inspect", str(shard), "--json", *mode]) == 1
        report = json.loads(capsys.readouterr().out)
        assert report["samples"] == 2
        reasons = {u["key"]: u["reason"] for u in report["unusable"]}
        assert set(reasons) == {"big", "twin", "long"}
        assert reasons["big"] == f"member audio_0.flac is 200.0 MB ({200 * MB} bytes), over data.max_member_mb=64; not read"
        assert reasons["twin"].startswith("duplicate key 'twin'")
        assert reasons["long"].startswith("sample text is 1100006 characters, over data.max_text_chars=1000000")
