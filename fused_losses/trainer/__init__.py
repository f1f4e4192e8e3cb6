"""A thin trainer: any transformers causal LM, every objective, fused vs unfused side by side.

``loop`` (config, setup, model, optimizer, loop, eval, save), ``data`` (embedded default and
JSONL), ``losses`` (the one loss function picked per objective and implementation),
``report`` (report.md, report.json, plots). Command line: ``fused-losses train --help``.
"""
from .loop import Config, main, train

__all__ = ["Config", "main", "train"]
