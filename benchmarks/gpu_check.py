"""One GPU check of convmixer-pl on the real CIFAR-10 images, in at most --budget-s seconds (default 480: 8 min).

On a machine with one NVIDIA H100/H200 GPU it measures, each part with its own time budget and the parts that no
longer fit skipped with the reason printed:

- epoch_*: ConvMixer-256/8 (the official script's recipe, batch 512) training images/s and the implied epoch time on
  the real images, `convmixer fit` for 2 short epochs (--limit-batches each; the second epoch is reported):
  bf16-mixed + channels_last (the base), with data.gpu_pipeline, with channels_last off, with torch.compile, and
  with 16-mixed;
- official_script: the official train.py on the same GPU (patched by benchmarks/official.py: local JPEGs, a
  seeded subset of the same number of images), and the ratio to ours;
- official_benchmark: `convmixer benchmark`'s lightning/plain/official runners (steps only, random data);
- big_model_checkpointing: ConvMixer-1536/20, 224 px, batch 64 (random data, `convmixer benchmark
  --grad-checkpointing both`): step time and peak memory with and without gradient checkpointing;
- fsdp: a few `convmixer fit` steps of ConvMixer-1536/20 with --trainer configs/trainer/fsdp.yaml on one GPU,
  then the full checkpoint it wrote evaluated without FSDP;
- recipe_25ep: configs/cifar10_25ep_92.yaml on the real images with whatever time is left (trainer.max_time):
  its accuracy if the 25 epochs fit, else the time per epoch and the accuracy after the epochs that fit.

    python benchmarks/gpu_check.py --tarball cifar10-jpg.tar.gz --official-script train.py --out results/
    python benchmarks/gpu_check.py --tarball tiny.tar.gz --out /tmp/check --cpu-tiny   # every part, tiny, CPU

It writes ONE file, <out>/gpu_check.json (every number, each part's status, command and log tail), and prints a
markdown table of the results. `--cpu-tiny` runs every part in a tiny form on the CPU (tiny model, the images of
the tarball, 1-2 steps), `convmixer` in this process to save the start-up time; the parts that need CUDA say
"skipped: needs a CUDA GPU". Numbers are printed, never judged.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

try:  # run as a script (benchmarks/ on sys.path) or imported as benchmarks.gpu_check
    from cifar10_side_by_side import (
        CIFAR_MEAN,
        CIFAR_STD,
        REPO,
        Speed,
        convmixer_base,
        convmixer_env,
        error_line,
        extract_tarball,
        image_folder_options,
        ours_fit_command,
        ours_view,
        read_metrics,
        use_this_checkout,
    )
    from official import (
        CommandResult,
        OfficialScriptNotFound,
        Recipe,
        count_images,
        find_official_script,
        run_command,
        run_official,
        steady,
        tail,
    )
except ImportError:
    from benchmarks.cifar10_side_by_side import (
        CIFAR_MEAN,
        CIFAR_STD,
        REPO,
        Speed,
        convmixer_base,
        convmixer_env,
        error_line,
        extract_tarball,
        image_folder_options,
        ours_fit_command,
        ours_view,
        read_metrics,
        use_this_checkout,
    )
    from benchmarks.official import (
        CommandResult,
        OfficialScriptNotFound,
        Recipe,
        count_images,
        find_official_script,
        run_command,
        run_official,
        steady,
        tail,
    )

NEEDS_CUDA = "skipped: needs a CUDA GPU"
GRACE_S = 10  # a subprocess past its budget gets SIGTERM, then SIGKILL this much later
RESERVE_S = 8  # kept back at the end for writing the results
RECIPE_TARGET = 0.925  # the official README's ~92.5% after 25 epochs


@dataclass(frozen=True)
class Sizes:
    """What each part runs, at full size (a GPU) or tiny (--cpu-tiny)."""

    model: dict  # Recipe fields of the model and batch
    limit_batches: int  # training batches per epoch of the epoch_* parts
    epochs: int  # epochs of the epoch_* and official_script parts
    benchmark_small: list[str]  # `convmixer benchmark` flags of official_benchmark
    benchmark_big: list[str]  # ... of big_model_checkpointing
    fsdp: list[str]
    recipe: list[str]  # flags added to configs/cifar10_25ep_92.yaml


GPU = Sizes(
    model={},  # the official defaults: 256/8, k5, p2, batch 512
    limit_batches=40, epochs=2,
    benchmark_small=["--variant", "convmixer_256_8", "--image-size", "32", "--batch-size", "512",
                     "--precision", "bf16-mixed", "--channels-last", "on", "--cudnn-benchmark", "--steps", "20",
                     "--warmup", "5"],
    benchmark_big=["--variant", "convmixer_1536_20", "--image-size", "224", "--batch-size", "64",
                   "--precision", "bf16-mixed", "--grad-checkpointing", "both", "--cudnn-benchmark",
                   "--runners", "lightning,plain", "--phases", "train", "--steps", "5", "--warmup", "2"],
    fsdp=["--model", "convmixer_1536_20", "--data.batch_size", "16", "--trainer.max_steps", "4",
          "--trainer.limit_train_batches", "4", "--trainer.limit_val_batches", "2"],
    recipe=[],
)
TINY = Sizes(
    model={"hdim": 16, "depth": 2, "conv_ks": 3, "psize": 2, "batch_size": 16},
    limit_batches=2, epochs=1,
    benchmark_small=["--dim", "16", "--depth", "2", "--kernel-size", "3", "--image-size", "16", "--batch-size", "4",
                     "--steps", "1", "--warmup", "1", "--device", "cpu"],
    benchmark_big=["--dim", "16", "--depth", "2", "--kernel-size", "3", "--patch-size", "2", "--image-size", "16",
                   "--batch-size", "2", "--grad-checkpointing", "both", "--runners", "lightning,plain", "--phases",
                   "train", "--steps", "1", "--warmup", "1", "--device", "cpu"],
    fsdp=[],
    recipe=["--model.dim", "16", "--model.depth", "2", "--model.kernel_size", "3", "--data.batch_size", "16",
            "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2",
            "--trainer.accelerator", "cpu", "--trainer.precision", "bf16-mixed"],
)


class Skip(Exception):
    """A part that cannot run here; the message is the reason."""


class Failed(Exception):
    """A part that ran and failed; the message says how, `log` is the failed command's log."""

    def __init__(self, message: str, log: str | None = None) -> None:
        super().__init__(message)
        self.log = log


