"""A thin trainer: any transformers causal LM, every objective, fused vs unfused side by side.

``loop`` reads top to bottom (set-up, model, data, objective, optimizer, loop, eval, save); its
parts: ``config`` (the flags), ``model``, ``data``, ``recipes`` (one entry per objective),
``step`` (the optimisation step), ``sampling`` (where batches come from), ``checkpoint``,
``distributed``, ``report``. Command line: ``fused-losses train --help``.
"""
from .config import Config
from .loop import main, train

__all__ = ["Config", "main", "train"]
