"""mmscale-bench's output: the report it prints, the JSON it writes, and the markdown table
(--table) of earlier results."""
from __future__ import annotations

import os
import time


def table(results: list[dict]) -> str:
    """One row per result: the configuration, speed, memory and host reads."""
    head = ["recipe", "global batch", "chunk", "world", "precision", "ZeRO", "compile", "samples/s", "ms/sample",
            "peak memory GB", "host reads/step (mmscale / deepspeed / towers)"]
    rows = []
    for r in results:
        syncs = r["host_syncs_per_step"]
        towers = sum(v for k, v in syncs.items() if k not in ("mmscale", "deepspeed"))
        rows.append([os.path.basename(r["recipe"]), r["global_batch"], r["grad_cache_chunk"] or "off", r["world"],
                     r["precision"], r["zero_stage"], "on" if r["compile"] else "off", f"{r['samples_per_s']:.3f}",
                     f"{1000 / r['samples_per_s']:.1f}", f"{r['peak_memory_gb']:.2f}",
                     f"{syncs.get('mmscale', 0):g} / {syncs.get('deepspeed', 0):g} / {towers:g}"])
    if any("open_clip" in r for r in results):  # the ratio the comparison exists for
        head += ["open_clip trainer samples/s", "its data wait / step", "mmscale / open_clip",
                 "mmscale / bare open_clip loop, interleaved"]
        for row, r in zip(rows, results):
            oc = r.get("open_clip", {}).get("samples_per_s")
            wait = r.get("open_clip", {}).get("data_fraction")
            bare = r.get("vs_bare_open_clip", {}).get("ratio")
            row += [f"{oc:.3f}" if oc else "-", f"{wait:.1%}" if wait is not None else "-",
                    f"{r['vs_open_clip']:.2f}" if r.get("vs_open_clip") else "-", f"{bare:.2f}" if bare else "-"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


def report(r: dict) -> str:
    gc = f"gradient cache chunk {r['grad_cache_chunk']}" if r["grad_cache_chunk"] else "no gradient cache"
    lines = [f"mmscale bench: {r['recipe']} (task {r['task']}), global batch {r['global_batch']}, {gc}, "
             f"{r['world']} rank(s), {r['precision']}, ZeRO {r['zero_stage']}, compile {'on' if r['compile'] else 'off'}"
             f"{', synthetic on-device batch' if r['synthetic'] else ''}",
             f"  device              {r['device']}",
             f"  samples/s           {r['samples_per_s']:.2f}   (step {r['step_s']:.3f} s, mean of {r['steps']} "
             f"after {r['warmup']} warm-up)",
             "  split (s/step)      " + ", ".join(f"{k} {v:.4f}" for k, v in r["split_s"].items()),
             f"  peak memory         {r['peak_memory_gb']:.2f} GB ({r['memory_kind']})",
             "  host syncs/step     " + (", ".join(f"{k} {v:.1f}" for k, v in sorted(r["host_syncs_per_step"].items()))
                                        or "none"),
             "  attention           " + "; ".join(f"{k}: {v}" for k, v in r["attention"].items())]
    if r.get("collectives_per_step"):
        rows = r["collectives_per_step"]
        sim = f", as rank 0 of {r['simulated_ranks']} simulated ranks" if r.get("simulated_ranks") else ""
        lines.append(f"  collectives/step    {sum(c['calls'] for c in rows):g}, {sum(c['bytes'] for c in rows) / 1e6:.3f} "
                     f"MB of buffers{sim}:")
        lines += [f"    {c['collective']} {c['dtype']} ({c['package']}): {c['calls']:g} x, {c['bytes'] / 1e6:.3f} MB"
                  for c in rows]
    if "flop_per_sample" in r:
        f = r["flop_per_sample"]
        lines.append(f"  FLOP/sample         {f['forward_backward'] / 1e9:.2f} G forward+backward "
                     f"({f['forward'] / 1e9:.2f} G forward); executed {r['executed_flop_per_sample'] / 1e9:.2f} G")
        lines.append(f"  MFU                 {r['mfu']:.1%}" if r.get("mfu") is not None else
                     "  MFU                 n/a (no known peak for this device)")
    lines += [f"  {label:<20}{text}" for label, text in open_clip_lines(r)]
    lines.append("  versions            " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()))
    return "\n".join(lines)


def open_clip_lines(r: dict) -> list[tuple[str, str]]:
    """(label, text) of the comparison with open_clip: first the interleaved ratio (both loops in
    one process on one device, alternated step by step: the one to quote), then its own trainer's,
    with the share of that trainer's step spent waiting for its loader (over 5%, the loader and not
    the step sets its rate, and the ratio flatters mmscale)."""
    lines = []
    if "vs_bare_open_clip" in r:
        b = r["vs_bare_open_clip"]
        lines.append(("interleaved", f"mmscale / open_clip's model in a bare torch loop = {b['ratio']:.2f} (mmscale "
                                     f"{b['mmscale_samples_per_s']:.2f}, bare {b['bare_samples_per_s']:.2f} samples/s, "
                                     f"alternated over {b['steps']} steps in this process)"))
    if "open_clip" in r:
        oc = r["open_clip"]
        ratio = f"{r['vs_open_clip']:.2f}" if r.get("vs_open_clip") else "n/a"
        rate = f"{oc['samples_per_s']:.2f}" if oc["samples_per_s"] else "n/a (no step lines in its log)"
        wait = oc.get("data_fraction")
        text = f"{rate} samples/s -> mmscale / open_clip = {ratio}"
        if wait is not None:
            text += (f"; its data wait {wait:.1%} of its step time with {oc.get('workers', '?')} loader workers"
                     + (" (over 5%: its loader sets its rate; raise --open-clip-workers)" if wait >= 0.05 else ""))
        lines.append(("open_clip trainer", text))
    return lines


def save(result: dict, recipe: str, path: str | None) -> str:
    """Writes the result as JSON to path, or to runs/bench/<recipe>-<time>.json; returns where."""
    from mmscale.files import atomic_write_json
    path = path or os.path.join("runs", "bench", f"{os.path.splitext(os.path.basename(recipe))[0]}-"
                                                 f"{time.strftime('%Y%m%d-%H%M%S')}.json")
    atomic_write_json(path, result)
    return path
