"""tools/gpu_check.sh, checked on the CPU: --dry-run runs nothing, and its plan fits the device's
window (every step under tools/gpu_step.py with its limit, the limits adding up to 420 s) with
commands its tools accept (bench options and recipe overrides validated, each batch within its
data, the GPU tests split between two steps with none lost), at most 8 files under OUT; and
gpu_step.py leaves no process (nor temporary file) behind, at its limit or after the command ends."""
import json
import os
import shlex
import subprocess
import sys
import time

from conftest import ROOT

STEPS = ["install-wheels", "install-deepspeed", "gpu-tests", "cmla-b256-plain", "cmla-b256-cached",
         "cmla-b4096-cached", "vs-open-clip", "compiled-test", "cmla-b256-compiled"]


def _epoch_size(cfg) -> int:
    """Samples in an epoch of the recipe's training data (a global batch larger than that stops the run)."""
    if cfg.data.type == "synthetic":
        return cfg.data.num_samples
    from mmscale.data.images import load_splits
    return len(load_splits(cfg.data).train)


def test_dry_run_plans_commands_the_tools_accept(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    # a comparison's JSON as the bench writes it: the report leads with its ratios
    bench = {"global_batch": 256, "precision": "bf16", "device": "NVIDIA H100 80GB HBM3", "vs_open_clip": 1.3,
             "open_clip": {"samples_per_s": 1600.0, "data_fraction": 0.012, "workers": 10},
             "vs_bare_open_clip": {"ratio": 0.97, "mmscale_samples_per_s": 2000.0, "bare_samples_per_s": 2061.9,
                                   "steps": 10}}
    (out / "vs_open_clip.json").write_text(json.dumps(bench))
    proc = subprocess.run(["bash", "tools/gpu_check.sh", "--dry-run", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    plan = [line[3:].split("] ", 1) for line in proc.stdout.splitlines() if line.startswith("+ [")]
    assert [head.split(",")[0] for head, _ in plan] == STEPS
    limits = [int(head.split(", ")[1].split()[0]) for head, _ in plan]
    assert sum(limits) <= 420 and f"= the steps' limits: {sum(limits)} s in all" in proc.stdout
    from mmscale.cli.bench import build_parser
    from mmscale.config import load_config
    jsons, pytest_k = [], []
    for (head, line), limit in zip(plan, limits):
        argv = shlex.split(line)
        # every step runs under the runner, with its own limit
        assert argv[:3] == [sys.executable, "tools/gpu_step.py", str(limit)], argv
        command = argv[3:]
        if "tools/bench.py" in command:
            args = build_parser().parse_intermixed_args(command[command.index("tools/bench.py") + 1:])
            over = list(args.overrides) + [f"train.global_batch_size={args.batch}",
                                           f"train.grad_cache_chunk={args.chunk}", f"train.precision={args.precision}"]
            cfg = load_config(os.path.join(ROOT, args.recipe), over)  # raises on a bad key or value
            assert args.batch <= _epoch_size(cfg), (head, "the batch is larger than the data's epoch")
            assert cfg.train.zero_stage == 0  # one GPU: ZeRO 1-3 would only copy gradients around
            jsons.append(args.json)
        elif "pytest" in command:
            assert command[command.index("-m", command.index("pytest")) + 1] == "gpu"
            pytest_k.append(command[command.index("-k") + 1])
    assert "--vs-open-clip ViT-B-16 --open-clip-workers 10 --batch 256" in proc.stdout
    assert sorted(int(c.split("--batch ")[1].split()[0]) for _, c in plan if "--chunk 128" in c) == [256, 4096]
    assert len(set(jsons)) == len(jsons) == 5 and all(j.startswith(str(out)) for j in jsons)
    # + the 5 JSON of a real run = 7, of the 8 files a device run returns
    assert sorted(os.listdir(out)) == ["log.txt", "report.md", "vs_open_clip.json"]
    report = (out / "report.md").read_text()
    assert "| gpu-tests | 75 | dry-run |" in report and f"| total | {sum(limits)} |" in report
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in report.splitlines() if line.startswith("| ")}
    assert all(len(rows[name][4]) > 40 for name in STEPS)  # each step says what it proves
    first = report.split("\n- date")[0]
    assert ("mmscale / open_clip's model in a bare torch loop = 0.97" in first and "mmscale / open_clip = 1.30" in first
            and "its data wait 1.2% of its step time with 10 loader workers" in first), first
    # the two pytest steps split the GPU tests: -k "not compiled" and -k compiled, none left out
    assert pytest_k == ["not compiled", "compiled"]
    collected = subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only", "-m", "gpu",
                                "tests/test_gpu.py", "-p", "no:cacheprovider"], cwd=ROOT, capture_output=True,
                               text=True, timeout=120)
    ids = [line for line in collected.stdout.splitlines() if line.startswith("tests/test_gpu.py::")]
    assert len(ids) >= 10, collected.stdout
    assert [i for i in ids if "compiled" in i.lower()] == ["tests/test_gpu.py::test_compiled_matches_eager_on_the_gpu"]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# a step's command whose processes escape a process-group kill, as the GPU tests' do: a child in a
