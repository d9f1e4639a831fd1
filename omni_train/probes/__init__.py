"""Cross-modal probes: greedy generation, metrics (exact, sandboxed execution, WER/CER, recall@k) and the runner.

    from omni_train.probes import ProbeConfig, run_probes, format_table
    rows = run_probes(model, [ProbeConfig(name="speech2code", shards="shards/demo/probe-*.tar")],
                      data_cfg=cfg.data, tokenizer=tokenizer, dist=dist, step=step, output_dir=cfg.output_dir)
    print(format_table(rows))
"""

from omni_train.probes.generate import generate, generate_from_text, mean_hidden
from omni_train.probes.runner import PROBE_KINDS, PROBE_METRICS, ProbeConfig, format_table, probes_due, run_probes

__all__ = ["PROBE_KINDS", "PROBE_METRICS", "ProbeConfig", "format_table", "generate", "generate_from_text", "mean_hidden",
           "probes_due", "run_probes"]