@dataclass
class Check:
    """What every part shares."""

    args: argparse.Namespace
    tiny: bool  # tiny sizes
    in_process: bool  # convmixer in this process (--cpu-tiny without --subprocesses)
    device: str  # cuda or cpu
    work: Path
    start: float
    deadline: float
    sizes: Sizes
    root: Path | None = None  # the extracted images
    ours_root: Path | None = None  # the same, with ours' view (train/, test/ and val/ where needed)
    options: set[str] = field(default_factory=set)  # ImageFolderDataModule's options in this checkout
    convmixer_error: str | None = None  # why convmixer_pl does not import, if it does not
    parts: dict[str, dict] = field(default_factory=dict)

    def remaining(self) -> float:
        return self.deadline - time.perf_counter() - RESERVE_S

    def budget(self, want_s: float, min_s: float) -> float:
        """At most `want_s`, within what is left; Skip when less than `min_s` is left."""
        left = self.remaining() - GRACE_S
        if left < min_s:
            raise Skip(f"skipped: time budget spent ({max(left, 0):.0f} s left, the part needs {min_s:.0f} s)")
        return min(want_s, left)

    def recipe(self) -> Recipe:
        """The official defaults (ConvMixer-256/8, batch 512), tiny with --cpu-tiny, and this check's workers."""
        return dataclasses.replace(Recipe(), workers=self.args.workers, epochs=self.sizes.epochs, **self.sizes.model)


