"""mmscale-bench, the speed and memory of a recipe's real training step (`mmscale-bench --help`):
measure.py (the command: build the trainer, warm up, time the steps, time the phases, report),
instruments.py (phase times from the step's profiler ranges, host reads, memory, attention
kernels, FLOP count), openclip.py (open_clip's trainer and a bare open_clip loop beside mmscale's
step), report.py (the printed report, the JSON, the --table of earlier results)."""
from .measure import build_parser, main

__all__ = ["build_parser", "main"]
