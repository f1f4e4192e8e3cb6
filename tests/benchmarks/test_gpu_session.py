"""The GPU session's pure-Python parts: what it hides, installs, parses, decides and writes.

The session itself runs in CI as ``gpu_session.py --dry-run`` (after ``make test``); these
check the pieces whose mistakes a dry run on a CPU would not show (a wrong verdict, a hidden
package the GPU image has, a test outcome read wrong).
"""
import importlib.metadata
import importlib.util
import json
import os
import re
import sys

import pytest

BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks")
sys.path.insert(0, os.path.abspath(BENCH))

import _isolate  # noqa: E402
import gpu_session  # noqa: E402
import providers  # noqa: E402


def _norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def test_hidden_modules_hide_what_the_image_lacks_and_nothing_it_needs(tmp_path):
    installed = {_norm(d.metadata["Name"]) for d in importlib.metadata.distributions()}
    lacking = {"trl", "datasets", "dill", "multiprocess"} & installed
    if len(lacking) < 4:
        pytest.skip("needs trl and datasets installed (the dev extra)")
    image = tmp_path / "image.txt"
    image.write_text("# comment\n" + "\n".join(sorted(installed - lacking)) + "\n")
    hidden = set(gpu_session.hidden_modules(str(image)))
    assert {"trl", "datasets", "dill", "multiprocess"} <= hidden
    assert not {"torch", "triton", "transformers", "fused_losses", "numpy"} & hidden
    # Everything on the image: nothing hidden.
    image.write_text("\n".join(sorted(installed)) + "\n")
    assert gpu_session.hidden_modules(str(image)) == []


def test_hidden_modules_look_absent_unless_carried(tmp_path, monkeypatch):
    here, peers = tmp_path / "site", tmp_path / "peers"  # this machine's packages, the carried
    for folder in (here, peers):
        folder.mkdir()
        (folder / "fl_probe_carried.py").write_text(f"WHERE = {folder.name!r}\n")
    (here / "fl_probe_absent.py").write_text("WHERE = 'site'\n")
    names = ("fl_probe_carried", "fl_probe_absent")
    monkeypatch.setattr(sys, "path", [str(here)] + sys.path)
    monkeypatch.setenv(_isolate.ENV_PEERS, str(peers))
    monkeypatch.setenv(_isolate.ENV_HIDE, ",".join(names))
    try:
        _isolate.install()
        assert importlib.util.find_spec("fl_probe_absent") is None  # as if not installed
        with pytest.raises(ModuleNotFoundError):
            import fl_probe_absent  # noqa: F401
        import fl_probe_carried
        assert fl_probe_carried.WHERE == "peers"
        (peers / "fl_probe_absent.py").write_text("WHERE = 'peers'\n")  # carried later
        _isolate.install()
        import fl_probe_absent  # noqa: F811
        assert fl_probe_absent.WHERE == "peers"
    finally:
        for name in names:
            sys.modules.pop(name, None)


def test_wheel_pins_one_per_distribution(tmp_path):
    for name in ("multiprocess-0.70.19-py311-none-any.whl",
                 "multiprocess-0.70.19-py312-none-any.whl", "trl-1.16.0-py3-none-any.whl",
                 "cut_cross_entropy-25.1.1-py3-none-any.whl"):
        (tmp_path / name).write_bytes(b"")
    assert gpu_session.wheel_pins(str(tmp_path)) == [
        "cut-cross-entropy==25.1.1", "multiprocess==0.70.19", "trl==1.16.0"]
    (tmp_path / "trl-1.15.0-py3-none-any.whl").write_bytes(b"")
    with pytest.raises(ValueError, match="two versions of trl"):
        gpu_session.wheel_pins(str(tmp_path))


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.kernels.test_cuda" name="test_a[bf16]" time="1.5"/>
<testcase classname="tests.kernels.test_cuda" name="test_b" time="0.2">
  <failure message="AssertionError: lse off by 0.23">trace</failure></testcase>
<testcase classname="tests.kernels.test_cuda" name="test_c" time="0.0">
  <skipped type="pytest.skip" message="needs a CUDA GPU">skip</skipped></testcase>
<testcase classname="tests.kernels.test_cuda" name="test_d" time="0.1">
  <error message="fixture crashed">trace</error></testcase>
