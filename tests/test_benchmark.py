"""`python -m convmixer_pl.benchmark` in a tiny form: every printed field is there and holds a number."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from convmixer_pl import benchmark

TINY = ["--dim", "8", "--depth", "2", "--kernel-size", "3", "--image-size", "8", "--batch-size", "4",
        "--steps", "2", "--warmup", "1", "--device", "cpu"]
NUMBER = r"(\d+\.\d+) \((\d+\.\d+)-(\d+\.\d+)\)(?: \[\d+/\d+\])?"  # images/s (p25-p75) [kept/all]


def test_benchmark_prints_speed_memory_and_ratios(tmp_path):
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, "-m", "convmixer_pl.benchmark", *TINY, "--grad-checkpointing", "both",
                           "--precision", "bf16-mixed", "--augmentation", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    assert "model: convmixer_256_8 dim=8 depth=2 kernel=3 patch=2 classes=10, 8x8, batch 4" in text
    assert "settings: precision bf16-mixed, channels_last on (auto), compile off" in text
    assert "official: the plain loop in NCHW, eager, precision 32-true, nn.Conv2d's depthwise backward" in text
    assert "depthwise weight gradient of lightning and plain: convmixer_pl.depthwise's" in text
    assert "memory: CPU peak RSS (VmHWM)" in text
    rows = {}
    for line in text.splitlines():
        match = re.match(r"(lightning|plain|official)\s+(on|off)\s+(.*)$", line)
        if match:
            rows[match[1], match[2]] = match[3]
    assert set(rows) == {("lightning", "off"), ("lightning", "on"), ("plain", "off"), ("plain", "on"),
                         ("official", "off")}
    # checkpointing on: training only (inference does not checkpoint), so its inference column is "-"
    full = re.fullmatch(rf"{NUMBER}\s+{NUMBER}\s+(-?\d+\.\d+)\s+(-?\d+\.\d+)", rows["lightning", "off"])
    assert full and float(full[1]) > 0 and float(full[4]) > 0
    train_only = re.fullmatch(rf"{NUMBER}\s+-\s+(-?\d+\.\d+)\s+-", rows["plain", "on"])
    assert train_only and float(train_only[1]) > 0
    for pair in ("lightning/plain", "lightning/official", "plain/official"):
        assert re.search(rf"ratio {pair}: train \d+\.\d\dx, inference \d+\.\d\dx", text), pair
    assert re.search(r"ratio lightning/plain \(grad_ckpt on\): train \d+\.\d\dx$", text, re.M)
    augment = re.search(r"augmentation .* per-image torchvision (\d+) \(one process\), batched on cpu (\d+)", text)
    assert augment and int(augment[1]) > 0 and int(augment[2]) > 0

    saved = json.loads(out.read_text())
    assert saved["setup"]["precision"] == "bf16-mixed" and saved["setup"]["channels_last"] is True
    steps = {(r["runner"], r["grad_checkpointing"]): r for r in saved["results"]}
    assert [len(r) for r in steps["lightning", False]["train_steps"]] == [2]  # one round of 2 timed steps
    assert [len(r) for r in steps["plain", False]["infer_steps"]] == [2]
    assert steps["plain", True]["infer_steps"] == []


def test_peak_memory_sees_an_allocation():
    memory = benchmark.PeakMemory(torch.device("cpu"))
    if not memory.available:
        pytest.fail("/proc/self/clear_refs is not writable here: CPU peak memory cannot be measured")
    memory.start()
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    del block
    assert 60 < memory.peak_mib() < 200
    memory.reset_peak()  # forgets the block: the peak is back near the baseline
    assert memory.peak_mib() < 30


def test_busy_steps_are_left_out_and_ratios_pair_rounds():
    steps = [[1.0, 2.0, 1.1], [1.2, 1.3]]
    others = [[0.1, 1.5, float("nan")], [0.9, 0.2]]  # NaN: unknown, kept
    kept = benchmark.quiet_steps(steps, others, 0.25)
    assert kept == [[1.0, 1.1], [1.3]]
    assert benchmark.quiet_steps(steps, others, float("inf")) == steps
    # round by round: (2.0 / 1.0, 3.0 / 1.5) -> median 2.0; a round where one side kept nothing is skipped
    assert benchmark.paired_ratio([[1.0], [1.5], []], [[2.0], [3.0], [9.0]]) == 2.0
    assert benchmark.paired_ratio([[]], [[1.0]]) is None


def test_clock_reports_other_processes_cpu():
    clock = benchmark.Clock(torch.device("cpu"), warmup=0, on_warm=lambda: None)
    for _ in range(3):
        clock.tick()
        end = time.perf_counter() + 0.06
        while time.perf_counter() < end:  # this process's own work is not counted as others'
            pass
    clock.tick()
    assert len(clock.steps()) == 3 and all(0.05 < t < 1 for t in clock.steps())
    assert all(0 <= o <= os.cpu_count() for o in clock.others())


def test_bad_arguments_exit_with_a_message(capsys):
    for argv in (["--runners", "lightning,keras"], ["--steps", "0"], ["--variant", "resnet50"]):
        with pytest.raises(SystemExit) as exit_info:
            benchmark.main(argv)
        assert exit_info.value.code == 2
    assert "keras not in lightning,plain,official" in capsys.readouterr().err


def test_depthwise_weight_grad_script_prints_times_and_agreement(tmp_path):
    script = Path(__file__).parents[1] / "benchmarks" / "depthwise_weight_grad.py"
    proc = subprocess.run([sys.executable, str(script), "--batch", "2", "--dim", "8", "--size", "6", "--kernels", "5",
                           "--calls", "1"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "activations (2, 8, 6, 6), channels_last" in proc.stdout
    row = re.search(r"^\s+5" + r"\s+(\d+\.\d+)" * 4 + r"\s+(\S+)$", proc.stdout, re.M)
    assert row, proc.stdout
    assert all(float(row[i]) > 0 for i in range(1, 5))
    assert float(row[5]) < 1e-5  # the compiled fp32 gradient is oneDNN's
