"""What a run reports: TensorBoard events equal to metrics.jsonl's scalars, a progress display
that is one plain line per logged record off a terminal (a tqdm bar on one), rank 0 only, and
every command-line option's help naming its default."""
import argparse
import importlib
import importlib.util
import io
import os
import subprocess
import tomllib

import pytest

from conftest import PY, ROOT, free_port
from helpers import read_jsonl
from mmscale.engine.logger import MetricsLogger, scalars


def tensorboard_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(folder, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def jsonl_scalars(records) -> dict[str, list[tuple[int, float]]]:
    out = {}
    for r in records:
        for k, v in scalars(r).items():
            out.setdefault(k, []).append((r["step"], v))
    return out


def assert_same_scalars(tb, expected):
    assert sorted(tb) == sorted(expected)
    for tag, points in expected.items():
        assert [s for s, _ in tb[tag]] == [s for s, _ in points], tag
        assert [v for _, v in tb[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag


def test_tensorboard_holds_every_numeric_scalar_of_the_jsonl(tmp_path):
    path, tb = str(tmp_path / "metrics.jsonl"), str(tmp_path / "tensorboard")
    logger = MetricsLogger(path, rank=0, tensorboard=tb)
    logger.log({"event": "resumed", "step": 0, "checkpoint": "x"})  # an event: jsonl only
    for step in (10, 20):
        logger.log({"step": step, "epoch": 0, "loss": 4.0 - step / 100, "lr": 1e-3 * step,
                    "temperature": 0.07, "samples_per_s": 250.5, "skipped_samples": 0,
                    "note": "text stays out", "flag": True})
    logger.log({"step": 20, "zeroshot/top1": 0.25, "zeroshot/top5": 0.75, "train/loss": 3.9})
    # flushed on every log: a live `tensorboard --logdir` sees it before the run ends
    live = tensorboard_scalars(tb)
    logger.close()

    records = read_jsonl(path)
    assert len(records) == 4
    expected = jsonl_scalars(records)
    assert sorted(expected) == ["epoch", "loss", "lr", "samples_per_s", "skipped_samples", "temperature",
                                "train/loss", "zeroshot/top1", "zeroshot/top5"]
    assert_same_scalars(live, expected)
    assert_same_scalars(tensorboard_scalars(tb), expected)


def test_other_ranks_write_and_print_nothing(tmp_path):
    stream = io.StringIO()
    logger = MetricsLogger(str(tmp_path / "metrics.jsonl"), rank=1, tensorboard=str(tmp_path / "tb"))
    bar = logger.progress(10, 0, stream=stream)
    bar.step()
    logger.log({"step": 1, "loss": 1.0, "lr": 0.1})
    logger.close()
    assert os.listdir(tmp_path) == [] and stream.getvalue() == ""


def test_off_a_terminal_one_plain_line_per_logged_record(tmp_path):
    stream = io.StringIO()  # not a terminal: a Slurm .out file, a redirected log
    logger = MetricsLogger(str(tmp_path / "metrics.jsonl"), rank=0)
    bar = logger.progress(total=40, initial=0, stream=stream)
    for step in range(1, 41):
        bar.step()
        if step % 10 == 0:
            logger.log({"step": step, "epoch": 0, "loss": 3.14159, "lr": 2.5e-4, "samples_per_s": 123.4,
                        "skipped_samples": 0, "nonfinite_steps": 2 if step == 30 else 0})
        assert stream.getvalue().count("\n") == step // 10  # nothing in between
    logger.log({"event": "preempted", "step": 40})
    logger.log({"step": 40, "zeroshot/top1": 0.5, "train/loss": 3.2})
    logger.close()
    out = stream.getvalue()
    assert "\r" not in out and "\x1b" not in out
    lines = out.splitlines()
    assert len(lines) == 5
    assert lines[0].startswith("train step 10/40 (25%) loss 3.1416 lr 2.50e-04 samples/s 123.4 elapsed ")
    assert " eta " in lines[0] and lines[3].startswith("train step 40/40 (100%)") and lines[3].endswith("eta 00:00")
    assert "nonfinite" not in lines[0] and " nonfinite 2 " in lines[2]  # counted once there are any
    assert lines[4] == "eval step 40/40 (100%) zeroshot/top1 0.5 train/loss 3.2"


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_on_a_terminal_a_bar_with_the_latest_logged_loss(tmp_path):
    stream = Terminal()
    logger = MetricsLogger(str(tmp_path / "metrics.jsonl"), rank=0)
    bar = logger.progress(total=20, initial=5, stream=stream)
    for _ in range(5):
        bar.step()
    logger.log({"step": 10, "loss": 2.5, "lr": 1e-3, "samples_per_s": 10.0})
    bar.step()
    logger.log({"step": 11, "zeroshot/top1": 0.5})
    logger.close()
    out = stream.getvalue()
    assert "\r" in out and "11/20" in out and "loss=2.5000" in out
    assert "eval step 11/20 (55%) zeroshot/top1 0.5\n" in out


# ------------------------------------------------------------ --help of every command


def _parsers() -> dict[str, argparse.ArgumentParser]:
    """The parser each command builds: pyproject.toml's console scripts and tools/demo.py."""
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    mains = {name: getattr(importlib.import_module(target.split(":")[0]), target.split(":")[1])
             for name, target in scripts.items()}
    spec = importlib.util.spec_from_file_location("demo", os.path.join(ROOT, "tools", "demo.py"))
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    mains["tools/demo.py"] = demo.main

    class Built(Exception):
        pass

    def capture(self, *args, **kwargs):
        raise Built(self)
    parsers = {}
    # every way of parsing (parse_args, parse_intermixed_args) goes through parse_known_args
    original = argparse.ArgumentParser.parse_known_args
    argparse.ArgumentParser.parse_known_args = capture
    try:
        for name, main in mains.items():
            try:
                main(["--help"]) if name != "tools/demo.py" else main()
            except Built as e:
                parsers[name] = e.args[0]
    finally:
        argparse.ArgumentParser.parse_known_args = original
    return parsers


def test_every_command_line_option_says_what_it_does_and_its_default():
    parsers = _parsers()
    assert {"mmscale-train", "mmscale-eval", "mmscale-export", "mmscale-build-shards", "mmscale-sweep", "mmscale-bench-loader",
            "mmscale-bench", "tools/demo.py"} <= set(parsers)
    missing = []
    for name, parser in parsers.items():
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            flag = "/".join(action.option_strings) or action.dest
            if not (action.help or "").strip():
                missing.append(f"{name} {flag}: no help")
            elif not action.required and "default" not in action.help:
                missing.append(f"{name} {flag}: no default in {action.help!r}")
        assert parser.format_help()  # the help renders
    assert not missing, "\n".join(missing)


# ------------------------------------------------------------ a real run


@pytest.mark.slow
def test_two_rank_run_logs_plain_lines_and_tensorboard(tmp_path):
    """2 ranks, 6 steps, a record every 2: the piped output has exactly rank 0's three step lines
    and its final evaluation line, no carriage returns; the events equal metrics.jsonl."""
    run_dir = str(tmp_path / "run")
    cmd = [PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "mmscale/train.py", "recipes/tiny.yaml", f"train.run_dir={run_dir}", "train.steps=6",
           "train.log_every=2", "train.checkpoint_every=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "\r" not in proc.stdout
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("train step", "eval step"))]
    assert [line.split(" (")[0] for line in lines] == ["train step 2/6", "train step 4/6", "train step 6/6",
                                                        "eval step 6/6"], lines
    records = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    assert [r["step"] for r in records if "loss" in r] == [2, 4, 6]
    assert "zeroshot/top1" in records[-1]
    assert_same_scalars(tensorboard_scalars(os.path.join(run_dir, "tensorboard")), jsonl_scalars(records))