# -- running convmixer --------------------------------------------------------------------------------------------
def convmixer(check: Check, argv: list[str], name: str, timeout_s: float) -> CommandResult:
    """`convmixer <argv>`: a subprocess (its own CUDA context and compile caches, its wall time is the command's),
    or in this process with --cpu-tiny (no start-up time; no timeout)."""
    log = check.work / "logs" / f"{name}.log"
    if not check.in_process:
        return run_command([*convmixer_base(), *argv], log, timeout_s, convmixer_env(check.args.threads),
                           cwd=check.work, grace_s=GRACE_S)
    use_this_checkout()
    from convmixer_pl.cli import main as convmixer_main

    log.parent.mkdir(parents=True, exist_ok=True)
    code, start, cwd = 0, time.perf_counter(), os.getcwd()
    lightning_log = logging.getLogger("lightning.pytorch")  # its handler writes to the terminal, not to `log`
    level = lightning_log.level
    lightning_log.setLevel(logging.WARNING)
    with open(log, "w") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        os.chdir(check.work)  # relative log folders (benchmark's lightning runner) land in the work folder
        try:
            convmixer_main([str(a) for a in argv])
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        except Exception:  # noqa: BLE001 -- reported as the part's failure, with the traceback in the log
            traceback.print_exc()
            code = 1
        finally:
            os.chdir(cwd)
            lightning_log.setLevel(level)
    return CommandResult(["convmixer", *map(str, argv)], time.perf_counter() - start, code, False, str(log))


def fit_argv(check: Check, run: str, speed: Speed) -> list[str]:
    """`fit ...` (without the interpreter) of the side-by-side script's recipe-faithful command."""
    cmd = ours_fit_command(check.recipe(), check.ours_root, check.work / run, check.device, 0, speed, check.options)
    return cmd[len(convmixer_base()):]


def checked(result: CommandResult, what: str) -> CommandResult:
    if result.timed_out:
        raise Failed(f"{what}: stopped at its time budget ({result.wall_s:.0f} s)", result.log)
    if result.returncode != 0:
        raise Failed(f"{what}: exit code {result.returncode}: {error_line(result.log)}", result.log)
    return result


# -- the parts ----------------------------------------------------------------------------------------------------
EPOCH_VARIANTS = {  # name: (speed, needs CUDA, what it changes)
    "epoch_bf16_channels_last": (Speed("bf16-mixed", "on"), False, "base: bf16-mixed, channels_last, eager, loader"),
    "epoch_gpu_pipeline": (Speed("bf16-mixed", "on", gpu_pipeline=True), False, "base + data.gpu_pipeline"),
    "epoch_channels_last_off": (Speed("bf16-mixed", "off"), False, "base, channels_last off"),
    "epoch_compile": (Speed("bf16-mixed", "on", compile=True), False, "base + model.compile"),
    "epoch_16_mixed": (Speed("16-mixed", "on"), True, "base, 16-mixed instead of bf16-mixed"),
}


def epoch_part(check: Check, name: str, budget_s: float) -> dict:
    speed, _, what = EPOCH_VARIANTS[name]
    if speed.gpu_pipeline and "gpu_pipeline" not in check.options:
        raise Skip("skipped: ImageFolderDataModule has no gpu_pipeline option in this checkout")
    if speed.compile and check.tiny:
        raise Skip("skipped in --cpu-tiny: torch.compile's first compilation takes tens of seconds on a CPU")
    limits = ("--trainer.limit_train_batches", str(check.sizes.limit_batches), "--trainer.limit_val_batches", "0")
    speed = dataclasses.replace(speed, extra=limits)
    result = checked(convmixer(check, fit_argv(check, name, speed), name, budget_s), "convmixer fit")
    rates = [e.get("images_per_sec") for e in read_metrics(check.work / name)]
    rate = steady(rates)
    if rate is None:
        raise Failed(f"no train/images_per_sec in {check.work / name}/lightning_logs")
    n_train = count_images(check.root / "train")
    return {"what": what, "images_per_sec": rate, "images_per_sec_per_epoch": rates,
            "epoch_time_s": n_train / rate, "epoch_time_note": f"{n_train} images / images_per_sec (training only)",
            "batches_per_epoch": check.sizes.limit_batches, "wall_s": result.wall_s, "command": result.command}


