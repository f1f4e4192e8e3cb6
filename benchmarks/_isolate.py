"""Make this process see only what the GPU machine will have: its image plus the carried peers.

Imported first by ``worker.py`` (before torch). Two environment variables, both set by
``gpu_session.py``:

* ``FL_BENCH_PEERS``: the folder the carried peer wheels were installed into
  (``pip install --no-deps --target``); it goes first on ``sys.path``, so a carried package
  shadows any other copy.
* ``FL_BENCH_HIDE``: comma-separated top-level module names that exist here but not on the
  GPU image (the dry run computes them from ``gpu_image_packages.txt``). Those not carried
  are made absent exactly as a missing package is: ``importlib.util.find_spec`` returns None
  (libraries that probe for optional packages see them missing) and ``import`` raises
  ``ModuleNotFoundError`` ("import of NAME halted; None in sys.modules": hidden because the
  GPU image lacks it). A peer that needs one fails here, on the CPU, instead of there.

Unset (``run.py``), this module changes nothing. ``install()`` may run again after the peers
folder is filled: names carried by then become importable.
"""
from __future__ import annotations

import importlib
import importlib.machinery
import os
import sys

ENV_PEERS = "FL_BENCH_PEERS"
ENV_HIDE = "FL_BENCH_HIDE"


def carried(name: str, peers: str | None) -> bool:
    """Whether the top-level module ``name`` resolves from the peers folder."""
    if not peers or not os.path.isdir(peers):
        return False
    importlib.invalidate_caches()
    return importlib.machinery.PathFinder.find_spec(name, [peers]) is not None


def install() -> None:
    peers = os.environ.get(ENV_PEERS)
    if peers and peers not in sys.path:
        sys.path.insert(0, peers)
    for name in filter(None, os.environ.get(ENV_HIDE, "").split(",")):
        if carried(name, peers):
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]
        elif sys.modules.get(name) is None:  # never imported here: make it absent
            sys.modules[name] = None


install()