# session of its own (a training launch) with a child of its own (a loader worker), and a daemon
# whose parent exits at once (orphaned); it writes their pids and its temporary folder, leaves a
# file there, then sleeps or exits with code 3
ESCAPING = """
import os, subprocess, sys, time
launch = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
    "w = subprocess.Popen(['sleep', '300']); print(w.pid, flush=True); time.sleep(300)"],
    start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
worker = launch.stdout.readline().strip()
daemon = subprocess.run(["setsid", "sh", "-c", "sleep 300 >/dev/null 2>&1 & echo $!"], capture_output=True,
                        text=True).stdout.strip()
import tempfile
open(tempfile.mkstemp()[1], "w").write("a step's temporary file")
open(sys.argv[1], "w").write(f"{launch.pid} {worker} {daemon} {tempfile.gettempdir()}")
time.sleep(300) if sys.argv[2] == "hang" else sys.exit(3)
"""


def _run_step(tmp_path, limit, how):
    pids = tmp_path / f"{how}.pids"
    tic = time.time()
    proc = subprocess.run([sys.executable, "tools/gpu_step.py", str(limit), sys.executable, "-c", ESCAPING,
                           str(pids), how], cwd=ROOT, capture_output=True, text=True, timeout=60)
    *started, tmp = pids.read_text().split()
    started = [int(p) for p in started]
    assert len(started) == 3 and os.path.basename(tmp).startswith("gpu-step-")  # the step's own TMPDIR
    deadline = time.time() + 10  # a zombie the runner missed would go to init, which reaps it
    while any(map(_alive, started)) and time.time() < deadline:
        time.sleep(0.1)
    assert not os.path.exists(tmp)  # removed with the step
    return proc, started, time.time() - tic


def test_a_step_that_runs_out_leaves_no_process_behind(tmp_path):
    proc, started, seconds = _run_step(tmp_path, 4, "hang")
    assert proc.returncode == 124, proc.stderr
    assert "4 s limit reached" in proc.stderr and seconds < 20
    assert not [p for p in started if _alive(p)], "processes of a timed-out step are still running"


def test_what_a_finished_step_left_running_is_killed(tmp_path):
    proc, started, _ = _run_step(tmp_path, 60, "exit")
    assert proc.returncode == 3, proc.stderr  # the command's own code
    assert "left 3 process(es) running, killed" in proc.stderr
    assert not [p for p in started if _alive(p)]


def test_a_launched_run_past_its_timeout_is_killed_with_its_workers():
    """helpers.finish on a run that hangs: the test fails, and the run (a session of its own, as
    launch starts it) and its worker are gone, not left running into the next test or GPU step."""
    import pytest
    from helpers import finish
    # the worker writes nothing, so only its being killed, not the pipe, decides when it ends
    run = subprocess.Popen([sys.executable, "-c", "import subprocess, time; w = subprocess.Popen(['sleep', '300'], "
                            "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); print(w.pid, flush=True); "
                            "time.sleep(300)"], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    worker = int(run.stdout.readline())
    with pytest.raises(AssertionError, match="did not end in 1 s"):
        finish(run, timeout=1)
    deadline = time.time() + 10
    while _alive(worker) and time.time() < deadline:
        time.sleep(0.1)
    assert run.returncode is not None and not _alive(worker)
