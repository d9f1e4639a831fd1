"""`omni-train` subcommands. Each parses its flags and calls one library function; a user's error is one
line on stderr and exit code 2 (`errors.py`)."""

from __future__ import annotations

import argparse
import sys


FOLDER_ONLY_FLAGS = ("segment_s", "overlap_s", "eval_fraction", "eval_by", "seed", "action_items_max_s")


def _shards_build(args: argparse.Namespace) -> int:
    if args.audio_dir:
        if args.manifest:
            raise ValueError("shards build: give --manifest or --audio-dir, not both")
        if args.allow_outside_media_root:
            raise ValueError("shards build --audio-dir: --allow-outside-media-root applies to --manifest only")
        if args.prefix is not None or args.task is not None:
            raise ValueError("shards build --audio-dir: --prefix and --task do not apply (the folder mode writes "
                             "train-*.tar and eval-*.tar with tasks transcribe and action_items)")
        from omni_train.data.folder import build_folder_cli
        return build_folder_cli(args)
    given = [f"--{name.replace('_', '-')}" for name in FOLDER_ONLY_FLAGS if getattr(args, name) is not None]
    if given:
        raise ValueError(f"shards build: {', '.join(given)} only apply with --audio-dir")
    from omni_train.data.writer import build_shards_cli
    return build_shards_cli(args)


def _shards_demo(args: argparse.Namespace) -> int:
    from omni_train.data.demo import demo_cli
    return demo_cli(args)


def _shards_inspect(args: argparse.Namespace) -> int:
    from omni_train.data.inspect import inspect_cli
    return inspect_cli(args)


def _tokenizer_train(args: argparse.Namespace) -> int:
    from omni_train.data.text import train_tokenizer_cli
    return train_tokenizer_cli(args)


def _compare(args: argparse.Namespace) -> int:
    from omni_train.probes.compare import compare_cli
    return compare_cli(args)


def _plot(args: argparse.Namespace) -> int:
    from omni_train.plot import plot_cli
    return plot_cli(args)


def _sweep(args: argparse.Namespace) -> int:
    from omni_train.sweep import sweep_cli
    return sweep_cli(args)


def _probe(args: argparse.Namespace) -> int:
    from omni_train.probes.runner import probe_cli
    return probe_cli(args)