def official_script_part(check: Check, budget_s: float) -> dict:
    try:
        source, origin = find_official_script(check.args.official_script)
    except OfficialScriptNotFound as err:
        raise Skip(f"skipped: {err}") from None
    recipe = check.recipe()
    subset = check.sizes.limit_batches * recipe.batch_size  # as many images per epoch as the epoch_* parts train
    subset = min(subset, count_images(check.root / "train"))
    run = run_official(source, recipe, check.root, check.device, 0, check.work / "official", budget_s,
                       check.args.threads, train_subset=subset, grace_s=GRACE_S)
    if run.error and not run.epochs:
        raise Failed(f"official script: {run.error}", run.log)
    out = {"script": origin, "images_per_sec": run.train_images_per_sec,
           "images_per_sec_from_epoch_time": run.images_per_sec_from_epoch_time,
           "epoch_times_s": run.epoch_times_s, "train_times_s": run.train_times_s,
           "final_test_acc": run.final_test_acc, "train_images_per_epoch": subset, "wall_s": run.wall_s,
           "precision": "16-mixed autocast" if check.device == "cuda" else "fp32", "error": run.error,
           "command": run.command}
    for ours in ("epoch_bf16_channels_last", "epoch_16_mixed", "epoch_gpu_pipeline"):
        rate = check.parts.get(ours, {}).get("images_per_sec")
        if rate and run.train_images_per_sec:
            out[f"ratio_{ours}_over_official"] = rate / run.train_images_per_sec
    return out


def benchmark_json(check: Check, name: str, flags: list[str], budget_s: float) -> dict:
    path = check.work / f"{name}.json"
    checked(convmixer(check, ["benchmark", *flags, "--json", str(path)], name, budget_s), "convmixer benchmark")
    return json.loads(path.read_text())


def step_figures(result: dict, batch_size: int) -> dict:
    steps = [s for round_ in result["train_steps"] for s in round_]
    peaks = [p for p in result["train_peak_mib"] if p is not None]
    median = statistics.median(steps) if steps else None
    return {"train_step_s": median, "train_images_per_sec": batch_size / median if median else None,
            "train_peak_mib": statistics.median(peaks) if peaks else None}


def official_benchmark_part(check: Check, budget_s: float) -> dict:
    saved = benchmark_json(check, "official_benchmark", check.sizes.benchmark_small, budget_s)
    batch = saved["setup"]["batch_size"]
    runners = {r["runner"]: step_figures(r, batch) for r in saved["results"] if not r["grad_checkpointing"]}
    out = {"runners": runners, "setup": saved["setup"], "official_setup": saved["official"],
           "device": saved["device"]}
    for top in ("lightning", "plain"):
        a, b = runners.get(top, {}).get("train_images_per_sec"), runners.get("official", {}).get(
            "train_images_per_sec")
        if a and b:
            out[f"ratio_{top}_over_official"] = a / b
    return out


def big_model_part(check: Check, budget_s: float) -> dict:
    saved = benchmark_json(check, "big_model_checkpointing", check.sizes.benchmark_big, budget_s)
    batch = saved["setup"]["batch_size"]
    out = {"memory": saved["memory"], "device": saved["device"], "arch": saved["setup"]["arch"],
           "image_size": saved["setup"]["image_size"], "batch_size": batch}
    for r in saved["results"]:
        out[f"{r['runner']}_checkpointing_{'on' if r['grad_checkpointing'] else 'off'}"] = step_figures(r, batch)
    for runner in ("lightning", "plain"):
        on, off = out.get(f"{runner}_checkpointing_on"), out.get(f"{runner}_checkpointing_off")
        if on and off and on["train_peak_mib"] and off["train_peak_mib"]:
            out[f"{runner}_peak_memory_on_over_off"] = on["train_peak_mib"] / off["train_peak_mib"]
            out[f"{runner}_step_time_on_over_off"] = on["train_step_s"] / off["train_step_s"]
    return out


def data_flags(check: Check, image_size: int, crop_pct: float = 1.0) -> list[str]:
    flags = ["--data.root", str(check.ours_root), "--data.image_size", str(image_size), "--data.crop_pct",
             str(crop_pct), "--data.num_workers", str(check.args.workers)]
    return flags + (["--data.val_fraction", "0"] if "val_fraction" in check.options else [])


