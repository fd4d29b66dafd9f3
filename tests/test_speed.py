"""Speed choices measured on the machine: the choice (on a fake clock), the cache, explicit settings, the
no-native-bf16 rule and a GPU config's CPU fallback; one real measurement of a tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from contextlib import nullcontext

import pytest
import torch

from convmixer_pl import speed
from convmixer_pl.model import ConvMixer
from convmixer_pl.speed import ModelShape, SpeedChoice

SHAPE = ModelShape(dim=256, depth=8, kernel_size=5, patch_size=2, in_chans=3, image_size=32, batch_size=64)
CPU = torch.device("cpu")
# images/s of each CPU candidate, as measured for SHAPE on an AVX-512 CPU with native bf16
RATES = {SpeedChoice("32-true", False, True): 55, SpeedChoice("32-true", True, True): 93,
         SpeedChoice("32-true", True, False): 74, SpeedChoice("bf16-mixed", False, True): 99,
         SpeedChoice("bf16-mixed", False, False): 90, SpeedChoice("bf16-mixed", True, True): 178,
         SpeedChoice("bf16-mixed", True, False): 90}
WINNER = SpeedChoice("bf16-mixed", True, True)


class FakeSteps:
    """Training steps that take `batch / rate` seconds on a fake clock, times `slowdown(choice, call)`."""

    def __init__(self, rates, slowdown=lambda choice, call: 1.0, fail=()):
        self.now, self.rates, self.slowdown, self.fail = 0.0, rates, slowdown, fail
        self.calls: Counter = Counter()

    def clock(self) -> float:
        return self.now

    def make(self, choice):
        if choice in self.fail:
            raise RuntimeError("no such kernel\nsecond line")

        def step():
            self.calls[choice] += 1
            self.now += SHAPE.batch_size / self.rates[choice] * self.slowdown(choice, self.calls[choice])
        return step


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(speed.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def native_bf16(monkeypatch):
    monkeypatch.setattr(speed, "cpu_has_native_bf16", lambda facts=None: True)


@pytest.fixture
def no_native_bf16(monkeypatch):
    monkeypatch.setattr(speed, "cpu_has_native_bf16", lambda facts=None: False)


def choose(fake: FakeSteps, shape: ModelShape = SHAPE, **settings) -> SpeedChoice:
    return speed.choose_speed(shape, CPU, make_step=fake.make, clock=fake.clock, **settings)


# -- the choice ----------------------------------------------------------------------------------------------------
def test_candidates_are_every_knob_once_per_code_path(native_bf16):
    assert set(speed.candidates(SHAPE, CPU)) == set(RATES)
    assert speed.candidates(SHAPE, CPU)[0] == SpeedChoice("32-true", False, True)  # the reference: fp32 NCHW
    # below the compiled kernel's size the fp32 depthwise path is the same either way: measured once
    small = ModelShape(32, 2, 5, 2, 3, 16, 8)
    assert SpeedChoice("32-true", True, False) not in speed.candidates(small, CPU)
    assert len(speed.candidates(small, CPU)) == 6


def test_the_fastest_candidate_is_chosen_and_said(native_bf16, cache_dir, capsys):
    fake = FakeSteps(RATES)
    assert choose(fake) == WINNER
    line = capsys.readouterr().err.strip()
    assert line.startswith("convmixer: speed: bf16-mixed, channels_last, fast depthwise grad chosen by measurement (")
    assert "178.0 images/s vs 99.0 for bf16-mixed, NCHW, fast depthwise grad" in line
    assert line.endswith(f"cached in {cache_dir / 'speed.json'}") and "\n" not in line


def test_fp32_is_kept_unless_reduced_precision_is_faster_by_the_margin():
    fp32, bf16 = SpeedChoice("32-true", True, True), SpeedChoice("bf16-mixed", True, True)
    assert speed.pick({fp32: 100.0, bf16: 100.0 * (1 + speed.PRECISION_MARGIN) - 1}, fp32) == fp32
    assert speed.pick({fp32: 100.0, bf16: 100.0 * (1 + speed.PRECISION_MARGIN) + 1}, fp32) == bf16
    # within a precision the default layout stays unless another is TIE_MARGIN faster
    nchw = SpeedChoice("32-true", False, True)
    assert speed.pick({nchw: 102.0, fp32: 100.0}, fp32) == fp32
    assert speed.pick({nchw: 110.0, fp32: 100.0}, fp32) == nchw


def test_fp32_is_kept_within_the_margin_when_measured(native_bf16):
    rates = {**RATES, WINNER: RATES[SpeedChoice("32-true", True, True)] * 1.05}
    assert choose(FakeSteps(rates)) == SpeedChoice("32-true", True, True)


def test_a_busy_round_or_a_slow_step_does_not_flip_the_choice(native_bf16):
    def slowdown(choice, call):
        if call == 3:
            return 3.0  # a busy round: every step of round 2 three times as long
        return 4.0 if choice == WINNER and call == 4 else 1.0  # one slow step of the winner in round 3

    fake = FakeSteps(RATES, slowdown)
    assert choose(fake) == WINNER
    assert fake.calls[WINNER] >= 4  # warm-up and at least three rounds


def test_clearly_slower_candidates_are_not_stepped_again(native_bf16):
    fake = FakeSteps(RATES)
    choose(fake)
    assert fake.calls[SpeedChoice("32-true", True, False)] == 3  # warm-up and the first two rounds
    reference, best_fp32 = SpeedChoice("32-true", False, True), SpeedChoice("32-true", True, True)
    assert fake.calls[reference] == fake.calls[WINNER] == fake.calls[best_fp32] >= 4


def test_a_candidate_that_cannot_run_is_left_out(native_bf16, capsys):
    fake = FakeSteps(RATES, fail={WINNER})
    assert choose(fake) == SpeedChoice("32-true", True, True)  # the next bf16 (99) is within the margin of 93
    assert "speed: bf16-mixed, channels_last, fast depthwise grad left out: no such kernel\n" in capsys.readouterr().err


def test_a_step_too_slow_to_measure_keeps_the_default(native_bf16, capsys):
    fake = FakeSteps({choice: 0.01 for choice in RATES})  # 6,400 s a step
    assert choose(fake) == SpeedChoice("32-true", True, True)
    assert "(the default; not measured: a step takes 6400 s)" in capsys.readouterr().err
    assert sum(fake.calls.values()) == 1


# -- explicit settings ---------------------------------------------------------------------------------------------
def test_an_explicit_setting_is_not_measured(native_bf16):
    fake = FakeSteps(RATES)
    assert choose(fake, precision="32-true") == SpeedChoice("32-true", True, True)
    assert {choice.precision for choice in fake.calls} == {"32-true"}
    fake = FakeSteps(RATES)
    assert choose(fake, channels_last=False) == SpeedChoice("bf16-mixed", False, True)
    assert not any(choice.channels_last for choice in fake.calls)


def test_nothing_is_measured_when_everything_is_set(native_bf16, cache_dir):
    fake = FakeSteps(RATES, fail=set(RATES))
    given = dict(precision="32-true", channels_last=False, fast_depthwise_grad=False, compile=False)
    assert choose(fake, **given) == SpeedChoice("32-true", False, False)
    assert not fake.calls and not cache_dir.exists()


def test_the_settings_given_are_part_of_the_cache_key(native_bf16):
    choose(FakeSteps(RATES))
    fake = FakeSteps(RATES)
    assert choose(fake, channels_last=False) == SpeedChoice("bf16-mixed", False, True)  # measured, not the cached
    assert fake.calls


# -- the cache -----------------------------------------------------------------------------------------------------
def test_a_cached_choice_is_used_without_measuring(native_bf16, cache_dir, capsys):
    first = choose(FakeSteps(RATES))
    capsys.readouterr()
    again = FakeSteps(RATES, fail=set(RATES))  # any step would raise
    assert choose(again) == first == WINNER and not again.calls
    assert capsys.readouterr().err.strip().endswith(f"; cached in {cache_dir / 'speed.json'}")
    entry = next(iter(json.loads((cache_dir / "speed.json").read_text())["entries"].values()))
    assert entry["choice"] == {"precision": "bf16-mixed", "channels_last": True, "fast_depthwise_grad": True,
                               "compile": False}
    assert entry["images_per_s"]["32-true, NCHW, fast depthwise grad"] == pytest.approx(55, rel=0.01)


def test_the_cache_key_holds_device_shape_and_torch_version(native_bf16, monkeypatch):
    key = speed.cache_key(SHAPE, CPU, {})
    assert f"torch {torch.__version__}" in key and str(SHAPE) in key and speed.device_key(CPU) in key
    assert str(torch.get_num_threads()) + " threads" in key
    assert speed.cache_key(ModelShape(256, 8, 5, 2, 3, 32, 128), CPU, {}) != key
    choose(FakeSteps(RATES))
    for attribute, value in ((torch, "__version__"), (speed, "device_key")):  # another torch, another machine
        with monkeypatch.context() as patch:
            patch.setattr(*((torch, "__version__", "99.0")) if attribute is torch else (speed, "device_key",
                                                                                         lambda device: "cpu other"))
            fake = FakeSteps(RATES)
            choose(fake)
            assert fake.calls, value


def test_a_corrupt_cache_is_ignored_with_one_note(native_bf16, cache_dir, capsys):
    cache_dir.mkdir()
    (cache_dir / "speed.json").write_text('{"entries": {"half a file')
    assert choose(FakeSteps(RATES)) == WINNER
    notes = [line for line in capsys.readouterr().err.splitlines() if "unreadable cache" in line]
    assert len(notes) == 1 and str(cache_dir / "speed.json") in notes[0]
    assert len(json.loads((cache_dir / "speed.json").read_text())["entries"]) == 1  # rewritten whole


def test_the_cache_is_written_atomically(native_bf16, cache_dir, monkeypatch, capsys):
    choose(FakeSteps(RATES))
    before = (cache_dir / "speed.json").read_text()
    replaced = []
    monkeypatch.setattr(os, "replace", lambda src, dst: replaced.append(dst) or (_ for _ in ()).throw(
        OSError(28, "No space left on device")))
    assert not speed.write_cache(cache_dir / "speed.json", "another key", {"choice": {}})
    assert replaced == [cache_dir / "speed.json"]  # written beside it, then moved into place
    assert (cache_dir / "speed.json").read_text() == before  # a failed write leaves the old file
    assert os.listdir(cache_dir) == ["speed.json"]  # and no temporary file
    assert "the choice is not remembered" in capsys.readouterr().err


def test_a_choice_measured_on_a_busy_machine_is_not_cached(native_bf16, cache_dir, monkeypatch, capsys):
    monkeypatch.setattr(speed, "other_cpus", lambda before, after: 2.0 * os.cpu_count())
    monkeypatch.setattr(speed, "crowded_out", lambda before, after: None)  # busy, yet the warm-up got its CPUs
    assert choose(FakeSteps(RATES)) == WINNER  # 178 images/s: more than BUSY_MARGIN x the default's 93
    assert "chosen by measurement on a busy machine" in capsys.readouterr().err
    assert not (cache_dir / "speed.json").exists()
    default = SpeedChoice("32-true", True, True)
    assert choose(FakeSteps({**RATES, WINNER: 93 * speed.BUSY_MARGIN - 1})) == default  # a lead noise could make
    assert "not cached: other processes kept" in capsys.readouterr().err


def test_a_crowded_machine_is_not_measured(native_bf16, cache_dir, monkeypatch, capsys):
    monkeypatch.setattr(speed, "crowded_out", lambda before, after: "other processes keep 1.9 of 2 CPUs busy")
    fake = FakeSteps(RATES)
    assert choose(fake) == SpeedChoice("32-true", True, True)
    assert sum(fake.calls.values()) == 1  # the reference's warm-up step told
    assert "(the default; not measured: other processes keep 1.9 of 2 CPUs busy)" in capsys.readouterr().err
    assert not cache_dir.exists()


def test_crowded_out_means_others_busy_and_the_step_starved(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    # (seconds, busy CPU seconds of the machine, CPU seconds of this process)
    assert speed.crowded_out((0, 0, 0), (10, 20, 4)) == f"other processes keep 1.6 of {speed.usable_cpus()} CPUs busy"
    assert speed.crowded_out((0, 0, 0), (10, 20, 18)) is None  # the step had its CPUs: a measure
    assert speed.crowded_out((0, 0, 0), (10, 20, 6)) is None  # busy, yet a measure (the rounds are paired)
    assert speed.crowded_out((0, 0, 0), (10, 5, 4)) is None  # a step that uses little CPU on a quiet machine
    assert speed.crowded_out((0, 0, 0), (0.1, 0.2, 0)) is None and speed.crowded_out(None, (10, 20, 4)) is None


@pytest.mark.parametrize("others, expected", [(0.0, 4), (1.0, 3), (1.6, 2), (3.9, 1), (None, 4)])
def test_threads_are_the_cpus_other_processes_leave_free(monkeypatch, others, expected):
    samples = iter([(0.0, 0.0, 0.0), None if others is None else (1.0, others, 0.0)])
    monkeypatch.setattr(speed, "load_sample", lambda: next(samples))
    monkeypatch.setattr(speed, "usable_cpus", lambda: 4)
    monkeypatch.setattr(speed.time, "sleep", lambda seconds: None)
    assert speed.threads_for_load(4) == (expected, others)
    assert speed.threads_for_load.__defaults__ == (None, 0.5)  # half a second of /proc/stat: 50 ticks


def test_fit_takes_the_free_cpus_and_a_resumed_run_its_saved_threads(monkeypatch, capsys):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    chosen = []
    monkeypatch.setattr(torch, "set_num_threads", chosen.append)
    monkeypatch.setattr(speed, "threads_for_load", lambda most: (1, 1.2))
    speed.use_free_cpus(None)
    assert chosen == [1] and "speed: 1 of 2 threads, as other processes keep 1.2 of" in capsys.readouterr().err
    speed.use_free_cpus(8)  # a checkpoint's count, capped at this machine's
    speed.use_free_cpus(1)
    assert chosen == [1, 2, 1] and capsys.readouterr().err == ""
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    speed.use_free_cpus(None)
    assert chosen == [1, 2, 1]  # the environment's setting stays


def test_the_cache_folder_comes_from_the_environment(monkeypatch, tmp_path):
    assert speed.cache_file() == tmp_path / "cache" / "speed.json"
    monkeypatch.delenv(speed.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert speed.cache_file() == tmp_path / "xdg" / "convmixer" / "speed.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert speed.cache_file() == speed.Path.home() / ".cache" / "convmixer" / "speed.json"


# -- bf16 only where it is native ----------------------------------------------------------------------------------
@pytest.mark.parametrize("facts, native", [
    (dict(machine="x86_64", capability="AVX512", hardware_bf16=True, onednn_bf16=True), True),
    (dict(machine="x86_64", capability="AVX2", hardware_bf16=True, onednn_bf16=True), False),  # ATEN_CPU_CAPABILITY
    (dict(machine="x86_64", capability="AVX512", hardware_bf16=True, onednn_bf16=False), False),  # ONEDNN_MAX_CPU_ISA
    (dict(machine="x86_64", capability="AVX512", hardware_bf16=False, onednn_bf16=True), False),  # AVX-512, emulated
    (dict(machine="x86_64", capability="AVX2", hardware_bf16=False, onednn_bf16=False), False),  # an AVX2 CPU
    (dict(machine="aarch64", capability="SVE256", hardware_bf16=True, onednn_bf16=True), True),
])
def test_native_bf16_needs_the_instructions_and_kernels_allowed_to_use_them(facts, native):
    assert speed.cpu_has_native_bf16(facts) is native


def test_avx2_kernels_count_as_no_native_bf16():
    code = "from convmixer_pl.speed import cpu_has_native_bf16 as f, cpu_bf16_facts as g; print(f(), g())"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.startswith("False "), out
    assert "'onednn_bf16': False" in out and "'capability': 'AVX2'" in out


def test_without_native_bf16_bf16_is_no_candidate(no_native_bf16, capsys):
    assert {choice.precision for choice in speed.candidates(SHAPE, CPU)} == {"32-true"}
    fake = FakeSteps(RATES)
    assert choose(fake).precision == "32-true" and {c.precision for c in fake.calls} == {"32-true"}
    assert choose(fake, precision="bf16-mixed").precision == "bf16-mixed"  # asked for: done, and said
    assert "has no native bf16" in capsys.readouterr().err


# -- a GPU config on the CPU ---------------------------------------------------------------------------------------
def test_a_gpu_precision_on_the_cpu_is_measured_and_never_emulated_bf16(no_native_bf16):
    assert speed.cpu_fallback_precision("16-mixed") is None and speed.cpu_fallback_precision("bf16-mixed") is None
    assert speed.cpu_fallback_precision(16) is None and speed.cpu_fallback_precision("bf16") is None
    assert speed.cpu_fallback_precision("32-true") == "32-true" and speed.cpu_fallback_precision(32) == "32-true"
    assert speed.cpu_fallback_precision(None) is None
    fake = FakeSteps(RATES)
    assert choose(fake, precision=speed.cpu_fallback_precision("16-mixed")).precision == "32-true"


@pytest.mark.parametrize("workers, cpus, expected", [(8, 2, 1), (8, 1, 0), (0, 16, 0), (4, 16, 4), (16, 16, 15)])
def test_a_gpu_config_on_the_cpu_takes_at_most_one_worker_fewer_than_cores(workers, cpus, expected):
    assert speed.cpu_fallback_workers(workers, cpus) == expected
    assert 0 <= speed.cpu_fallback_workers(workers) <= max(0, speed.usable_cpus() - 1)


# -- GPUs: channels_last and compile by measurement (not measured on a GPU here) -----------------------------------
def test_gpu_candidates_are_layout_and_compile(monkeypatch):
    gpu = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    monkeypatch.setattr(speed, "device_key", lambda device: "cuda Fake GPU sm90")
    monkeypatch.setattr(speed, "_measuring", lambda device: nullcontext())
    k9 = ModelShape(1536, 20, 9, 7, 3, 224, 64)
    choices = speed.candidates(k9, gpu, precision="bf16-mixed")
    assert {(c.channels_last, c.compile) for c in choices} == {(False, False), (True, False), (False, True),
                                                               (True, True)}
    assert len(speed.candidates(k9, gpu)) == 8  # fp32 and bf16 where the precision is not given
    rates = {c: 100.0 + 50 * c.compile - 30 * c.channels_last for c in choices}  # k9: NCHW, compiled fastest
    fake = FakeSteps(rates)
    chosen = speed.choose_speed(k9, gpu, precision="bf16-mixed", make_step=fake.make, clock=fake.clock)
    assert chosen == SpeedChoice("bf16-mixed", False, True, True)
    assert speed.default_choice(gpu, 9).channels_last is False and speed.default_choice(gpu, 7).channels_last
    assert speed.choose_speed(ModelShape(1536, 20, 7, 7, 3, 224, 64), gpu, precision="bf16-mixed",
                              measure_now=False) == SpeedChoice("bf16-mixed", True, True, False)


# -- the real thing, tiny ------------------------------------------------------------------------------------------
def test_model_shape_of_a_built_model():
    model = ConvMixer(48, 3, kernel_size=7, patch_size=4, in_chans=1, num_classes=5, act="relu")
    assert ModelShape.of(model, image_size=24, batch_size=16) == ModelShape(48, 3, 7, 4, 1, 24, 16, "relu")


def test_a_real_measurement_chooses_a_candidate_and_caches_it(cache_dir, monkeypatch):
    monkeypatch.setattr(speed, "other_cpus", lambda before, after: None)  # measured and cached even while the
    monkeypatch.setattr(speed, "crowded_out", lambda before, after: None)  # machine is busy
    tiny = ModelShape(dim=16, depth=2, kernel_size=5, patch_size=2, in_chans=3, image_size=16, batch_size=8)
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    choice = speed.choose_speed(tiny, "cpu", budget_s=1.0)
    assert torch.equal(torch.rand(3), expected)  # the run's random stream is untouched
    assert choice in speed.candidates(tiny, CPU)
    entries = json.loads((cache_dir / "speed.json").read_text())["entries"]
    assert list(entries) == [speed.cache_key(tiny, CPU, {})]
    assert entries[speed.cache_key(tiny, CPU, {})]["choice"] == speed.asdict(choice)