def _export(args: argparse.Namespace) -> int:
    from omni_train.export import export_cli
    return export_cli(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omni-train", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    shards = commands.add_parser("shards", help="build, generate and inspect WebDataset shards").add_subparsers(dest="shards_command", required=True)
    build = shards.add_parser("build", help="write shards from a ShareGPT-style manifest (or a folder of recordings)")
    build.add_argument("--manifest", help="JSON or JSONL manifest (messages with <audio>/<image>/<video> placeholders + audios/images/videos lists)")
    build.add_argument("--audio-dir", default=None,
                       help="folder mode: recordings (any audio, or the audio track of mp4/mkv/webm) under this folder, each "
                            "with a transcript of the same name beside it (.txt, .srt, .vtt, or .json with transcript / "
                            "segments / action_items) -> train-*.tar and eval-*.tar of transcribe (and action_items) "
                            "samples cut to --segment-s; exit 1 when some recordings were skipped (one line each)")
    build.add_argument("--media-root", default=".", help="directory the manifest's media paths are relative to; "
                                                          "every media file must resolve to a path under it")
    build.add_argument("--allow-outside-media-root", action="store_true",
                       help="read media paths that leave --media-root (absolute paths, '..', symbolic links)")
    build.add_argument("--out", required=True, help="output directory")
    build.add_argument("--prefix", default=None, help="shard file name prefix: <prefix>-000000.tar (default: train)")
    build.add_argument("--max-samples", type=int, default=1000, help="samples per shard")
    build.add_argument("--max-bytes", type=float, default=1e9, help="bytes per shard")
    build.add_argument("--task", default=None, help="meta.task for entries that do not set one")
    build.add_argument("--language", default=None, help="meta.language for entries that do not set one")
    build.add_argument("--overwrite", action="store_true", help="replace existing <prefix>-*.tar shards in --out")
    build.add_argument("--segment-s", type=float, default=None,
                       help="--audio-dir: longest sample in seconds; timestamped cues are grouped up to it, plain text is "
                            "cut into windows of it (default 30)")
    build.add_argument("--overlap-s", type=float, default=None, help="--audio-dir: overlap of plain-text windows (default 2)")
    build.add_argument("--eval-fraction", type=float, default=None, help="--audio-dir: share of samples in eval-*.tar (default 0.1)")
    build.add_argument("--eval-by", choices=("segment", "recording"), default=None,
                       help="--audio-dir: hold out samples (hash of recording + offset; default) or whole recordings")
    build.add_argument("--seed", type=int, default=None, help="--audio-dir: changes which samples go to eval (default 0)")
    build.add_argument("--action-items-max-s", type=float, default=None,
                       help="--audio-dir: the action_items sample is the whole recording, made up to this length (default 60)")
    build.set_defaults(func=_shards_build)

    demo = shards.add_parser("demo", help="generate the embedded multilingual demo corpus (speech, text, images, video)")
    demo.add_argument("--out", required=True, help="output directory (train-*.tar, eval-000000.tar, probe-*.tar, corpus.json)")
    demo.add_argument("--size", choices=("tiny", "demo", "full"), default="demo",
                      help="tiny: seconds, for tests; demo: what `make demo` trains on; full: every espeak-ng voice")
    demo.add_argument("--seed", type=int, default=0, help="the same seed gives byte-identical shards")
    demo.add_argument("--workers", type=int, default=None, help="render processes (default: one per CPU)")
    demo.add_argument("--per-voice", type=int, default=None, help="training utterances per voice (overrides the size's count)")
    demo.add_argument("--train-variants", default=None,
                      help="espeak-ng variants half the train/eval speech is said in, comma-separated, or none "
                           "(default: the size's; demo and full: the 17 voices of DEMO_TRAIN_VARIANTS in omni_train/data/demo.py, "
                           "three of them Klatt-source speakers of the project's own, KLATT_SPEAKERS)")
    demo.add_argument("--synthetic-speakers", type=int, default=None,
                      help="espeak-ng speakers drawn at random (formants, pitch, echo), said like the train variants "
                           "(default 0; at most 150)")
    demo.add_argument("--force", action="store_true", help="rebuild even if --out holds this corpus; replace other shards there")
    demo.set_defaults(func=_shards_demo)

    inspect = shards.add_parser("inspect", help="count samples, tasks, languages, hours, frames, tokens")
    inspect.add_argument("pattern", help="shard path, brace pattern or glob")
    inspect.add_argument("--decode", action="store_true", help="run every sample through the training decode + tokenize and list the unusable ones")
    inspect.add_argument("--json", action="store_true", help="print one JSON object")
    inspect.add_argument("--recipe", default=None, help="recipe whose data.* settings (caps, tokenizer) apply")
    inspect.add_argument("--tokenizer", default=None, help="sentencepiece .model or HF tokenizer dir (default: byte-level)")
    inspect.set_defaults(func=_shards_inspect)

    tokenizer = commands.add_parser("tokenizer", help="train a tokenizer").add_subparsers(dest="tokenizer_command", required=True)
    train = tokenizer.add_parser("train", help="train a multilingual sentencepiece tokenizer on the text of shards")
    train.add_argument("--shards", required=True, help="shard pattern")
    train.add_argument("--vocab-size", type=int, required=True)
    train.add_argument("--out", required=True, help="output .model file")
    train.set_defaults(func=_tokenizer_train)

    probe = commands.add_parser("probe", help="run the recipe's probes on a checkpoint of a run and print the table")
    probe.add_argument("--run", required=True, help="run directory (runs/NAME) holding config.yaml and checkpoints/")
    probe.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    probe.add_argument("--probes", default=None, help="comma-separated probe names of the recipe (default: all)")
    probe.add_argument("--max-items", type=int, default=None, help="cap every probe at this many items")
    probe.add_argument("--group-by", default=None,
                       help="comma-separated meta fields to score separately in every probe, instead of its group_by "
                            "(e.g. variant); an empty string: none")
    probe.add_argument("--probe-shards", default=None, help="run one ad-hoc probe over these shards instead of the recipe's")
    probe.add_argument("--probe-kind", default="generative", help="ad-hoc probe: generative | pipeline | retrieval")
    probe.add_argument("--probe-tasks", default=None, help="ad-hoc probe: comma-separated meta.task values (default: all)")
    probe.add_argument("--probe-name", default="adhoc", help="ad-hoc probe: its name in probes.jsonl")
    probe.set_defaults(func=_probe)

    export = commands.add_parser("export", help="write a run's checkpoint as safetensors + config + tokenizer (HF layout)")
    export.add_argument("--run", required=True, help="run directory (runs/NAME) holding config.yaml and checkpoints/")
    export.add_argument("--out", required=True, help="output directory")
    export.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    lora = export.add_mutually_exclusive_group()
    lora.add_argument("--merge-lora", action="store_true", help="fold LoRA adapters into the weights (the default)")
    lora.add_argument("--keep-lora", action="store_true", help="write the base weights and the adapters apart (peft layout)")
    export.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    export.add_argument("--format", choices=("omni_train", "hf"), default="omni_train",
                        help="omni_train (default): our layout, read by load_exported; hf: the pretrained model's release "
                             "layout (Qwen2.5-Omni: transformers and vLLM load it), for runs from model.pretrained")
    export.set_defaults(func=_export)

    sweep = commands.add_parser("sweep", help="a grid of overrides x seeds, run one after another (or printed for a cluster)",
                                description="Each (variant, seed) is `torchrun --standalone --nproc_per_node=N "
                                            "launch/pretrain.py --recipe R ... seed=S name=<variant>-s<S> "
                                            "output_dir=runs/<sweep>/<variant>-s<S>`; finished runs are skipped, "
                                            "half-done ones resume. Exit 1 when a run failed (see omni_train/sweep.py).")
    sweep.add_argument("--recipe", required=True, help="recipes/*.yaml")
    sweep.add_argument("--grid", action="append", metavar="KEY=A,B,...",
                       help="a dotted key and its values (repeatable: the cartesian product); a variant is named by "
                            "its values joined with '_', e.g. model.fusion=interleave,cross_attn")
    sweep.add_argument("--seeds", default="0", help="comma-separated seeds, each variant runs once per seed (default 0)")
    sweep.add_argument("--name", default=None, help="sweep name (default: <recipe stem>-<last part of each grid key>)")
    sweep.add_argument("--out", default=None, help="sweep directory (default: runs/<name>)")
    sweep.add_argument("--nproc", type=int, default=1, help="processes per run (torchrun --nproc_per_node; default 1)")
    sweep.add_argument("--print", action="store_true", help="print the commands, one per line, and run nothing")
    sweep.add_argument("--slurm", action="store_true", help="with --print: an sbatch array script instead")
    sweep.add_argument("--fail-fast", action="store_true", help="stop at the first failed run (default: run the rest)")
    sweep.add_argument("overrides", nargs="*", help="after --: dotted overrides for every run, e.g. -- train.steps=400")
    sweep.set_defaults(func=_sweep)

    compare = commands.add_parser("compare", help="probe numbers of runs side by side, or per variant over seeds "
                                                  "(mean, interval, paired difference, cost)")
    compare.add_argument("runs", nargs="+", help="run directories (runs/NAME) with probes.jsonl, or a sweep directory "
                                                 "(runs/SWEEP with sweep.json); runs whose configs differ only in "
                                                 "seed, name and output_dir are one variant")
    compare.add_argument("--baseline", default=None, help="variant the paired differences are taken against (default: the first)")
    compare.add_argument("--out", default=None, help="also write the markdown table to this file (and the figure beside it, .png)")
    compare.add_argument("--png", default=None, help="write the sweep figure to this PNG")
    compare.add_argument("--languages", default=None, help="comma-separated languages whose rows to show, e.g. all "
                         "(default: every language); aggregates even single runs")
    compare.add_argument("--train-window", action="append", metavar="METRIC@FIRST:LAST",
                         help="a row of a metrics.jsonl key's mean over the steps FIRST..LAST of each run, e.g. "
                              "ctc_loss@450:650 (repeatable); aggregates even single runs")
    compare.set_defaults(func=_compare)

    plot = commands.add_parser("plot", help="PNG curves of one or more runs side by side, or a sweep's figure")
    plot.add_argument("runs", nargs="+", help="run directories (runs/NAME), or one sweep directory (runs/SWEEP)")
    plot.add_argument("--out", default=None, help="PNG path (default: <first run>/plots/curves.png, <sweep>/plots/sweep.png)")
    plot.set_defaults(func=_plot)
    return parser


def main(argv: list[str] | None = None) -> int:
    """User errors print one line and exit 2 (`errors.run_entry_point`); bugs keep their traceback."""
    from omni_train.errors import run_entry_point

    args = build_parser().parse_args(argv)
    return run_entry_point("omni-train", lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
