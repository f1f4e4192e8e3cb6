"""One GPU session in one call: ceilings, CUDA tests, every implementation and peer at the
target cases, the planner's head term; one JSON, a table and plots in OUT_DIR.

    python benchmarks/gpu_session.py OUT_DIR              # on one H200: at most ~7 minutes
    python benchmarks/gpu_session.py --dry-run OUT_DIR    # on a CPU: every stage, tiny sizes
    python benchmarks/gpu_session.py --distill OUT_DIR    # distillation: a session of its own

Stages, in order, each with a time budget (a stage that overruns is killed and recorded; the
next one starts), the unspent time flowing to the ``heads`` stage:

1. ``peers``: install the carried wheels (``benchmarks/fetch_peer_wheels.sh`` put them in
   ``.whl/``) with ``pip install --no-deps --target`` into a fresh folder, then import every
   module the variants import, in a process set up as theirs are (``_isolate.py``).
2. ``ceilings``: the device, its copy bandwidth and a cuBLAS bf16 8192^3 GEMM (TFLOP/s).
3. ``tests``: every ``tests/**/test_*cuda*.py`` with ``TRITON_INTERPRET=0``, per test.
4. ``heads``: every variant of ours (``providers.our_backends()``, discovered at run time) and
   every peer, each in its own process over both target cases (Llama-3-8B's head, Gemma-2's
   head with softcap 30), in priority order; time = median of CUDA-event steps after
   warm-up, memory = ``max_memory_allocated`` above the inputs; each against the 6NHV floor
   at the measured GEMM rate. The next variant's process starts (imports) while one is timed.
5. ``planner``: ``planner.head_bytes`` against the memory measured in ``heads``, then
   ``planner_validate``'s own GPU cases (partly scored rows, unfused) as time allows.

``--distill`` times the distillation primitive instead (``heads`` on issue 14's case scaled to
the GPU: N = 8192, H = 4096, teacher H = 5120, V = 128256, bf16, JSD; every implementation of
ours, Liger's JSD loss and TRL's chunked divergence, naive last) after ``peers`` and
``ceilings``: about 3-5 minutes of its own, since the main session's heads stage already fills
its 7 minutes (``benchmarks/notes.md``, G7). ``--dry-run --distill`` runs it on the CPU.

``session.json`` is rewritten after every step, so a killed session leaves what it measured;
``session.md`` (tables, targets) and ``session_<case>.png`` are written at the end, and
``session.log`` holds the progress lines printed on stdout. ``--dry-run`` runs the same code
(same worker, writers and budgets) on the CPU: tiny cases, the Triton interpreter, the
compile variants with ``aot_eager``, the packages the GPU image lacks hidden; it exits 1 if
anything of ours failed, so CI can run it.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ElementTree

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import _isolate  # noqa: E402  (does nothing until main sets its environment)
import providers  # noqa: E402
import run  # noqa: E402  (build_rows: the sweep driver's row format)

# ---------------------------------------------------------------------------------------------
# What is measured
# ---------------------------------------------------------------------------------------------

# The target cases of issue 10 (N tokens, all scored): Llama-3-8B's head, and Gemma-2 2B's head
# as Cut Cross-Entropy's Table 1 measured it (135 ms / 1164 MB on an A100).
CASES = [dict(sweep="llama3-8b", N=8192, H=4096, V=128256, dtype="bf16", softcap=None),
         dict(sweep="gemma2-2b", N=8192, H=2304, V=256000, dtype="bf16", softcap=30.0)]
# The dry run: odd sizes that fit no block, a few seconds a step under the interpreter.
DRY_CASES = [dict(sweep="llama3-8b", N=16, H=16, V=150, dtype="bf16", softcap=None),
             dict(sweep="gemma2-2b", N=12, H=16, V=201, dtype="bf16", softcap=30.0)]

PEER_CE = ["cce_exact", "cce", "liger", "trl", "compile_chunked"]

# Distillation (--distill): issue 14's benchmark scaled to the GPU case of issue 10, a teacher
# one size up (H_t = 5120, a 14B-class width) over Llama-3's vocabulary; JSD, beta = 0.5.
DISTILL_CASES = [dict(sweep="distill-8b", N=8192, H=4096, teacher_H=5120, V=128256,
                      dtype="bf16", softcap=None)]
DRY_DISTILL_CASES = [dict(sweep="distill-8b", N=16, H=16, teacher_H=24, V=150, dtype="bf16",
                          softcap=None)]
PEER_DISTILL = ["liger_jsd", "trl_chunked"]


def variant_plan(backends: tuple[str, ...]) -> list[tuple[str, str]]:
    """(mode, variant) in priority order: what decides the defaults and the peer comparison
    first, so that a short session still has it. Ours: every backend but the CPU one first."""
    fast = [b for b in backends if b != "torch"]
    plan = [("ce", f"ours_{b}_{path}") for b in fast for path in ("gif", "recompute")]
    plan += [("ce", name) for name in PEER_CE]
    plan += [("logprobs", f"ours_{b}") for b in fast]
    plan += [("logprobs", f"ours_{b}_loss") for b in fast]
    plan += [("logprobs", "cce_exact"), ("logprobs", "trl")]
    plan += [("ce", f"ours_{b}_filter") for b in fast]
    if "torch" in backends:
        plan += [("ce", "ours_torch_gif"), ("logprobs", "ours_torch")]
    plan += [("ce", "naive"), ("ce", "naive_compile"), ("logprobs", "cce")]
    return plan


def distill_plan(backends: tuple[str, ...]) -> list[tuple[str, str]]:
    """``--distill``'s (mode, variant) in priority order: our CUDA default's default path and
    the peers first, then our other paths, the CPU backend, the materialised loss."""
    from fused_losses.backends import CUDA_DEFAULT

    fast = sorted((b for b in backends if b != "torch"), key=lambda b: b != CUDA_DEFAULT)
    plan = [("distill", f"ours_{b}") for b in fast[:1]]
    plan += [("distill", name) for name in PEER_DISTILL]
    plan += [("distill", f"ours_{b}") for b in fast[1:]]
    # a recompute variant only where it is another path (the Triton kernels always recompute)
    plan += [("distill", f"ours_{b}_recompute") for b in fast if b != "triton"]
    if "torch" in backends:
        plan += [("distill", "ours_torch"), ("distill", "ours_torch_recompute")]
    return plan + [("distill", "naive")]


# Seconds. The real session fits 7 minutes on one H200 (README: the arithmetic); a stage's
# unspent time goes to "heads", which is capped by what the later stages keep in reserve.
TOTAL_BUDGET = 420
BUDGETS = {"peers": 45, "ceilings": 40, "tests": 90, "heads": 300, "planner": 45}
GROUP_TIMEOUT = 150  # one variant's process, both cases (torch.compile compiles twice)
MIN_GROUP_SECONDS = 8  # do not start a variant with less left than this
# The dry run shares the CPU with whatever else runs (CI, other sessions): its budgets are
# scaled so that a timed-out stage there means a hang, not a loaded machine.
DRY_BUDGET_SCALE = 4

SETTINGS = {
    "real": dict(cases=CASES, warmup=2, repeats=5, copy_mb=4096, gemm=8192, probe_repeats=20,
                 interpret="0", compile_backend="inductor"),
    "dry": dict(cases=DRY_CASES, warmup=1, repeats=1, copy_mb=64, gemm=256, probe_repeats=3,
                interpret="1", compile_backend="aot_eager"),
}
# --distill: the cases, the plan and the stages by default
DISTILL = dict(real=DISTILL_CASES, dry=DRY_DISTILL_CASES, plan=distill_plan,
               stages=("peers", "ceilings", "heads"))

# ---------------------------------------------------------------------------------------------
# The record: one JSON, rewritten after every step
# ---------------------------------------------------------------------------------------------


class Session:
    """Everything measured so far, ``session.json`` kept current, progress on stdout."""

    def __init__(self, out_dir: str, settings: dict, dry_run: bool, budget: float):
        self.out_dir = out_dir
        self.start = time.time()
        self.scale = DRY_BUDGET_SCALE if dry_run else 1
        self.deadline = self.start + budget * self.scale
        self.stage = None
        self.log_file = open(os.path.join(out_dir, "session.log"), "w")
        self.doc = {"meta": {}, "stages": {}, "settings": settings, "rows": [],
                    "groups": [], "problems": [], "dry_run": dry_run}

    def say(self, line: str) -> None:
        stamped = f"[{time.time() - self.start:6.1f}s] {line}"
        print(stamped, flush=True)
        self.log_file.write(stamped + "\n")
        self.log_file.flush()

    def save(self) -> None:
        path = os.path.join(self.out_dir, "session.json")
        with open(path + ".tmp", "w") as f:
            json.dump(self.doc, f, indent=1, default=str)
        os.replace(path + ".tmp", path)

    def left(self) -> float:
        return self.deadline - time.time()

    def problem(self, what: str) -> None:
        """Something of ours failed (the dry run exits 1 on any)."""
        self.doc["problems"].append(f"{self.stage}: {what}" if self.stage else what)
        self.say(f"PROBLEM {what}")


def run_stage(session: Session, name: str, fn, reserve: float = 0.0) -> dict:
    """Run one stage with its budget; record status, wall time and what it returned."""
    budget = max(0.0, min(BUDGETS[name] * session.scale, session.left() - reserve))
    record = {"status": "running", "budget_s": round(budget, 1)}
    session.doc["stages"][name] = record
    session.stage = name
    session.save()
    session.say(f"stage {name}: budget {budget:.0f} s")
    t0 = time.time()
    try:
        record.update(fn(session, time.time() + budget) or {})
        if record["status"] == "running":
            record["status"] = "ok"
    except Exception as err:  # a broken stage is recorded; the session goes on
        record.update(status="crashed", error=f"{type(err).__name__}: {err}",
                      traceback=traceback.format_exc()[-3000:])
        session.problem(f"crashed: {type(err).__name__}: {err}")
    if record["status"] not in ("ok", "skipped", "crashed") and session.doc["dry_run"]:
        session.problem(f"status {record['status']}")
    record["wall_s"] = round(time.time() - t0, 1)
    session.say(f"stage {name}: {record['status']} in {record['wall_s']} s")
    session.stage = None
    session.save()
    return record


# ---------------------------------------------------------------------------------------------
# Processes: own process group, killed whole on timeout, partial output kept
# ---------------------------------------------------------------------------------------------

def start(cmd: list[str], env: dict, stdin=subprocess.DEVNULL) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=stdin, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float, feed: str | None = None):
    """(returncode or None if killed, stdout, stderr) of ``proc``, given at most ``timeout``."""
    try:
        out, err = proc.communicate(feed, timeout=max(1.0, timeout))
        return proc.returncode, out, err
    except subprocess.TimeoutExpired:
        kill(proc)
        out, err = proc.communicate()
        return None, out, err


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL the process group this session started for ``proc`` (compile workers too)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def call(cmd: list[str], env: dict, timeout: float):
    return finish(start(cmd, env), timeout)


def results_of(stdout: str) -> list[dict]:
    return [json.loads(line[len("RESULT "):]) for line in stdout.splitlines()
            if line.startswith("RESULT ")]


def tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


# ---------------------------------------------------------------------------------------------
# Stage 1: peers
# ---------------------------------------------------------------------------------------------

def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_pins(wheels: str) -> list[str]:
    """``name==version`` for each distribution with a wheel in ``wheels`` (several wheels of
    one version, one per Python, are one pin; pip picks the one this interpreter takes)."""
    pins = {}
    for path in sorted(glob.glob(os.path.join(wheels, "*.whl"))):
        name, version = os.path.basename(path).split("-")[:2]
        if pins.setdefault(_norm(name), version) != version:
            raise ValueError(f"{wheels} holds two versions of {name}: {pins[_norm(name)]} and "
                             f"{version}; run benchmarks/fetch_peer_wheels.sh again")
    return [f"{name}=={version}" for name, version in sorted(pins.items())]


def _top_level(dist) -> set[str]:
    text = dist.read_text("top_level.txt")
    if text:
        return {line.strip() for line in text.splitlines() if line.strip()}
    names = set()
    for file in dist.files or ():
        first = file.parts[0]
        if first.endswith((".dist-info", ".data")) or first in ("..", "__pycache__"):
            continue
        if len(file.parts) > 1 or first.endswith(".py"):
            names.add(first[:-3] if first.endswith(".py") else first)
    return names


def hidden_modules(image_list: str) -> list[str]:
    """Top-level modules of the distributions installed here that the GPU image lacks and
    that none of its distributions needs (their versions here may need more than there)."""
    from packaging.requirements import Requirement

    with open(image_list) as f:
        image = {_norm(line.split("#")[0].strip()) for line in f if line.split("#")[0].strip()}
    dists = {_norm(d.metadata["Name"]): d for d in importlib.metadata.distributions()}
    needed, todo = set(), [name for name in image if name in dists]
    while todo:
        name = todo.pop()
        if name in needed:
            continue
        needed.add(name)
        for spec in dists[name].requires or ():
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                if _norm(req.name) in dists:
                    todo.append(_norm(req.name))
    absent = set(dists) - needed - {"fused-losses"}
    return sorted(set().union(*(_top_level(dists[name]) for name in absent)) - {"fused_losses"})


def stage_peers(session: Session, deadline: float, ctx: dict) -> dict:
    pins = wheel_pins(ctx["wheels"]) if os.path.isdir(ctx["wheels"]) else []
    record = {"wheels": ctx["wheels"], "pins": pins, "peers_dir": ctx["peers_dir"],
              "hidden": ctx["env"].get("FL_BENCH_HIDE", "").split(",")}
    if pins:
        env = dict(os.environ, PIP_CONFIG_FILE=os.devnull)  # only the carried wheels
        code, out, err = call([sys.executable, "-m", "pip", "install", "--quiet", "--no-index",
                               "--no-deps", "--no-compile", "--no-cache-dir", "--find-links",
                               ctx["wheels"], "--target", ctx["peers_dir"], *pins], env,
                              deadline - time.time())
        record["install"] = "ok" if code == 0 else f"failed ({code}): {tail(err, 5)}"
        session.say(f"peers: pip install --target {ctx['peers_dir']}: {record['install']}")
        _isolate.install()  # this process too now sees what was carried
    else:
        record["install"] = (f"no wheels in {ctx['wheels']}: run "
                             "benchmarks/fetch_peer_wheels.sh; peers import from this "
                             "environment only")
        session.say(f"peers: {record['install']}")
    code, out, err = call([sys.executable, os.path.join(HERE, "worker.py"), "--probe",
                           "imports", "--device", "cpu"], ctx["env"], deadline - time.time())
    found = results_of(out)
    if not found or "error" in found[0]:
        record["status"] = "failed"
        session.problem(f"imports probe: {found[0]['error'] if found else tail(err, 5)}")
        return record
    record.update(found[0])
    for module, outcome in found[0]["imports"].items():
        where = outcome.get("file") or ""
        if where.startswith(ctx["peers_dir"]):
            where = "carried: " + os.path.relpath(where, ctx["peers_dir"])
        session.say(f"peers: import {module}: "
                    + (f"ok ({where})" if outcome["ok"] else outcome["error"]))
        if not outcome["ok"] and session.doc["dry_run"]:
            session.problem(f"peer import {module} fails with the GPU image's packages: "
                            f"{outcome['error']}")
    session.doc["meta"]["versions"] = found[0]["versions"]
    return record


# ---------------------------------------------------------------------------------------------
# Stage 2: ceilings
# ---------------------------------------------------------------------------------------------

def stage_ceilings(session: Session, deadline: float, ctx: dict) -> dict:
    s = ctx["settings"]
    cmd = [sys.executable, os.path.join(HERE, "worker.py"), "--probe", "device,copy,matmul",
           "--device", ctx["device"], "--copy-mb", str(s["copy_mb"]), "--N", str(s["gemm"]),
           "--dtype", "bf16", "--warmup", "3", "--repeats", str(s["probe_repeats"])]
    code, out, err = call(cmd, ctx["env"], deadline - time.time())
    found = results_of(out)
    if not found or "error" in found[0]:
        session.problem(f"ceilings: {found[0]['error'] if found else tail(err, 5)}")
        return {"status": "failed" if code is not None else "timed out", "stderr": tail(err)}
    ceil = found[0]
    ctx["rates"] = {"bf16": ceil["matmul"]}
    session.doc["meta"]["device"] = ceil["device"]
    session.doc["meta"]["device_name"] = ceil["device"]["name"]
    session.say(f"ceilings: {ceil['device']['name']}: copy {ceil['copy']['gb_per_s']:.0f} GB/s "
                f"(read + write), bf16 GEMM {s['gemm']}^3 {ceil['matmul']['tflops']:.1f} "
                f"TFLOP/s (best {ceil['matmul']['best_tflops']:.1f})")
    return ceil


# ---------------------------------------------------------------------------------------------
# Stage 3: CUDA tests
# ---------------------------------------------------------------------------------------------

def cuda_test_files() -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in
                  glob.glob(os.path.join(ROOT, "tests", "**", "test_*cuda*.py"), recursive=True))


def parse_junit(path: str) -> list[dict]:
    """Per test: id, outcome (passed / failed / error / skipped), seconds, message."""
    cases = []
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed"}.get(child.tag, child.tag)
                message = (child.get("message") or child.text or "")[:500]
        cases.append({"id": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "time_s": float(case.get("time") or 0), "message": message})
    return cases


def parse_verbose(stdout: str) -> list[dict]:
    """The same from ``pytest -v`` lines, for a run killed before it wrote its XML."""
    cases = []
    for match in re.finditer(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED)", stdout, re.M):
        cases.append({"id": match.group(1), "outcome": match.group(2).lower(), "time_s": None,
                      "message": ""})
    return cases


def stage_tests(session: Session, deadline: float, ctx: dict) -> dict:
    files = cuda_test_files()
    if not files:
        return {"status": "skipped", "reason": "no tests/**/test_*cuda*.py"}
    xml = os.path.join(ctx["scratch"], "junit.xml")
    cmd = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-rfE",
           f"--junitxml={xml}", *files]
    if importlib.util.find_spec("pytest_timeout"):
        cmd.insert(-len(files), "--timeout=60")
    env = dict(ctx["env"], TRITON_INTERPRET="0")
    code, out, err = call(cmd, env, deadline - time.time())
    cases = parse_junit(xml) if code is not None and os.path.exists(xml) else parse_verbose(out)
    counts = {k: sum(c["outcome"] == k for c in cases)
              for k in ("passed", "failed", "error", "skipped")}
    session.say(f"tests: {', '.join(f'{v} {k}' for k, v in counts.items())} "
                f"({' '.join(files)})" + ("" if code is not None else "; KILLED at the budget"))
    for case in cases:
        if case["outcome"] in ("failed", "error"):
            session.say(f"tests: {case['outcome'].upper()} {case['id']}: "
                        f"{case['message'][:200]}")
    if code is not None and code not in (0, 1, 5):  # 1: failures; 5: nothing collected
        session.problem(f"pytest exited {code}: {tail(out + err, 5)}")
    return {"status": "ok" if code is not None else "timed out", "files": files,
            "returncode": code, "counts": counts, "cases": cases, "tail": tail(out, 30)}


# ---------------------------------------------------------------------------------------------
# Stage 4: heads
# ---------------------------------------------------------------------------------------------

def job_list(mode: str, variant: str, cases: list[dict]) -> list[dict]:
    return [{"mode": mode, "variant": variant, **{k: c[k] for k in
                                                  ("N", "H", "V", "dtype", "softcap",
                                                   "teacher_H") if k in c}}
            for c in cases]


def case_of(job: dict, cases: list[dict]) -> dict:
    return next(c for c in cases if all(c[k] == job[k] for k in ("N", "H", "V", "dtype")))


def _worker_cmd(ctx: dict, jobs: list[dict]) -> list[str]:
    s = ctx["settings"]
    return [sys.executable, os.path.join(HERE, "worker.py"), "--wait", "--device",
            ctx["device"], "--warmup", str(s["warmup"]), "--repeats", str(s["repeats"]),
            "--jobs", json.dumps(jobs)]


AUTOTUNE_LINE = re.compile(r"(autotuning|best config)", re.I)


def stage_heads(session: Session, deadline: float, ctx: dict) -> dict:
    cases = ctx["settings"]["cases"]
    plan = [(mode, name) for mode, name in ctx["plan"](providers.our_backends())
            if _known(mode, name)]
    runnable, raw, skipped = [], {}, {}
    for mode, name in plan:
        reason = providers.skip_reason(providers.get(mode, name), ctx["device"])
        if reason:
            for case in cases:
                skipped[_key(case, mode, name)] = reason
            session.say(f"heads: skip {mode} {name}: {reason}")
        else:
            runnable.append((mode, name))
    ctx["heads_plan"] = plan
    procs = {}  # index -> started process (the next variant's, importing while one is timed)

    def launch(i):
        if i < len(runnable) and i not in procs:
            procs[i] = start(_worker_cmd(ctx, job_list(*runnable[i], cases)), ctx["env"],
                             stdin=subprocess.PIPE)

    for i, (mode, name) in enumerate(runnable):
        left = deadline - time.time()
        if left < MIN_GROUP_SECONDS:
            for j in range(i, len(runnable)):
                for case in cases:
                    skipped[_key(case, *runnable[j])] = (
                        f"not run: the heads stage's budget was spent "
                        f"({session.doc['stages']['heads']['budget_s']} s)")
            session.say(f"heads: budget spent; {len(runnable) - i} variants not run")
            break
        launch(i)
        launch(i + 1)
        t0 = time.time()
        timeout = min(GROUP_TIMEOUT * session.scale, left)
        code, out, err = finish(procs.pop(i), timeout, feed="go\n")
        group = {"mode": mode, "variant": name, "returncode": code,
                 "wall_s": round(time.time() - t0, 1),
                 "autotune": [ln for ln in (out + err).splitlines()  # Triton prints them
                              if AUTOTUNE_LINE.search(ln)][-20:]}
        results = results_of(out)
        for result in results:
            case = case_of(result.pop("job"), cases)
            key = _key(case, mode, name)
            if "skipped" in result:
                skipped[key] = result["skipped"]
            else:
                raw[key] = [result]
            session.say(f"heads: {mode:8} {name:24} {case['sweep']:10} "
                        + _brief(result, ctx, dict(case, mode=mode)))
            if "error" in result and session.doc["dry_run"] and name.startswith("ours_"):
                session.problem(f"{mode} {name} {case['sweep']}: {result['error']}")
        if code != 0 or len(results) < len(cases):
            why = f"killed at {timeout:.0f} s" if code is None else f"exit {code}"
            group["stderr"] = tail(err)
            for case in cases:
                raw.setdefault(_key(case, mode, name), [{"error": f"worker {why}: "
                                                                  f"{tail(err, 1)[:300]}"}])
            session.say(f"heads: {mode} {name}: worker {why}")
            if session.doc["dry_run"]:
                session.problem(f"{mode} {name}: worker {why}: {tail(err, 3)}")
        session.doc["groups"].append(group)
        session.doc["rows"] = rows_of(plan, cases, raw, skipped, ctx)
        session.save()
    for proc in procs.values():  # started ahead but never given the go
        kill(proc)
        proc.communicate()
    session.doc["rows"] = rows_of(plan, cases, raw, skipped, ctx)
    return {"variants_planned": len(plan), "variants_run": len(session.doc["groups"])}


def _known(mode: str, name: str) -> bool:
    try:
        providers.get(mode, name)
        return True
    except ValueError:
        return False


def _key(case: dict, mode: str, name: str) -> tuple:
    return (case["sweep"], mode, case["N"], case["H"], case["V"], case["dtype"], name)


def _brief(result: dict, ctx: dict, case: dict) -> str:
    if "skipped" in result:
        return f"skipped: {result['skipped']}"
    if "error" in result:
        return f"ERROR {result['error']}"
    ms = result["fwdbwd_ms"]["median"]
    rate = ctx.get("rates", {}).get(case["dtype"], {}).get("tflops")
    floor = f"  {ms / (run.floor_flops(case) / rate / 1e9):5.2f}x floor" if rate else ""
    return (f"{ms:9.2f} ms{floor}  {result['peak_mb']:9.1f} MB above inputs "
            f"({result['peak_mb'] - result['grads_mb']:8.1f} above grads)")


def rows_of(plan, cases, raw, skipped, ctx) -> list[dict]:
    """run.py's rows (floor, x_floor), one per (case, mode, variant), plus the case's label."""
    by_case = []
    for case in cases:
        for mode in dict.fromkeys(m for m, _ in plan):
            names = [n for m, n in plan if m == mode]
            keys = [_key(case, mode, n) for n in names]
            if not any(k in raw or k in skipped for k in keys):
                continue
            full = dict(case, mode=mode)
            by_case.append((full, [n for n, k in zip(names, keys) if k in raw or k in skipped]))
    rows = run.build_rows(by_case, raw, skipped, ctx.get("rates", {}))
    softcaps = {c["sweep"]: c["softcap"] for c in cases}
    for row in rows:
        row["softcap"] = softcaps.get(row["sweep"])
        result = (raw.get(_key(row, row["mode"], row["variant"])) or [{}])[-1]
        for extra in ("persistent_mb", "leftover_mb", "note", "timer"):
            if extra in result:
                row[extra] = result[extra]
    return rows


# ---------------------------------------------------------------------------------------------
# Stage 5: planner
# ---------------------------------------------------------------------------------------------

def planner_backends() -> tuple[str, ...]:
    """Every registered backend: planner.head_bytes has a term for each (its test checks)."""
    return providers.our_backends()


# The dry run's planner_validate cases: every backend x path and the unfused head at a tiny
# size, 75% of rows scored, chunk budgets that make several chunks (a few seconds in all).
DRY_PLANNER_CASES = [dict(rows=64, hidden=32, vocab=1000, dtype="float32", scored=0.75,
                          chunk_bytes=16 << 10, torch_chunk_bytes=64 << 10, **kind)
                     for kind in [dict(impl="unfused", api="ce")]
                     + [dict(impl="fused", backend=b, path=p, api="ce")
                        for b in ("torch", "triton", "cublas")
                        for p in ("one-pass", "recompute")]]


def planner_path(mode: str, name: str) -> tuple[str, str] | None:
    """(backend, planner path) of one of our variants, None where the planner models none
    (filtering: the torch backend's filter mask is not counted)."""
    match = re.fullmatch(r"ours_([a-z0-9]+?)(_gif|_recompute|_loss)?", name)
    if not match or match.group(1) not in planner_backends():
        return None
    backend, suffix = match.group(1), match.group(2)
    paths = {("logprobs", None): "recompute",      # linear_logprobs + autograd
             ("logprobs", "_loss"): "one-pass",    # linear_logprobs_loss, token groups
             ("ce", None): "one-pass",             # linear_cross_entropy's default (mean)
             ("ce", "_gif"): "one-pass",
             ("ce", "_recompute"): "recompute"}
    path = paths.get((mode, suffix))
    return None if path is None else (backend, path)


def stage_planner(session: Session, deadline: float, ctx: dict) -> dict:
    from fused_losses import planner, planner_validate

    against_heads = []
    for row in session.doc["rows"]:
        mapped = planner_path(row["mode"], row["variant"])
        if row["status"] != "ok" or mapped is None:
            continue
        backend, path = mapped
        dtype = {"bf16": "bfloat16", "fp32": "float32"}.get(row["dtype"])
        if dtype is None:
            continue
        chunking = planner.GPU_CHUNKING if ctx["device"] != "cpu" else \
            planner.Chunking.interpreter()
        predicted = planner.head_bytes("fused", rows=row["N"], scored=row["N"],
                                       hidden=row["H"], vocab=row["V"], dtype=dtype,
                                       backend=backend, path=path,
                                       softcap=row.get("softcap") is not None,
                                       chunking=chunking) / 2 ** 20
        measured = row["peak_mb"]
        against_heads.append(dict(case=row["sweep"], mode=row["mode"], variant=row["variant"],
                                  backend=backend, path=path, predicted_mb=predicted,
                                  measured_mb=measured, error=(predicted - measured) / measured))
        session.say(f"planner: {row['sweep']} {row['mode']} {row['variant']}: predicted "
                    f"{predicted:.1f} MiB, measured {measured:.1f} MiB "
                    f"({against_heads[-1]['error']:+.1%})")
    cases = DRY_PLANNER_CASES if ctx["device"] == "cpu" else planner_validate.CUDA_CASES
    script = ("import json, sys\n"
              "from fused_losses import planner_validate as pv\n"
              "for case in json.loads(sys.argv[1]):\n"
              "    try:\n"
              "        out = dict(case, predicted=pv.predict(case), measured=pv.measure(case))\n"
              "    except Exception as err:\n"
              "        out = dict(case, error=f'{type(err).__name__}: {err}'[:300])\n"
              "    print('RESULT ' + json.dumps(out), flush=True)\n")
    code, out, err = call([sys.executable, "-c", script, json.dumps(cases)], ctx["env"],
                          deadline - time.time())
    validated = results_of(out)
    for case in validated:
        if "error" in case:
            session.problem(f"planner_validate {planner_validate.describe(case)}: "
                            f"{case['error']}")
            continue
        case["error"] = (case["predicted"] - case["measured"]) / case["measured"]
        session.say(f"planner: validate {planner_validate.describe(case):28} M={case['rows']} "
                    f"H={case['hidden']} V={case['vocab']}: predicted "
                    f"{case['predicted'] / 2**20:.1f} MiB, measured "
                    f"{case['measured'] / 2**20:.1f} MiB ({case['error']:+.1%})")
    return {"against_heads": against_heads, "validate": validated,
            "validate_not_run": len(cases) - len(validated),
            "status": "ok" if code is not None else "timed out"}


# ---------------------------------------------------------------------------------------------
# Targets (issue 10, item 5) and the report
# ---------------------------------------------------------------------------------------------

# (label, peer variant or None for an absolute bound, metric, bound): ours = the fastest of our
# exact cross-entropy variants (filtering excluded) in the same case.
TARGETS = [
    ("<= 1.5x the 6NHV floor", None, "x_floor", 1.5),
    ("<= 0.8x Cut Cross-Entropy exact", "cce_exact", "fwdbwd_ms", 0.8),
    ("<= 1.0x Cut Cross-Entropy default (filtered)", "cce", "fwdbwd_ms", 1.0),
    ("faster than TRL's fused head", "trl", "fwdbwd_ms", 1.0),
    ("faster than Liger's fused linear cross-entropy", "liger", "fwdbwd_ms", 1.0),
    ("peak above inputs and gradients <= 64 MB", None, "peak_above_grads_mb", 64.0),
]
# Distillation (--distill): issue 14 sets targets on the CPU only; on the GPU ours (the fastest
# of our variants) is reported against its floor (2N(H + H_t)V + 4NHV) and the peers.
DISTILL_TARGETS = [
    ("<= 1.5x the floor", None, "x_floor", 1.5),
    ("faster than Liger's JSD loss", "liger_jsd", "fwdbwd_ms", 1.0),
    ("faster than TRL's chunked divergence", "trl_chunked", "fwdbwd_ms", 1.0),
]
TARGETS_BY_MODE = {"ce": TARGETS, "distill": DISTILL_TARGETS}


def best_ours(rows: list[dict], case: str, mode: str = "ce") -> dict | None:
    """Our fastest row of ``mode`` in ``case`` (what ``auto`` should pick); exact only."""
    ours = [r for r in rows if r["sweep"] == case and r["mode"] == mode and r["status"] == "ok"
            and r["variant"].startswith("ours_") and not r["variant"].endswith("_filter")]
    return min(ours, key=lambda r: r["fwdbwd_ms"]) if ours else None


def evaluate_targets(rows: list[dict]) -> list[dict]:
    verdicts = []
    for case, mode in dict.fromkeys((r["sweep"], r["mode"]) for r in rows):
        ours = best_ours(rows, case, mode)
        if ours is None or mode not in TARGETS_BY_MODE:
            continue
        for label, peer, metric, bound in TARGETS_BY_MODE[mode]:
            value = ours.get(metric)
            if peer is None:
                ref, ratio = None, value
            else:
                other = next((r for r in rows if r["sweep"] == case and r["mode"] == mode
                              and r["variant"] == peer and r["status"] == "ok"), None)
                if other is None:
                    continue
                ref, ratio = other[metric], value / other[metric]
            if ratio is None:
                continue
            verdicts.append(dict(case=case, mode=mode, target=label, ours=ours["variant"],
                                 value=value, reference=ref, ratio=ratio, bound=bound,
                                 verdict="PASS" if ratio <= bound else "MISS"))
    return verdicts


def _num(value, spec=".1f") -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "-"


def markdown(doc: dict) -> str:
    meta, stages = doc["meta"], doc["stages"]
    device = meta.get("device") or {}
    versions = meta.get("versions") or {}
    out = [f"# GPU session{' (dry run, CPU)' if doc['dry_run'] else ''}: "
           f"{device.get('name', meta.get('device_name'))}, {meta['date']}", "",
           f"commit `{meta['commit']}`, source tree sha256 `{meta['tree_sha256']}`; driver "
           f"{device.get('driver')}, CUDA {device.get('cuda_runtime')}; "
           + ", ".join(f"{k} {v}" for k, v in versions.items() if v), "",
           f"Command: `{meta['command']}`", "", "| stage | status | wall s | budget s |",
           "|---|---|---:|---:|"]
    out += [f"| {name} | {st['status']} | {st.get('wall_s', '-')} | {st['budget_s']} |"
            for name, st in stages.items()]
    ceil = stages.get("ceilings", {})
    if "matmul" in ceil:
        out += ["", f"**Ceilings.** Device-to-device copy {ceil['copy']['gb_per_s']:.0f} GB/s "
                f"(bytes read + written); cuBLAS bf16 {ceil['matmul']['size']}^3 GEMM "
                f"{ceil['matmul']['tflops']:.1f} TFLOP/s (median; best "
                f"{ceil['matmul']['best_tflops']:.1f}). The floor below is each case's fewest "
                "FLOPs (6NHV; distillation 2N(H + H_t)V + 4NHV) at the median rate."]
    tests = stages.get("tests", {})
    if "counts" in tests:
        out += ["", "**CUDA tests** (`" + " ".join(tests["files"]) + "`, TRITON_INTERPRET=0): "
                + ", ".join(f"{v} {k}" for k, v in tests["counts"].items()) + "."]
        out += [f"- {c['outcome']}: `{c['id']}`: {c['message'][:200]}" for c in tests["cases"]
                if c["outcome"] in ("failed", "error")]
    for case in dict.fromkeys(r["sweep"] for r in doc["rows"]):
        rows = [r for r in doc["rows"] if r["sweep"] == case]
        first = rows[0]
        floor = next((r["floor_ms"] for r in rows if r.get("floor_ms")), None)
        teacher = first.get("teacher_H")
        out += ["", f"## {case}: N={first['N']} H={first['H']}"
                + (f" (teacher H={teacher})" if teacher else "")
                + f" V={first['V']} {first['dtype']}"
                + (f", softcap {first['softcap']}" if first.get("softcap") else "")
                + (f"; floor ({'2N(H + H_t)V + 4NHV' if teacher else '6NHV'}) {floor:.2f} ms"
                   if floor else ""), "",
                "| mode | variant | fwd ms | bwd ms | fwd+bwd ms | x floor | x CCE exact | "
                "peak MB above inputs | above inputs+grads | kept between steps MB |",
                "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        cce = {r["mode"]: r for r in rows if r["variant"] == "cce_exact" and r["status"] == "ok"}
        for r in rows:
            if r["status"] != "ok":
                continue
            ref = cce.get(r["mode"])
            out.append(f"| {r['mode']} | {r['variant']} | {_num(r['fwd_ms'], '.2f')} | "
                       f"{_num(r['bwd_ms'], '.2f')} | {_num(r['fwdbwd_ms'], '.2f')} | "
                       f"{_num(r.get('x_floor'), '.2f')} | "
                       f"{_num(r['fwdbwd_ms'] / ref['fwdbwd_ms'] if ref else None, '.2f')} | "
                       f"{_num(r['peak_mb'])} | {_num(r['peak_above_grads_mb'])} | "
                       f"{_num(r.get('persistent_mb'))} |")
        not_ok = [r for r in rows if r["status"] != "ok"]
        if not_ok:
            out += ["", "Not measured:"] + [f"- {r['mode']} {r['variant']}: {r['status']}: "
                                            f"{r['reason']}" for r in not_ok]
        notes = [r for r in rows if r.get("note")]
        out += [f"- note, {r['mode']} {r['variant']}: {r['note']}" for r in notes]
    if doc.get("targets"):
        out += ["", "## Targets (issue 10, item 5; distillation against its peers; reported, "
                "never asserted)", "",
                "| case | target | ours | value | peer | ratio | bound | verdict |",
                "|---|---|---|---:|---:|---:|---:|---|"]
        out += [f"| {v['case']} | {v['target']} | {v['ours']} | {_num(v['value'], '.2f')} | "
                f"{_num(v['reference'], '.2f')} | {v['ratio']:.2f} | {v['bound']} | "
                f"{v['verdict']} |" for v in doc["targets"]]
        if any(v["mode"] == "ce" for v in doc["targets"]):
            out += ["", "Cut Cross-Entropy's paper: Gemma-2 2B's head, loss + gradient, 135 ms / "
                    "1164 MB on an A100."]
        fastest = {(v["case"], v["mode"]): v["ours"] for v in doc["targets"]}
        out += ["", f"`backend=\"auto\"` on CUDA picks `{meta.get('auto_on_cuda')}`; our "
                "fastest exact variant: " + ", ".join(f"{case} {mode} `{name}`" for
                                                      (case, mode), name in fastest.items())
                + "."]
    planner_record = stages.get("planner", {})
    pairs = planner_record.get("against_heads", []) + [
        dict(case=f"M={c['rows']} H={c['hidden']} V={c['vocab']} {c['dtype']}",
             mode=c.get("path", c["api"]), variant=c["impl"] if c["impl"] == "unfused"
             else f"{c['backend']} {c['api']}",
             predicted_mb=c["predicted"] / 2**20, measured_mb=c["measured"] / 2**20,
             error=c["error"]) for c in planner_record.get("validate", []) if "measured" in c]
    if pairs:
        out += ["", "## Planner head term (`planner.head_bytes`) against measured memory", "",
                "| case | mode / path | variant | predicted MiB | measured MiB | error |",
                "|---|---|---|---:|---:|---:|"]
        out += [f"| {p['case']} | {p['mode']}" + (f" / {p['path']}" if "path" in p else "")
                + f" | {p['variant']} | {p['predicted_mb']:.1f} | "
                f"{p['measured_mb']:.1f} | {p['error']:+.1%} |" for p in pairs]
    if doc["problems"]:
        out += ["", "## Problems", ""] + [f"- {p}" for p in doc["problems"]]
    return "\n".join(out) + "\n"


def write_report(doc: dict, out_dir: str) -> list[str]:
    """session.md, and one plot per case (plot.plot_session)."""
    path = os.path.join(out_dir, "session.md")
    with open(path, "w") as f:
        f.write(markdown(doc))
    import plot

    return [path] + plot.plot_session(doc, out_dir)


# ---------------------------------------------------------------------------------------------
# Meta, identity of the code measured
# ---------------------------------------------------------------------------------------------

def tree_hash() -> str:
    """sha256 over the library's and the benchmarks' source files: names the code measured
    where the GPU machine's copy of the tree has no git history."""
    digest = hashlib.sha256()
    for folder in ("fused_losses", "kernels", "benchmarks"):
        for path in sorted(glob.glob(os.path.join(ROOT, folder, "**", "*.py"), recursive=True)):
            digest.update(os.path.relpath(path, ROOT).encode())
            with open(path, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()[:16]


def git_commit() -> str | None:
    """HEAD (+dirty when the library, kernels or benchmarks differ from it), or None."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT,
                              capture_output=True, text=True, timeout=20)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "fused_losses",
                                "kernels", "benchmarks"], cwd=ROOT, capture_output=True,
                               text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def session_meta(args, device: str) -> dict:
    """Who ran what, where; the ceilings stage adds the GPU, the peers stage the versions
    (this process never initialises CUDA and never imports a peer)."""
    import platform

    import torch

    try:
        from fused_losses.backends import CUDA_DEFAULT as auto_on_cuda
    except ImportError:  # before the backends package
        auto_on_cuda = None
    return {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "backends": list(providers.our_backends()), "auto_on_cuda": auto_on_cuda,
            "command": " ".join(shlex.quote(a) for a in sys.argv), "device": None,
            "device_name": device, "dry_run": args.dry_run, "distill": args.distill,
            # The caller's word first: the device's copy of the tree can carry a stale git
            # index (the first H200 session reported a commit weeks old, "+dirty").
            "commit": os.environ.get("FL_COMMIT") or git_commit() or "unknown",
            "tree_sha256": tree_hash(), "cpu_model": run._cpu_model(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "platform": platform.platform(), "loadavg_start": os.getloadavg()}


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

STAGES = ("peers", "ceilings", "tests", "heads", "planner")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__)
    ap.add_argument("out_dir", help="where session.json, session.md, the plots and the log go")
    ap.add_argument("--dry-run", action="store_true",
                    help="on the CPU: tiny cases, the interpreter, the GPU image's packages")
    ap.add_argument("--wheels", default=os.path.join(ROOT, ".whl"),
                    help="folder of peer wheels (benchmarks/fetch_peer_wheels.sh)")
    ap.add_argument("--distill", action="store_true",
                    help="time the distillation primitive and its peers instead (stages "
                         f"{','.join(DISTILL['stages'])} unless --stages says otherwise)")
    ap.add_argument("--stages", default=None,
                    help=f"comma list, in this order: {','.join(STAGES)} (default: all)")
    ap.add_argument("--budget", type=float, default=TOTAL_BUDGET,
                    help="seconds for the whole session (stages keep their own caps)")
    args = ap.parse_args(argv)
    stages = args.stages.split(",") if args.stages else \
        list(DISTILL["stages"] if args.distill else STAGES)
    if set(stages) - set(STAGES):
        print(f"--stages: unknown {sorted(set(stages) - set(STAGES))}; valid: {STAGES}",
              file=sys.stderr)
        return 2

    import torch

    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        print("no CUDA device: run with --dry-run on a CPU", file=sys.stderr)
        return 2
    os.makedirs(args.out_dir, exist_ok=True)
    settings = SETTINGS["dry" if args.dry_run else "real"]
    if args.distill:
        settings = dict(settings, cases=DISTILL["dry" if args.dry_run else "real"])
    session = Session(args.out_dir, settings, args.dry_run, args.budget)
    scratch = tempfile.mkdtemp(prefix="fl_session_")
    peers_dir = os.path.join(scratch, "peers")
    os.environ["TRITON_INTERPRET"] = settings["interpret"]  # providers.skip_reason reads it
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               TRITON_CACHE_AUTOTUNING="1", TRITON_PRINT_AUTOTUNING="1",
               **{providers.COMPILE_BACKEND_ENV: settings["compile_backend"]})
    env["FL_BENCH_PEERS"] = peers_dir
    env["FL_BENCH_HIDE"] = ",".join(hidden_modules(
        os.path.join(HERE, "gpu_image_packages.txt"))) if args.dry_run else ""
    # This process decides which variants can run (providers.skip_reason): it sees the
    # carried peers as the workers do, and nothing the GPU image lacks.
    os.makedirs(peers_dir)
    os.environ.update(FL_BENCH_PEERS=peers_dir, FL_BENCH_HIDE=env["FL_BENCH_HIDE"])
    _isolate.install()
    ctx = {"settings": settings, "device": "cuda" if cuda else "cpu", "env": env,
           "plan": distill_plan if args.distill else variant_plan,
           "wheels": args.wheels, "peers_dir": peers_dir, "scratch": scratch}
    session.doc["meta"] = session_meta(args, ctx["device"])
    session.say(f"fused-losses GPU session{' (dry run)' if args.dry_run else ''}: commit "
                f"{session.doc['meta']['commit']}, tree {session.doc['meta']['tree_sha256']}, "
                f"torch {torch.__version__}, out {args.out_dir}")

    reserve = {"heads": BUDGETS["planner"] * session.scale if "planner" in stages else 0.0}
    for name in STAGES:
        if name in stages:
            fn = globals()[f"stage_{name}"]
            run_stage(session, name, lambda s, d, fn=fn: fn(s, d, ctx), reserve.get(name, 0.0))
    session.doc["targets"] = evaluate_targets(session.doc["rows"])
    for path in write_report(session.doc, args.out_dir):
        session.say(f"wrote {path}")
    session.doc["meta"]["wall_s"] = round(time.time() - session.start, 1)
    session.save()
    failed = {p.split(":")[0] for p in session.doc["problems"]} & set(session.doc["stages"])
    session.say(f"done in {session.doc['meta']['wall_s']} s; "
                f"{len(session.doc['problems'])} problems")
    # The plain closing line CI reads: a stage passes when it ran and nothing of ours failed.
    print(f"stages: {len(session.doc['stages']) - len(failed)} passed, {len(failed)} failed")
    return 1 if (args.dry_run and session.doc["problems"]) else 0


if __name__ == "__main__":
    sys.exit(main())