def fsdp_part(check: Check, budget_s: float) -> dict:
    run = check.work / "fsdp"
    argv = ["fit", "--config", str(REPO / "configs" / "imagefolder.yaml"), "--trainer",
            str(REPO / "configs" / "trainer" / "fsdp.yaml"), "--trainer.devices", "1", "--name", "fsdp",
            "--checkpoint.dirpath", str(run), *data_flags(check, 224), *check.sizes.fsdp,
            "--trainer.enable_progress_bar", "false", "--trainer.num_sanity_val_steps", "0", "--plots.enabled",
            "false"]
    started = time.perf_counter()
    fit = checked(convmixer(check, argv, "fsdp", budget_s * 0.7), "convmixer fit (FSDP)")
    last = run / "last.ckpt"
    if not last.is_file():
        raise Failed(f"no {last} after the FSDP fit")
    out = {"fit_wall_s": fit.wall_s, "checkpoint_mib": last.stat().st_size / 2**20, "command": fit.command}
    # the full checkpoint, evaluated on one device without FSDP: the part of the FSDP set-up users rely on
    validate = ["validate", "--config", str(REPO / "configs" / "imagefolder.yaml"), "--name", "fsdp",
                "--checkpoint.dirpath", str(run), *data_flags(check, 224), "--ckpt_path", str(last),
                "--trainer.devices", "1", "--trainer.limit_val_batches", "2", "--trainer.enable_progress_bar",
                "false", "--data.batch_size", "16"]
    left = budget_s - (time.perf_counter() - started)
    if left < 20:
        out["validate_without_fsdp"] = "skipped: time budget spent"
        return out
    checked(convmixer(check, validate, "fsdp_validate", left), "convmixer validate (no FSDP)")
    metrics = [e for e in read_metrics(run) if "val_acc1" in e]
    out["validate_without_fsdp"] = {"val_acc1": metrics[-1]["val_acc1"] if metrics else None}
    return out


def recipe_part(check: Check, budget_s: float) -> dict:
    run = check.work / "recipe_25ep"
    argv = ["fit", "--config", str(REPO / "configs" / "cifar10_25ep_92.yaml"), "--data", "ImageFolderDataModule",
            *data_flags(check, 32), "--data.mean", CIFAR_MEAN, "--data.std", CIFAR_STD, "--name", "recipe_25ep",
            "--checkpoint.dirpath", str(run), "--trainer.enable_progress_bar", "false", "--plots.enabled", "false",
            *check.sizes.recipe, *check.args.recipe_extra]
    # stop training in time to validate, save and exit inside the budget (start-up ~15 s, teardown ~10 s)
    seconds = max(int(budget_s - 40), 30)
    argv += ["--trainer.max_time", f"00:{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"]
    result = convmixer(check, argv, "recipe_25ep", budget_s)
    epochs = read_metrics(run)
    validated = [e for e in epochs if "val_acc1" in e]
    if result.returncode != 0 and not validated:
        checked(result, "convmixer fit")
    planned = 1 if check.tiny else 25
    rates = [e.get("images_per_sec") for e in epochs if e.get("images_per_sec")]
    rate = steady(rates)
    n_train = count_images(check.root / "train")
    final = validated[-1]["val_acc1"] if validated else None
    return {"epochs_planned": planned, "epochs_validated": len(validated), "complete": len(validated) >= planned,
            "val_acc1_per_epoch": [e["val_acc1"] for e in validated], "final_test_acc": final,
            "reached_target": None if len(validated) < planned or check.tiny else final >= RECIPE_TARGET,
            "target": RECIPE_TARGET, "images_per_sec": rate, "epoch_time_s": n_train / rate if rate else None,
            "wall_s": result.wall_s, "returncode": result.returncode,
            "stopped_by": "max_epochs" if len(validated) >= planned else "max_time" if result.returncode == 0 else
            "an error (see log_tail)", **({"log_tail": tail(result.log, 40)} if result.returncode else {}),
            "note": "validation is the test set (val_fraction 0), as the official script's Test Acc",
            "command": result.command}


