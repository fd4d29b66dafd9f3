"""`convmixer benchmark` in a tiny form (every figure printed with its noise, whatever else the machine runs), the
measuring pieces of `convmixer_pl.benchmark`, and the per-call scripts in `benchmarks/`. Nothing here asserts on
how fast anything ran."""

from __future__ import annotations

import json
import mmap
import os
import re
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO

from convmixer_pl.benchmark import BenchmarkError, Clock, Figure, PeakMemory, benchmark, paired_ratio, run_metrics

TINY = dict(dim=8, depth=2, kernel_size=3, image_size=8, batch_size=4, steps=2, warmup=1, device="cpu")
ROW = re.compile(r"^(lightning|plain|official)\s+(on|off)\s+(train|infer)\s+(\d+\.\d)\s+(\d+\.\d)-(\d+\.\d)\s+(\d+)"
                 r"\s+(\d+\.\d\d|unknown)\s+(-?\d+\.\d|unknown)$", re.M)


def test_benchmark_prints_every_figure_with_its_noise(tmp_path):
    """Through the installed command and a --config file, as a user runs it."""
    config = tmp_path / "tiny.yaml"
    config.write_text("".join(f"{key}: {value}\n" for key, value in TINY.items()))
    out = tmp_path / "result.json"
    proc = subprocess.run(["convmixer", "benchmark", "--config", str(config), "--grad_checkpointing", "both",
                           "--precision", "bf16-mixed", "--augmentation", "crop", "--output", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    assert "model: convmixer_256_8 dim=8 depth=2 kernel=3 patch=2 act=gelu classes=10, 8x8, batch 4" in text
    assert "settings: precision bf16-mixed, channels_last on (default), compile off" in text
    assert "official: the plain loop in NCHW, eager, precision 32-true, nn.Conv2d's depthwise backward" in text
    assert "2 timed steps after 1 warm-up per run, 1 round(s), every timed step kept" in text
    rows = {(m[1], m[2], m[3]): m for m in ROW.finditer(text)}
    # checkpointing both: training with and without it; inference never checkpoints, so it runs once
    assert set(rows) == {("lightning", "off", "train"), ("lightning", "on", "train"), ("lightning", "off", "infer"),
                         ("plain", "off", "train"), ("plain", "on", "train"), ("plain", "off", "infer"),
                         ("official", "off", "train"), ("official", "off", "infer")}, text
    for m in rows.values():
        assert float(m[5]) <= float(m[4]) <= float(m[6]) and float(m[4]) > 0 and m[7] == "2"
    assert "- " not in text.split("runner", 1)[1] and " -\n" not in text  # no row of dashes
    for pair in ("lightning/plain", "lightning/official", "plain/official"):
        assert re.search(rf"^ratio {pair}: train \d+\.\d\dx, inference \d+\.\d\dx$", text, re.M), pair
    assert re.search(r"^ratio lightning/plain \(grad_ckpt on\): train \d+\.\d\dx$", text, re.M)
    assert re.search(r"^augmentation crop \(CIFAR, 32 px\), images/s: per-image torchvision \d+\.\d \(p25-p75 "
                     r"[\d.]+-[\d.]+, \d+ blocks, others' CPUs (\d\.\d\d|unknown)\) \(one process\), batched on cpu "
                     r"\d+\.\d \(p25-p75", text, re.M), text
    assert f"convmixer benchmark: wrote {out}" in proc.stderr

    saved = json.loads(out.read_text())
    assert saved["setup"]["precision"] == "bf16-mixed" and saved["setup"]["channels_last"] is True
    by_key = {(r["runner"], r["grad_checkpointing"], r["phase"]): r for r in saved["rows"]}
    assert [len(s) for s in by_key["lightning", False, "train"]["step_seconds"]] == [2]  # one round of 2 steps
    assert by_key["plain", True, "train"]["steps"] == 2 and ("plain", True, "infer") not in by_key
    assert saved["ratios"]["lightning/plain grad_ckpt train"] > 0
    assert saved["augmentation"]["batched"]["images_per_sec"] > 0


@pytest.mark.parametrize("options, words", [
    (dict(runners="lightning,keras"), "--runners 'lightning,keras': give a comma-separated subset of lightning,"),
    (dict(phases=""), "--phases '': give a comma-separated subset of train,infer"),
    (dict(steps=0), "--steps 0, --rounds 1 and --batch_size 4 must be at least 1"),
    (dict(variant="resnet50"), "--variant 'resnet50': choose one of convmixer_1024_20_ks9_p14"),
])
def test_bad_options_are_one_line(options, words):
    with pytest.raises(BenchmarkError, match=re.escape(words)):
        benchmark(**{**TINY, **options})


def test_figure_keeps_every_step_and_says_its_noise():
    slow_spell = Figure([0.5, 0.5, 0.5, 2.0], items=8, others=1.5)  # one step four times as long: still counted
    low, median, high = slow_spell.rates()
    assert median == 16.0 and low < median == high
    assert slow_spell.text() == "16.0 (p25-p75 13.0-16.0, 4 steps, others' CPUs 1.50)"
    assert Figure([0.25], items=8).text("blocks") == "32.0 (p25-p75 32.0-32.0, 1 blocks, others' CPUs unknown)"
    merged = Figure.merged([slow_spell, Figure([1.0], 8, None), Figure([1.0], 8, 0.5)])
    assert merged.seconds == [0.5, 0.5, 0.5, 2.0, 1.0, 1.0] and merged.others == 1.0
    # paired by round: (2.0 / 1.0, 3.0 / 1.5) -> 2.0, whatever each round's own speed
    assert paired_ratio([Figure([1.0], 1), Figure([1.5], 1)], [Figure([2.0], 1), Figure([3.0], 1)]) == 2.0


def test_clock_counts_other_processes_cpu_and_not_its_own():
    clock = Clock(torch.device("cpu"), warmup=1, on_warm=lambda: None)
    clock.tick()  # the warm-up step: not timed
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        clock.tick()
        end = time.perf_counter() + 0.6  # /proc/stat's ticks resolve half a second and more
        while time.perf_counter() < end:  # this process's own work is not counted as others'
            pass
        clock.tick()
    finally:
        spinner.kill()
        spinner.wait()
    figure = clock.figure(items=4)
    assert len(figure.seconds) == 1 and figure.items == 4
    assert figure.others is not None and 0 < figure.others <= os.cpu_count()


def touched_pages(mib: int) -> mmap.mmap:
    """`mib` MiB of anonymous memory, every page written: resident until closed, whatever malloc keeps."""
    block = mmap.mmap(-1, mib * 2**20)
    for offset in range(0, len(block), mmap.PAGESIZE):
        block[offset] = 1
    return block


def test_peak_memory_sees_an_allocation():
    memory = PeakMemory(torch.device("cpu"))
    assert memory.available, "/proc/self/clear_refs is not writable here: CPU peak memory cannot be measured"
    memory.start()
    touched_pages(64).close()  # 64 MiB resident, then unmapped (handed back to the OS at once)
    assert 60 < memory.peak_mib() < 200
    memory.reset_peak()  # forgets the block: the peak is back near the baseline
    assert memory.peak_mib() < 30


def test_peak_memory_leaves_out_what_was_freed_before_start():
    garbage = touched_pages(256)  # 256 MiB resident when the meter is made, freed before start()
    memory = PeakMemory(torch.device("cpu"))
    garbage.close()
    memory.start()
    touched_pages(64).close()
    assert 60 < memory.peak_mib() < 200


def test_run_metrics_reads_the_newest_log(tmp_path):
    for version, acc in ((2, "0.5"), (10, "0.75")):  # version_10 is newer than version_2
        log = tmp_path / "lightning_logs" / f"version_{version}"
        log.mkdir(parents=True)
        (log / "metrics.csv").write_text("epoch,step,train/images_per_sec,val/acc1\n0,9,100.0,\n0,9,,0.25\n"
                                         f"1,19,120.0,\n1,19,,{acc}\n")
    assert run_metrics(tmp_path) == {"train/images_per_sec": {0: 100.0, 1: 120.0}, "val/acc1": {0: 0.25, 1: 0.75}}
    assert run_metrics(tmp_path / "no_run") == {}


def test_depthwise_weight_grad_script_prints_times_and_agreement():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.depthwise_weight_grad", "--batch", "2", "--dim", "8",
                           "--size", "6", "--kernels", "[5]", "--min_seconds", "0.01"],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "activations (2, 8, 6, 6), channels_last" in proc.stdout
    row = re.search(r"^\s+5" + r"\s+(\d+\.\d+) \([\d.]+-[\d.]+\)" * 5 + r"\s+(\S+)$", proc.stdout, re.M)
    assert row, proc.stdout
    assert float(row[6]) < 1e-5  # the compiled fp32 gradient is oneDNN's


def test_serve_throughput_script_beside_batched_inference(digits_run, tmp_path):
    """Also the unbatched server (--max_batch_size 1: LitServe's loop without batching) end to end, on loopback."""
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.serve_throughput", "--ckpt_path",
                           str(digits_run / "last.ckpt"), "--requests", "8", "--clients", "[1,2]", "--servers",
                           '["--max_batch_size 1"]', "--images", "4", "--batch_size", "4", "--output", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "batched inference: batch 4, this process, measured just before each row" in proc.stdout
    rows = json.loads(out.read_text())
    assert [row["clients"] for row in rows] == [1, 2] and all(row["server"] == "--max_batch_size 1" for row in rows)
    assert all(row["requests_per_s"] > 0 and row["p95_ms"] >= row["p50_ms"] > 0 and row["mean_batch"] == 1
               and row["batched_images_per_s"] > 0 for row in rows)
    row = r"^--max_batch_size 1\s+[12]" + r"\s+\d+\.\d+" * 5 + r"\s+1\.00\s+(\d\.\d\d|unknown)$"
    assert len(re.findall(row, proc.stdout, re.M)) == 2, proc.stdout
