"""tools/gpu_check.sh's plan, checked on the CPU: --dry-run runs nothing, and every command it
would run is one its tools accept (bench options and recipe overrides parsed and validated, the
GPU tests collected), with at most 8 files under OUT, the most a device run brings back."""
import os
import shlex
import subprocess

from conftest import ROOT


def test_dry_run_plans_commands_the_tools_accept(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", "tools/gpu_check.sh", "--dry-run", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    plan = [line.split("] ", 1) for line in proc.stdout.splitlines() if line.startswith("+ [")]
    names = [head[3:].split(",")[0] for head, _ in plan]
    assert names == ["install-wheels", "install-deepspeed", "gpu-tests", "vs-open-clip", "cmla-b256-plain",
                     "cmla-b256-compiled", "cmla-b256-cached", "cmla-b1024-cached", "cmla-b4096-cached"]
    from mmscale.cli.bench import build_parser
    from mmscale.config import load_config
    jsons = []
    for _, command in plan:
        argv = shlex.split(command)
        if "tools/bench.py" in argv:
            args = build_parser().parse_intermixed_args(argv[argv.index("tools/bench.py") + 1:])
            over = list(args.overrides) + [f"train.global_batch_size={args.batch}",
                                           f"train.grad_cache_chunk={args.chunk}", f"train.precision={args.precision}"]
            load_config(os.path.join(ROOT, args.recipe), over)  # raises on a bad key or value
            jsons.append(args.json)
        elif "pytest" in argv:
            assert "-m" in argv and argv[argv.index("-m", argv.index("pytest")) + 1] == "gpu"
            assert os.path.isfile(os.path.join(ROOT, "tests", "test_gpu.py"))
    assert "--vs-open-clip ViT-B-16 --batch 256" in proc.stdout and "--precision bf16" in proc.stdout
    assert sorted(int(c.split("--batch ")[1].split()[0]) for _, c in plan if "--chunk 128" in c) == [256, 1024, 4096]
    assert len(set(jsons)) == len(jsons) == 6 and all(j.startswith(str(out)) for j in jsons)
    assert sorted(os.listdir(out)) == ["log.txt", "report.md"]  # + 6 JSON = the 8 files a device run returns
    report = (out / "report.md").read_text()
    assert "| gpu-tests | 150 | dry-run |" in report
    collected = subprocess.run([os.sys.executable, "-m", "pytest", "-q", "--collect-only", "-m", "gpu",
                                "tests/test_gpu.py", "-p", "no:cacheprovider"], cwd=ROOT, capture_output=True,
                               text=True, timeout=120)
    assert "tests collected" in collected.stdout or "test collected" in collected.stdout, collected.stdout
