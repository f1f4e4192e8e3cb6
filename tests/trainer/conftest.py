"""Fixtures for the trainer tests."""
from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def tok_cache(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tokenizer")
    os.environ["FUSED_LOSSES_CACHE"] = str(path)  # subprocesses share the trained tokenizer
    return str(path)


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> str:
    """A --teacher directory for distillation runs on the tiny student."""
    from .trainer_helpers import TEACHER, TEACHER_HEAD_SCALE, save_tiny

    return save_tiny(tmp_path_factory.mktemp("teacher"), TEACHER, seed=1,
                     head_scale=TEACHER_HEAD_SCALE)
