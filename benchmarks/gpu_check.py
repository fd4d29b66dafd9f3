"""One check of convmixer-pl on a GPU with the real CIFAR-10 images, within a time budget (default 8 minutes).

Each part gets a budget capped by what is left, or is skipped with the reason: `epoch_*` (ConvMixer-256/8 training
images/s, 2 short epochs of `convmixer fit`, with each speed option), `official_script`, `official_benchmark`,
`big_model_checkpointing`, `fsdp` and `recipe_25ep` (docs/real_cifar10.md). One file, <out>/gpu_check.json, and a
markdown table; `--cpu_tiny true` runs every part tiny on the CPU, `convmixer` in this process (CI).

    python -m benchmarks.gpu_check --tarball cifar10-jpg.tar.gz --official_repo convmixer-cifar10 --out results/
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import tempfile
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from jsonargparse import CLI

from benchmarks import official
from convmixer_pl.benchmark import cpu_name, run_metrics
from convmixer_pl.console import run_entry_point
from convmixer_pl.files import atomic_write

NEEDS_CUDA, GRACE_S, RESERVE_S = "skipped: needs a CUDA GPU", 10, 8  # RESERVE_S: kept back for writing the results
BASE = ("--trainer.precision", "bf16-mixed", "--model.channels_last", "true")
EPOCH_PARTS = {  # part: (`convmixer fit` options, what they change)
    "epoch_bf16_channels_last": (BASE, "base: bf16-mixed, channels_last, eager, loader"),
    "epoch_device_pipeline": ((*BASE, "--data.device_pipeline", "true"), "base + data.device_pipeline"),
    "epoch_channels_last_off": ((*BASE, "--model.channels_last", "false"), "base, channels_last off"),
    "epoch_compile": ((*BASE, "--model.compile", "true"), "base + model.compile"),
    "epoch_16_mixed": ((*BASE, "--trainer.precision", "16-mixed"), "base, 16-mixed instead of bf16-mixed"),
}


class Skip(Exception):
    """A part that cannot run here; the message is the reason."""


@dataclass
class Check:
    work: Path
    root: Path
    tiny: bool  # tiny sizes on the CPU, convmixer in this process
    device: str
    deadline: float
    threads: int | None
    official_repo: str | None
    recipe_extra: list[str]
    recipe: official.Recipe  # of the epoch_* and official parts, 2 epochs (tiny: 1) of `batches` batches
    batches: int
    n_train: int
    parts: dict[str, dict] = field(default_factory=dict)

    def convmixer(self, name: str, args: list[str], timeout_s: float, strict: bool = True) -> official.Run:
        """`convmixer <args>`: a subprocess (its own CUDA context and caches; its wall time is the command's), or
        in this process when tiny; a failure raises unless not `strict`."""
        run = official.Run(name, 0, official.convmixer_command(*args), str(self.work / "logs" / f"{name}.log"))
        run.execute(timeout_s, official.convmixer_env(self.threads), self.work, GRACE_S, in_process=self.tiny)
        if strict and run.error:
            raise RuntimeError(f"{name}: {run.error}")
        return run


def epoch_part(check: Check, name: str, budget_s: float) -> dict:
    options, what = EPOCH_PARTS[name]
    if name == "epoch_compile" and check.tiny:
        raise Skip("skipped when tiny: torch.compile's first compilation takes tens of seconds on a CPU")
    run = official.run_ours(check.recipe, check.root, check.work, check.device, 0, (
        *options, "--trainer.limit_train_batches", str(check.batches), "--trainer.limit_val_batches", "0"), budget_s,
        check.threads, name=name, in_process=check.tiny)
    if run.error or run.train_images_per_sec is None:
        raise RuntimeError(f"{name}: {run.error or 'no train/images_per_sec in its metrics.csv'}")
    return {"what": what, "images_per_sec": run.train_images_per_sec, "epochs": run.epochs, "wall_s": run.wall_s,
            "epoch_time_s": check.n_train / run.train_images_per_sec, "command": run.command}


def official_part(check: Check, budget_s: float) -> dict:
    if not (check.official_repo or os.environ.get(official.ENV_REPO)):
        raise Skip(f"skipped: {official.NOT_FOUND}")
    source, origin = official.official_source(check.official_repo)
    subset = min(check.batches * check.recipe.batch_size, check.n_train)  # the epoch_* parts' images per epoch
    root = official.subset_root(check.root, subset, 0, check.work / "official_subset")
    run = official.run_official(source, check.recipe, root, check.work / "official", check.device, 0, budget_s,
                                check.threads, GRACE_S)
    if not run.epochs:
        raise RuntimeError(f"official script: {run.error}: {official.tail(run.log, 5)}")
    ours = check.parts.get("epoch_bf16_channels_last", {}).get("images_per_sec")
    return {"script": origin, "images_per_sec": run.train_images_per_sec, "final_test_acc": run.final_test_acc,
            "epochs": run.epochs, "train_images_per_epoch": subset, "wall_s": run.wall_s, "error": run.error,
            "precision": "16-mixed autocast" if check.device == "cuda" else "fp32", "command": run.command,
            **({"ratio_ours_base_over_official": ours / run.train_images_per_sec} if ours else {})}


def benchmark_part(check: Check, name: str, budget_s: float) -> dict:
    """`convmixer benchmark`: the small model's runners, or the big one with and without checkpointing."""
    size = (["--dim", "16", "--depth", "2", "--kernel_size", "3", "--image_size", "16", "--batch_size", "4",
             "--steps", "1", "--warmup", "1"] if check.tiny else
            ["--variant", "convmixer_256_8", "--image_size", "32", "--batch_size", "512", "--steps", "20"]
            if name == "official_benchmark" else
            ["--variant", "convmixer_1536_20", "--image_size", "224", "--batch_size", "64", "--steps", "5",
             "--warmup", "2"])
    more = (["--channels_last", "true"] if name == "official_benchmark" else
            ["--grad_checkpointing", "both", "--runners", "lightning,plain", "--phases", "train"])
    path = check.work / f"{name}.json"
    check.convmixer(name, ["benchmark", *size, *more, "--precision", "bf16-mixed", "--device", check.device,
                           "--cudnn_benchmark", str(check.device == "cuda").lower(), "--output", str(path)], budget_s)
    saved = json.loads(path.read_text())
    train = [r for r in saved["rows"] if r["phase"] == "train"]
    return {**{f"{r['runner']} checkpointing {'on' if r['grad_checkpointing'] else 'off'} {key}": r[key]
               for r in train for key in ("images_per_sec", "peak_mib")}, "device": saved["device"],
            "memory": saved["memory"], "rows": [{k: v for k, v in r.items() if k != "step_seconds"} for r in train]}


def data_args(check: Check, image_size: int) -> list[str]:
    return ["--data.root", str(check.root), "--data.image_size", str(image_size), "--data.crop_pct", "1.0",
            "--data.num_workers", str(check.recipe.workers), "--data.val_fraction", "0",
            "--trainer.enable_progress_bar", "false"]


def fsdp_part(check: Check, budget_s: float) -> dict:
    run_dir, started, configs = check.work / "fsdp", time.perf_counter(), official.REPO / "configs"
    common = ["--name", "fsdp", "--checkpoint.dirpath", str(run_dir), *data_args(check, 224), "--trainer.devices",
              "1", "--data.batch_size", "16", "--trainer.limit_val_batches", "2"]
    config = ["--config", str(configs / "imagefolder.yaml")]
    fit = check.convmixer("fsdp", ["fit", *config, "--trainer", str(configs / "trainer" / "fsdp.yaml"), *common,
                                   "--model", "convmixer_1536_20", "--trainer.max_steps", "4",
                                   "--trainer.limit_train_batches", "4", "--trainer.num_sanity_val_steps", "0",
                                   "--plots.enabled", "false"], budget_s * 0.7)
    last = run_dir / "last.ckpt"
    out = {"fit_wall_s": fit.wall_s, "checkpoint_mib": last.stat().st_size / 2**20, "command": fit.command}
    left = budget_s - (time.perf_counter() - started)  # the full checkpoint, evaluated on one device without FSDP
    if left < 20:
        return {**out, "validate_without_fsdp": "skipped: time budget spent"}
    check.convmixer("fsdp_validate", ["validate", *config, *common, "--ckpt_path", str(last)], left)
    return {**out, "validate_without_fsdp_acc1": run_metrics(run_dir).get("val/acc1", {}).get(0)}


def recipe_part(check: Check, budget_s: float) -> dict:
    run_dir, seconds = check.work / "recipe_25ep", max(int(budget_s - 40), 30)  # 40 s: start-up, saving, exit
    tiny = ["--model.dim", "16", "--model.depth", "2", "--model.kernel_size", "3", "--data.batch_size", "16",
            "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2",
            "--trainer.accelerator", "cpu"] if check.tiny else []
    run = check.convmixer("recipe_25ep", [
        "fit", "--config", str(official.REPO / "configs" / "cifar10_25ep_92.yaml"), "--data", "ImageFolderDataModule",
        *data_args(check, 32), "--data.mean", official.CIFAR_MEAN, "--data.std", official.CIFAR_STD, "--name",
        "recipe_25ep", "--checkpoint.dirpath", str(run_dir), "--plots.enabled", "false", *tiny, *check.recipe_extra,
        "--trainer.max_time", f"00:{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"], budget_s,
        strict=False)
    metrics = run_metrics(run_dir)
    accs = list(metrics.get("val/acc1", {}).values())
    rate = official.steady(list(metrics.get("train/images_per_sec", {}).values()))
    if run.error and not accs:
        raise RuntimeError(f"recipe_25ep: {run.error}")
    planned = 1 if check.tiny else 25
    return {"epochs_planned": planned, "epochs_validated": len(accs), "val_acc1_per_epoch": accs,
            "final_test_acc": accs[-1] if accs else None, "images_per_sec": rate, "wall_s": run.wall_s,
            "epoch_time_s": check.n_train / rate if rate else None, "returncode": run.returncode,
            "stopped_by": "max_epochs" if len(accs) >= planned else "max_time" if run.returncode == 0 else "an error",
            "note": "validation is the test set (val_fraction 0), as the official script's Test Acc",
            "command": run.command, **({"log_tail": official.tail(run.log, 40)} if run.returncode else {})}


PARTS = [  # name, function(check, budget), wanted s, least s, needs CUDA: the short parts first, the recipe last
    *((name, lambda c, b, n=name: epoch_part(c, n, b), 120 if name == "epoch_compile" else 60,
       60 if name == "epoch_compile" else 25, name == "epoch_16_mixed") for name in EPOCH_PARTS),
    ("official_script", official_part, 60, 25, False),
    ("official_benchmark", lambda c, b: benchmark_part(c, "official_benchmark", b), 60, 25, False),
    ("big_model_checkpointing", lambda c, b: benchmark_part(c, "big_model_checkpointing", b), 90, 30, False),
    ("fsdp", fsdp_part, 90, 40, True),
    ("recipe_25ep", recipe_part, 10_000, 5, False),
]


def run_part(check: Check, name: str, fn, want_s: float, least_s: float, needs_cuda: bool) -> None:
    started, entry = time.perf_counter(), {}
    try:
        left = check.deadline - started - RESERVE_S - GRACE_S
        if needs_cuda and check.device != "cuda":
            raise Skip(NEEDS_CUDA)
        if left < least_s:
            raise Skip(f"skipped: time budget spent ({max(left, 0):.0f} s left, the part needs {least_s:.0f} s)")
        entry = {"budget_s": round(min(want_s, left), 1), **fn(check, min(want_s, left)), "status": "ok"}
    except Skip as why:
        entry.update(status="skipped", reason=str(why))
    except Exception as err:  # noqa: BLE001 -- one part's failure must not lose the other parts' numbers
        entry.update(status="failed", reason=f"{type(err).__name__}: {err}", traceback=traceback.format_exc(),
                     log_tail=official.tail(check.work / "logs" / f"{name}.log", 40))
    check.parts[name] = {**entry, "seconds": round(time.perf_counter() - started, 1)}
    print(f"{name}: {entry['status']}: {entry.get('reason', '')} ({check.parts[name]['seconds']} s)", flush=True)


def gpu_check(tarball: str | None = None, out: str = "gpu_check", official_repo: str | None = None,
              budget_s: float = 480, workers: int | None = None, threads: int | None = None,
              recipe_extra: str = "", work_dir: str | None = None, cpu_tiny: bool = False) -> Path:
    """One check of convmixer-pl on a GPU with the real CIFAR-10 images, within a time budget.

    Args:
        tarball: The CIFAR-10 JPEG tarball (default: $CONVMIXER_CIFAR10_JPG).
        out: The folder for gpu_check.json.
        official_repo: A clone of github.com/locuslab/convmixer-cifar10 (default: $CONVMIXER_OFFICIAL_REPO).
        budget_s: The whole check's seconds, extraction included.
        workers: Loader workers of every run (default: 8, or 0 with cpu_tiny).
        threads: OMP_NUM_THREADS of the subprocesses.
        recipe_extra: More `convmixer fit` options for recipe_25ep, e.g. "--data.device_pipeline true".
        work_dir: Runs and logs (default: a new temporary folder).
        cpu_tiny: Every part in a tiny form on the CPU, convmixer in this process (for CI).
    """
    start = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() and not cpu_tiny else "cpu"
    work = Path(work_dir or tempfile.mkdtemp(prefix="convmixer_gpu_check_")).resolve()
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else None
    print(f"gpu_check: {'tiny, CPU' if cpu_tiny else gpu or 'no CUDA GPU: the CPU'}, budget {budget_s:.0f} s, {work}")
    if cpu_tiny:
        torch.set_num_threads(threads or 1)  # convmixer runs in this process
    root = official.image_root(tarball, None, work)
    recipe = replace(official.Recipe(), epochs=1 if cpu_tiny else 2,
                     workers=(0 if cpu_tiny else 8) if workers is None else workers,
                     **(dict(hdim=16, depth=2, conv_ks=3, batch_size=16) if cpu_tiny else {}))
    check = Check(work, root, cpu_tiny, device, start + budget_s, threads, official_repo, shlex.split(recipe_extra),
                  recipe, 2 if cpu_tiny else 40, official.count_images(root / "train"))
    for part in PARTS:
        run_part(check, *part)
    cells = {name: e.get("reason") or ", ".join(f"{k} {v:.4g}" for k, v in e.items() if isinstance(v, float)
                                                and k not in ("budget_s", "wall_s")) for name, e in check.parts.items()}
    table = "\n".join(["| part | status | result | seconds |", "|---|---|---|---|"] + [
        f"| {name} | {e['status']} | {cells[name]} | {e['seconds']} |" for name, e in check.parts.items()])
    result = {"mode": "cpu-tiny" if cpu_tiny else "full", "elapsed_s": round(time.perf_counter() - start, 1),
              "device": {"gpu": gpu, "cpu": cpu_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
                         "platform": platform.platform()},
              "budget_s": budget_s, "data": str(check.root), "work_dir": str(work), "parts": check.parts,
              "summary_md": table}
    with atomic_write(Path(out) / "gpu_check.json") as f:
        json.dump(result, f, indent=1, default=str)
    print(f"\n{table}\n\nelapsed {result['elapsed_s']} s")
    return Path(out) / "gpu_check.json"


if __name__ == "__main__":
    run_entry_point(lambda: print(f"results: {CLI(gpu_check)}"), prog="benchmarks.gpu_check")