# -- the driver ---------------------------------------------------------------------------------------------------
def run_part(check: Check, name: str, fn, want_s: float, min_s: float, needs_cuda: bool = False,
             needs_convmixer: bool = True) -> None:
    started = time.perf_counter()
    entry: dict = {"budget_s": None}
    try:
        if needs_cuda and check.device != "cuda":
            raise Skip(NEEDS_CUDA)
        if needs_convmixer and check.convmixer_error:
            raise Skip(f"skipped: convmixer_pl does not import here: {check.convmixer_error}")
        if check.root is None:
            raise Skip("skipped: no data")
        budget = check.budget(want_s, min_s)
        entry["budget_s"] = round(budget, 1)
        entry.update(fn(check, budget))
        entry["status"] = "ok"
    except Skip as why:
        entry.update(status="skipped", reason=str(why))
    except Failed as why:
        entry.update(status="failed", reason=str(why))
        if why.log:  # the log's end, so that the one results file is enough to see what went wrong
            entry["log_tail"] = tail(why.log, 40)
    except Exception as err:  # noqa: BLE001 -- one part's bug must not lose the other parts' numbers
        entry.update(status="failed", reason=f"{type(err).__name__}: {err}", traceback=traceback.format_exc())
    entry["seconds"] = round(time.perf_counter() - started, 1)
    check.parts[name] = entry
    said = entry.get("reason") if entry["status"] == "skipped" else entry["status"] + (
        f": {entry['reason']}" if "reason" in entry else "")
    print(f"[{time.perf_counter() - check.start:4.0f} s] {name}: {said} ({entry['seconds']} s)", flush=True)


def plan(check: Check) -> list[tuple]:
    """(name, function, wanted s, least s, needs CUDA, needs convmixer_pl) in the order they run: the short parts
    first, the recipe last with whatever is left."""
    parts = [(name, lambda c, b, n=name: epoch_part(c, n, b), 120 if EPOCH_VARIANTS[name][0].compile else 60,
              60 if EPOCH_VARIANTS[name][0].compile else 25, EPOCH_VARIANTS[name][1], True)
             for name in EPOCH_VARIANTS]
    return parts + [
        ("official_script", official_script_part, 60, 25, False, False),
        ("official_benchmark", official_benchmark_part, 60, 25, False, True),
        ("big_model_checkpointing", big_model_part, 90, 30, False, True),
        ("fsdp", fsdp_part, 90, 40, True, True),
        ("recipe_25ep", recipe_part, 10_000, 90 if check.device == "cuda" else 5, False, True),
    ]


def device_info() -> dict:
    import torch

    info = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available(), "cpus": os.cpu_count(),
            "platform": platform.platform(), "python": sys.version.split()[0]}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    gpus=torch.cuda.device_count())
    return info


def brief(name: str, entry: dict) -> str:
    """The numbers of one part, in one cell."""
    if entry["status"] != "ok":
        return entry.get("reason", "")

    def f(value, fmt=".1f"):
        return "-" if value is None else format(value, fmt)

    if name.startswith("epoch_"):
        return f"{f(entry['images_per_sec'])} images/s, epoch {f(entry['epoch_time_s'])} s ({entry['what']})"
    if name == "official_script":
        ratio = entry.get("ratio_epoch_bf16_channels_last_over_official")
        return (f"{f(entry['images_per_sec'])} images/s ({entry['precision']}); ours (base) / official "
                f"{f(ratio, '.2f')}x; test acc {f(entry['final_test_acc'], '.4f')} after {len(entry['epoch_times_s'])}"
                " short epoch(s)")
    if name == "official_benchmark":
        r = entry["runners"]
        return ", ".join(f"{k} {f(v['train_images_per_sec'])}" for k, v in r.items()) + (
            f" images/s; lightning/official {f(entry.get('ratio_lightning_over_official'), '.2f')}x")
    if name == "big_model_checkpointing":
        cells = [f"{k.replace('_checkpointing_', ' ckpt ')}: {f(v['train_step_s'], '.3f')} s/step, "
                 f"{f(v['train_peak_mib'], '.0f')} MiB" for k, v in entry.items() if k.endswith(("_on", "_off"))
                 and isinstance(v, dict)]
        return "; ".join(cells)
    if name == "fsdp":
        return (f"fit {f(entry['fit_wall_s'])} s, last.ckpt {f(entry['checkpoint_mib'], '.0f')} MiB, validated "
                f"without FSDP: {entry['validate_without_fsdp']}")
    if name == "recipe_25ep":
        return (f"{entry['epochs_validated']}/{entry['epochs_planned']} epochs, test acc "
                f"{f(entry['final_test_acc'], '.4f')}, epoch {f(entry['epoch_time_s'])} s "
                f"({f(entry['images_per_sec'])} images/s), reached {entry['target']}: {entry['reached_target']}")
    return ""


