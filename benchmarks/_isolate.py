"""Make this process see only what the GPU machine will have: its image plus the carried peers.

Imported first by ``worker.py`` (before torch). Two environment variables, both set by
``gpu_session.py``:

* ``FL_BENCH_PEERS``: the folder the carried peer wheels were installed into
  (``pip install --no-deps --target``); it goes first on ``sys.path``.
* ``FL_BENCH_HIDE``: comma-separated top-level module names that exist here but not on the
  GPU image (the dry run computes them from ``gpu_image_packages.txt``). Each resolves only
  from the peers folder; anywhere else it raises ``ModuleNotFoundError``, so a peer that needs
  a package nobody carried fails here, on the CPU, instead of on the GPU machine.

Unset (``run.py``), this module changes nothing.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys

ENV_PEERS = "FL_BENCH_PEERS"
ENV_HIDE = "FL_BENCH_HIDE"


class HideAbsent(importlib.abc.MetaPathFinder):
    """Resolve the ``hidden`` top-level names from ``carried`` folders only."""

    def __init__(self, hidden: set[str], carried: list[str]):
        self.hidden, self.carried = hidden, carried

    def find_spec(self, fullname, path=None, target=None):
        if "." in fullname or fullname not in self.hidden:
            return None  # submodules follow their parent, which was resolved here
        spec = importlib.machinery.PathFinder.find_spec(fullname, self.carried)
        if spec is None:
            raise ModuleNotFoundError(
                f"No module named {fullname!r} (hidden: not on the GPU image and not carried "
                "in .whl/; add it to benchmarks/fetch_peer_wheels.sh)", name=fullname)
        return spec


def install() -> None:
    peers = os.environ.get(ENV_PEERS)
    carried = [peers] if peers else []
    if peers and peers not in sys.path:
        sys.path.insert(0, peers)
    hidden = {name for name in os.environ.get(ENV_HIDE, "").split(",") if name}
    if hidden and not any(isinstance(f, HideAbsent) for f in sys.meta_path):
        sys.meta_path.insert(0, HideAbsent(hidden, carried))


install()
