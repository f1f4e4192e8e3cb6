"""Fixtures for the trainer tests."""
from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def tok_cache(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tokenizer")
    os.environ["FUSED_LOSSES_CACHE"] = str(path)  # subprocesses share the trained tokenizer
    return str(path)