def summary_table(check: Check) -> str:
    rows = ["| part | status | result | seconds |", "|---|---|---|---|"]
    for name, entry in check.parts.items():
        rows.append(f"| {name} | {entry['status']} | {brief(name, entry)} | {entry['seconds']} |")
    return "\n".join(rows)


def prepare(check: Check) -> None:
    """The data, extracted, and which options this checkout's ImageFolderDataModule has."""
    start = time.perf_counter()
    check.root = extract_tarball(Path(check.args.tarball), check.work / "data")
    print(f"extracted {check.args.tarball} in {time.perf_counter() - start:.1f} s: "
          f"{count_images(check.root / 'train')} training and {count_images(check.root / 'test')} test images")
    try:
        check.options = image_folder_options()
    except Exception as err:  # noqa: BLE001 -- e.g. jsonargparse or torchdata missing on the GPU machine
        check.convmixer_error = f"{type(err).__name__}: {err}"
        print(f"convmixer_pl does not import: {check.convmixer_error}")
    check.ours_root = ours_view(check.root, check.work / "ours_data", val_link="val_fraction" not in check.options)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tarball", default=os.environ.get("CONVMIXER_CIFAR10_JPG"),
                   help="CIFAR-10 JPEG tarball: train/<class>/*.jpg, test/<class>/*.jpg (default: "
                        "$CONVMIXER_CIFAR10_JPG)")
    p.add_argument("--out", required=True, help="the folder for gpu_check.json")
    p.add_argument("--official-script", help="the official train.py (default: $CONVMIXER_OFFICIAL_SCRIPT, else the "
                                             "mirror where present)")
    p.add_argument("--budget-s", type=float, default=480, help="the whole check's time, extraction included")
    p.add_argument("--workers", type=int, help="loader workers of every run (default: 8, or 0 with --cpu-tiny)")
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the subprocesses")
    p.add_argument("--recipe-extra", nargs=argparse.REMAINDER, default=[],
                   help="flags added to the recipe_25ep fit (last on the line), e.g. --data.gpu_pipeline true")
    p.add_argument("--work-dir", help="runs and logs (default: a new temporary folder)")
    p.add_argument("--cpu-tiny", action="store_true", help="every part in a tiny form on the CPU (for CI)")
    p.add_argument("--subprocesses", action="store_true",
                   help="with --cpu-tiny: run convmixer as subprocesses, as the full check does")
    args = p.parse_args(argv)
    if not args.tarball:
        p.error("--tarball (or $CONVMIXER_CIFAR10_JPG) is required")
    if args.workers is None:
        args.workers = 0 if args.cpu_tiny else 8
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    import torch

    tiny = args.cpu_tiny
    device = "cuda" if torch.cuda.is_available() and not tiny else "cpu"
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="convmixer_gpu_check_")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    in_process = tiny and not args.subprocesses
    check = Check(args, tiny, in_process, device, work, start, start + args.budget_s, TINY if tiny else GPU)
    if in_process:
        torch.set_num_threads(args.threads or 1)  # convmixer runs in this process
    info = device_info()
    print(f"gpu_check: {'cpu-tiny' if tiny else 'full'} mode on {info.get('gpu', 'the CPU')}, budget "
          f"{args.budget_s:.0f} s, work folder {work}")
    if device != "cuda" and not tiny:
        print("no CUDA GPU here: the parts run on the CPU at full size or are skipped; use --cpu-tiny for a quick run")
    prepare(check)
    for name, fn, want, least, needs_cuda, needs_convmixer in plan(check):
        run_part(check, name, fn, want, least, needs_cuda, needs_convmixer)
    table = summary_table(check)
    result = {"mode": "cpu-tiny" if tiny else "full", "device": info, "budget_s": args.budget_s,
              "elapsed_s": round(time.perf_counter() - start, 1), "data": str(check.root), "work_dir": str(work),
              "image_folder_options": sorted(check.options), "convmixer_error": check.convmixer_error,
              "parts": check.parts, "summary_md": table}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1, default=str))
    print("\n" + table + f"\n\nelapsed {result['elapsed_s']} s; results: {out / 'gpu_check.json'}")
    return result


if __name__ == "__main__":
    main()