</testsuite></testsuites>"""


def test_test_outcomes_from_junit_and_from_a_killed_verbose_run(tmp_path):
    path = tmp_path / "junit.xml"
    path.write_text(JUNIT)
    cases = gpu_session.parse_junit(str(path))
    assert [(c["id"].split("::")[1], c["outcome"]) for c in cases] == [
        ("test_a[bf16]", "passed"), ("test_b", "failed"), ("test_c", "skipped"),
        ("test_d", "error")]
    assert cases[1]["message"] == "AssertionError: lse off by 0.23"
    verbose = ("tests/kernels/test_cuda.py::test_a[bf16] PASSED [ 10%]\n"
               "tests/kernels/test_cuda.py::test_b FAILED [ 20%]\n"
               "tests/kernels/test_cuda.py::test_c ")  # killed mid-test: no outcome yet
    assert [c["outcome"] for c in gpu_session.parse_verbose(verbose)] == ["passed", "failed"]


def _row(variant, ms, mode="ce", case="llama3-8b", peak=500.0, grads=200.0, floor=30.0):
    return dict(sweep=case, mode=mode, variant=variant, status="ok", fwdbwd_ms=ms,
                x_floor=ms / floor, peak_mb=peak, grads_mb=grads,
                peak_above_grads_mb=peak - grads, N=8, H=4, V=16, dtype="bf16", fwd_ms=ms / 3,
                bwd_ms=2 * ms / 3, fwdbwd_min=ms, fwdbwd_max=ms, floor_ms=floor)


def test_targets_take_our_fastest_exact_variant_per_case():
    rows = [_row("ours_triton_recompute", 60.0), _row("ours_triton_gif", 40.0),
            _row("ours_triton_filter", 20.0),  # filtered: not the exact-mode verdict
            _row("cce_exact", 55.0), _row("cce", 38.0), _row("trl", 70.0),
            _row("ours_triton_gif", 10.0, mode="logprobs"),  # another mode
            _row("ours_triton_gif", 90.0, case="gemma2-2b"), _row("cce", 80.0, case="gemma2-2b")]
    verdicts = {(v["case"], v["target"]): v for v in gpu_session.evaluate_targets(rows)}
    floor = verdicts[("llama3-8b", "<= 1.5x the 6NHV floor")]
    assert floor["ours"] == "ours_triton_gif" and floor["ratio"] == pytest.approx(40 / 30)
    assert floor["verdict"] == "PASS"
    exact = verdicts[("llama3-8b", "<= 0.8x Cut Cross-Entropy exact")]
    assert exact["ratio"] == pytest.approx(40 / 55) and exact["verdict"] == "PASS"
    assert verdicts[("llama3-8b", "<= 1.0x Cut Cross-Entropy default (filtered)")][
        "verdict"] == "MISS"
    assert verdicts[("llama3-8b", "peak above inputs and gradients <= 64 MB")][
        "verdict"] == "MISS"  # 300 MB
    assert ("llama3-8b", "faster than Liger's fused linear cross-entropy") not in verdicts
    assert verdicts[("gemma2-2b", "<= 1.0x Cut Cross-Entropy default (filtered)")][
        "ratio"] == pytest.approx(90 / 80)


def test_planner_paths_of_our_variants():
    assert gpu_session.planner_path("ce", "ours_torch_gif") == ("torch", "one-pass")
    assert gpu_session.planner_path("ce", "ours_cublas") == ("cublas", "one-pass")
    assert gpu_session.planner_path("ce", "ours_triton_recompute") == ("triton", "recompute")
    assert gpu_session.planner_path("logprobs", "ours_triton") == ("triton", "recompute")
    assert gpu_session.planner_path("logprobs", "ours_cublas_loss") == ("cublas", "one-pass")
    assert gpu_session.planner_path("ce", "ours_triton_filter") is None
    assert gpu_session.planner_path("ce", "ours_newbackend_gif") is None  # not registered
    assert gpu_session.planner_path("ce", "cce") is None


def test_the_planner_stage_covers_every_backend_and_path():
    from fused_losses import planner

    plan = gpu_session.variant_plan(providers.our_backends())
    covered = {gpu_session.planner_path(mode, name) for mode, name in plan}
    assert covered >= {(b, p) for b in providers.our_backends() for p in planner.PATHS}
    dry = {(c.get("backend"), c.get("path")) for c in gpu_session.DRY_PLANNER_CASES}
    assert dry >= {(b, p) for b in providers.our_backends() for p in planner.PATHS}


def test_every_backend_and_peer_is_planned_and_resolves():
    backends = providers.our_backends()
    plan = gpu_session.variant_plan(backends)
    assert len(plan) == len(set(plan))
    for backend in backends:  # each in the exact cross-entropy and the generic mode
        for mode in ("ce", "logprobs"):
            assert any(m == mode and n.startswith(f"ours_{backend}") for m, n in plan)
    for peer in gpu_session.PEER_CE:
        assert ("ce", peer) in plan
    for mode, name in plan:
        providers.get(mode, name)  # raises if the plan names a variant that does not exist


def test_the_distillation_session_plans_every_implementation_and_both_peers():
    """``--distill``: our CUDA default first, then the peers; every backend's default path,
    the recompute path where it is another one; every name resolves; its jobs carry H_t."""
    from fused_losses.backends import CUDA_DEFAULT

    backends = providers.our_backends()
    plan = gpu_session.distill_plan(backends)
    assert plan[0] == ("distill", f"ours_{CUDA_DEFAULT}") and len(plan) == len(set(plan))
    assert plan[1:3] == [("distill", p) for p in gpu_session.PEER_DISTILL]
    assert {f"ours_{b}" for b in backends} <= {n for _, n in plan}
    assert {"ours_cublas_recompute", "ours_torch_recompute"} <= {n for _, n in plan}
    for mode, name in plan:
        providers.get(mode, name)
    import worker

    jobs = gpu_session.job_list("distill", "ours_cublas", gpu_session.DISTILL_CASES)
    assert jobs[0]["teacher_H"] == 5120 and set(jobs[0]) <= set(worker.JOB_KEYS)


def test_the_floor_counts_the_teachers_logits():
    case = dict(N=2, H=3, V=5, teacher_H=7)
    assert gpu_session.run.floor_flops(dict(case, mode="ce")) == 6 * 2 * 3 * 5
    assert gpu_session.run.floor_flops(dict(case, mode="distill")) == \
        2 * 2 * (3 + 7) * 5 + 4 * 2 * 3 * 5


def test_distillation_verdicts_against_its_peers():
    rows = [_row("ours_cublas", 60.0, mode="distill", case="distill-8b", floor=46.0),
            _row("ours_triton", 130.0, mode="distill", case="distill-8b", floor=46.0),
            _row("liger_jsd", 66.0, mode="distill", case="distill-8b", floor=46.0),
            _row("trl_chunked", 118.0, mode="distill", case="distill-8b", floor=46.0)]
    verdicts = {v["target"]: v for v in gpu_session.evaluate_targets(rows)}
    assert verdicts["faster than Liger's JSD loss"]["ratio"] == pytest.approx(60 / 66)
    assert verdicts["faster than TRL's chunked divergence"]["ours"] == "ours_cublas"
    assert verdicts["<= 1.5x the floor"]["verdict"] == "PASS"


def test_report_and_incremental_json(tmp_path):
    session = gpu_session.Session(str(tmp_path), {"cases": []}, dry_run=True, budget=60)
    session.doc["meta"] = dict(date="2026-01-01", commit="abc", tree_sha256="0" * 16,
                               command="gpu_session.py --dry-run x", device_name="cpu",
                               cpu_model="cpu", torch_threads=2, torch="2.x",
                               device={"name": "NVIDIA H200", "driver": "580"})

    def broken(s, deadline):
        raise RuntimeError("boom")

    record = gpu_session.run_stage(session, "tests", broken)
    assert record["status"] == "crashed" and "boom" in record["error"]
    assert session.doc["problems"]  # the dry run's exit status sees it
    with open(tmp_path / "session.json") as f:  # written as the session goes
        assert json.load(f)["stages"]["tests"]["status"] == "crashed"
    session.doc["rows"] = [_row("ours_triton_gif", 40.0), _row("cce_exact", 55.0),
                           dict(_row("liger", 1.0), status="skipped", reason="not installed")]
    session.doc["targets"] = gpu_session.evaluate_targets(session.doc["rows"])
    written = gpu_session.write_report(session.doc, str(tmp_path))
    assert [os.path.basename(p) for p in written] == ["session.md", "session_llama3-8b.png"]
    text = (tmp_path / "session.md").read_text()
    assert "| ce | ours_triton_gif | 13.33 | 26.67 | 40.00 | 1.33 | 0.73 |" in text
    assert "- ce liger: skipped: not installed" in text
    assert "| tests | crashed |" in text
