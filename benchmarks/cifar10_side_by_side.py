"""The official CIFAR-10 script and `convmixer fit`, side by side in one run, on the same real images.

Extracts shared/data/cifar10-jpg.tar.gz (or takes --data-root), then for every seed trains (a) the official
script, patched at run time by benchmarks/official.py, and (b) `convmixer fit` with the same model, recipe, batch
size and epochs, and prints for each: the wall time of the whole command, training images/s, the final test
accuracy, their mean and spread over the seeds, and the ratios.

    python benchmarks/cifar10_side_by_side.py --tarball ../shared/data/cifar10-jpg.tar.gz \
        --dim 128 --depth 6 --batch-size 128 --epochs 3 --seeds 0 --threads 2 --output results.json

How each side is measured (docs/real_cifar10.md says more):
- wall time: the whole command, interpreter start to exit (ours: `python -m convmixer_pl.cli fit`, which is what
  the `convmixer` script runs).
- training images/s: the median over the epochs after the first (the first pays for warm-up) of images trained on
  divided by the training loop's time. Ours: `train/images_per_sec` in the run's metrics.csv (from the first batch
  to the end of the epoch, validation left out). Official: the loop's time that the train-time patch prints (the
  script's own per-epoch Time also holds the test pass; images/s from it are reported too).
- final test accuracy: official: the Test Acc of its last epoch. Ours: `val/acc1` of the last epoch, with
  validation on the test set (the official script's setting: `data.val_fraction 0` where ImageFolderDataModule has
  it, else a `val -> test` link), i.e. the same images and the same last-epoch weights. `--ours-test` also runs
  `convmixer test --ckpt_path last` and reports its `test/acc1`.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import inspect
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

try:  # run as a script (benchmarks/ on sys.path) or imported as benchmarks.cifar10_side_by_side
    from official import (
        OfficialRun,
        OfficialScriptNotFound,
        Recipe,
        add_recipe_arguments,
        child_env,
        count_images,
        describe,
        find_official_script,
        recipe_from_args,
        run_command,
        run_official,
        steady,
        subset_root,
        tail,
    )
except ImportError:
    from benchmarks.official import (
        OfficialRun,
        OfficialScriptNotFound,
        Recipe,
        add_recipe_arguments,
        child_env,
        count_images,
        describe,
        find_official_script,
        recipe_from_args,
        run_command,
        run_official,
        steady,
        subset_root,
        tail,
    )

REPO = Path(__file__).resolve().parents[1]
ENV_DATA = "CONVMIXER_CIFAR10_JPG"
DEFAULT_TARBALL = REPO.parent / "shared" / "data" / "cifar10-jpg.tar.gz"
CIFAR_MEAN, CIFAR_STD = "[0.4914,0.4822,0.4465]", "[0.2471,0.2435,0.2616]"  # the official script's


# -- the data -----------------------------------------------------------------------------------------------------
def default_tarball() -> Path | None:
    path = os.environ.get(ENV_DATA) or (DEFAULT_TARBALL if DEFAULT_TARBALL.is_file() else None)
    return Path(path) if path else None


def extract_tarball(tarball: Path, dest: Path) -> Path:
    """Extract `tarball` into `dest` and return the folder holding train/ and test/ (the top, or its one
    sub-folder)."""
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tarball) as archive:
        if hasattr(tarfile, "data_filter"):  # no absolute paths or links out of dest (Python >= 3.11.4)
            archive.extractall(dest, filter="data")
        else:
            archive.extractall(dest)  # noqa: S202 -- our own data set's archive
    for root in (dest, *sorted(p for p in dest.iterdir() if p.is_dir())):
        if (root / "train").is_dir() and (root / "test").is_dir():
            return root
    raise SystemExit(f"{tarball}: no train/ and test/ folders in it")


def data_root_from_args(args: argparse.Namespace, work: Path) -> Path:
    """--data-root as it is, else the tarball extracted under `work` (its time is printed)."""
    if args.data_root:
        return Path(args.data_root).resolve()
    tarball = Path(args.tarball) if args.tarball else default_tarball()
    if tarball is None or not tarball.is_file():
        raise SystemExit(f"no data: pass --tarball (or set {ENV_DATA}) or --data-root")
    start = time.perf_counter()
    root = extract_tarball(tarball, work / "data")
    print(f"extracted {tarball} to {root} in {time.perf_counter() - start:.1f} s")
    return root


def use_this_checkout() -> None:
    """convmixer_pl importable from this checkout also where it is not pip-installed (a GPU machine runs it from
    the copied tree); the subprocesses get it through PYTHONPATH (`convmixer_env`)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))


def image_folder_options() -> set[str]:
    """The options ImageFolderDataModule takes in this checkout (its own and the loader's), so that flags another
    engineer has not added yet (gpu_pipeline, val_fraction) are used only where they exist."""
    use_this_checkout()
    from convmixer_pl.data import ImageDataModule, ImageFolderDataModule

    names = set()
    for cls in (ImageFolderDataModule, ImageDataModule):
        names |= {name for name, p in inspect.signature(cls.__init__).parameters.items()
                  if name != "self" and p.kind is not p.VAR_KEYWORD}
    return names


def ours_view(data_root: Path, dest: Path, val_link: bool) -> Path:
    """A folder linking data_root's train/ and test/, and val/ to test/ where ImageFolderDataModule has no
    val_fraction (it validates on val/): validation on the test set, as the official script does."""
    dest.mkdir(parents=True, exist_ok=True)
    for split, target in (("train", "train"), ("test", "test")) + ((("val", "test"),) if val_link else ()):
        link = dest / split
        if not link.exists():
            link.symlink_to((data_root / target).resolve(), target_is_directory=True)
    return dest


# -- our side -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Speed:
    """Our speed options (the recipe is the official one)."""

    precision: str = "bf16-mixed"
    channels_last: str = "auto"  # auto (the measured default), on, off
    compile: bool = False
    gpu_pipeline: bool = False
    extra: tuple[str, ...] = ()  # more `convmixer fit` flags, verbatim


def convmixer_base() -> list[str]:
    """`convmixer` as this interpreter runs it (also where the console script is not installed)."""
    return [sys.executable, "-m", "convmixer_pl.cli"]


def convmixer_env(threads: int | None = None) -> dict[str, str]:
    env = child_env(threads)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["COLUMNS"] = "200"
    env.pop("CONVMIXER_DEBUG", None)
    return env


def ours_fit_command(recipe: Recipe, data_root: Path, run_dir: Path, device: str, seed: int, speed: Speed,
                     options: set[str]) -> list[str]:
    """`convmixer fit` on configs/cifar10.yaml with the data module switched to ImageFolderDataModule and every
    recipe value set from `recipe` (the official flags' values), so the config's own values do not matter."""
    r = recipe
    cmd = [*convmixer_base(), "fit", "--config", str(REPO / "configs" / "cifar10.yaml"),
           "--name", run_dir.name, "--checkpoint.dirpath", str(run_dir), "--seed_everything", str(seed),
           "--data", "ImageFolderDataModule", "--data.root", str(data_root), "--data.image_size", "32",
           "--data.crop_pct", "1.0", "--data.interpolation", "bilinear", "--data.mean", CIFAR_MEAN,
           "--data.std", CIFAR_STD,
           "--data.augment.scale", f"[{r.scale},1.0]", "--data.augment.ratio", "[1.0,1.0]",
           "--data.augment.hflip", "0.5", "--data.augment.ra_num_ops", str(r.ra_n),
           "--data.augment.ra_magnitude", str(r.ra_m), "--data.augment.color_jitter", str(r.jitter),
           "--data.augment.re_prob", str(r.reprob), "--data.augment.re_mode", "const",
           "--data.augment.mixup_alpha", "0", "--data.augment.cutmix_alpha", "0",
           "--data.batch_size", str(r.batch_size), "--data.num_workers", str(r.workers), "--data.seed", str(seed),
           "--model.dim", str(r.hdim), "--model.depth", str(r.depth), "--model.kernel_size", str(r.conv_ks),
           "--model.patch_size", str(r.psize), "--model.act", "gelu", "--model.optimizer", "adamw",
           "--model.lr", str(r.lr_max), "--model.weight_decay", str(r.wd), "--model.opt_eps", "1e-8",
           "--model.label_smoothing", "0", "--model.scheduler", "onecycle",
           "--model.channels_last", {"auto": "null", "on": "true", "off": "false"}[speed.channels_last],
           "--model.compile", str(speed.compile).lower(),
           "--trainer.accelerator", "cpu" if device == "cpu" else "gpu", "--trainer.devices", "1",
           "--trainer.precision", speed.precision, "--trainer.max_epochs", str(r.epochs),
           "--trainer.benchmark", str(device != "cpu").lower(), "--trainer.gradient_clip_val", "null",
           "--trainer.enable_progress_bar", "false",
           "--plots.enabled", "false"]  # the official script draws no pictures
    if "val_fraction" in options:
        cmd += ["--data.val_fraction", "0"]
    if speed.gpu_pipeline:
        cmd += ["--data.gpu_pipeline", "true"]
    return cmd + list(speed.extra)


def read_metrics(run_dir: Path) -> list[dict]:
    """Per epoch, from the newest metrics.csv under run_dir/lightning_logs: images_per_sec and val_acc1 (the
    CSV logger writes training and validation values of an epoch on separate rows)."""
    files = sorted(run_dir.glob("lightning_logs/version_*/metrics.csv"), key=lambda p: int(p.parent.name[8:]))
    if not files:
        return []
    epochs: dict[int, dict] = {}
    with open(files[-1]) as f:
        for row in csv.DictReader(f):
            if not row.get("epoch"):
                continue
            entry = epochs.setdefault(int(row["epoch"]), {"epoch": int(row["epoch"])})
            for key, name in (("train/images_per_sec", "images_per_sec"), ("val/acc1", "val_acc1"),
                              ("train/acc1", "train_acc1"), ("test/acc1", "test_acc1")):
                if row.get(key):
                    entry[name] = float(row[key])
    return [epochs[e] for e in sorted(epochs)]


@dataclass
class OursRun:
    device: str
    seed: int
    speed: dict
    data_root: str
    command: list[str] = field(default_factory=list)
    wall_s: float | None = None
    returncode: int | None = None
    timed_out: bool = False
    epochs: list[dict] = field(default_factory=list)
    train_images_per_epoch: int | None = None
    train_times_s: list[float] = field(default_factory=list)  # images per epoch / images/s
    train_images_per_sec: float | None = None  # median over epochs after the first
    final_test_acc: float | None = None  # val/acc1 of the last epoch = the test set
    test_command_acc1: float | None = None  # `convmixer test --ckpt_path last`, with --ours-test
    test_command_wall_s: float | None = None
    error: str | None = None
    log: str | None = None


def images_per_epoch(n_train: int, batch_size: int) -> int:
    """Ours drops the last partial batch when there is more than one batch (the official script keeps it)."""
    return n_train // batch_size * batch_size if n_train > batch_size else n_train


def run_ours(recipe: Recipe, data_root: Path, work: Path, device: str, seed: int, speed: Speed,
             options: set[str], time_budget_s: float | None = None, threads: int | None = None,
             test: bool = False, tag: str = "") -> OursRun:
    run_dir = work / f"ours{tag}_seed{seed}"
    command = ours_fit_command(recipe, data_root, run_dir, device, seed, speed, options)
    run = OursRun(device, seed, dataclasses.asdict(speed), str(data_root), command)
    result = run_command(command, work / f"ours{tag}_seed{seed}.log", time_budget_s, convmixer_env(threads), cwd=work)
    run.wall_s, run.returncode, run.timed_out, run.log = result.wall_s, result.returncode, result.timed_out, result.log
    run.epochs = read_metrics(run_dir)
    run.train_images_per_epoch = images_per_epoch(count_images(data_root / "train"), recipe.batch_size)
    rates = [e.get("images_per_sec") for e in run.epochs]
    run.train_times_s = [run.train_images_per_epoch / r if r else None for r in rates]
    run.train_images_per_sec = steady(rates)
    accs = [e["val_acc1"] for e in run.epochs if "val_acc1" in e]
    run.final_test_acc = accs[-1] if accs else None
    if result.timed_out:
        run.error = f"stopped after the time budget of {time_budget_s:.0f} s ({len(accs)} epoch(s) validated)"
    elif result.returncode != 0:
        run.error = f"exit code {result.returncode}: {error_line(result.log)}"
    elif test:
        test_cmd = [*convmixer_base(), "test", *command[command.index("--config"):], "--ckpt_path", "last"]
        tested = run_command(test_cmd, work / f"ours{tag}_seed{seed}_test.log", time_budget_s, convmixer_env(threads),
                             cwd=work)
        run.test_command_wall_s = tested.wall_s
        test_rows = [e for e in read_metrics(run_dir) if "test_acc1" in e]
        run.test_command_acc1 = test_rows[-1]["test_acc1"] if test_rows else None
    return run


def error_line(log: str) -> str:
    """The `convmixer: error: ...` line of a failed run, else the log's last lines."""
    lines = tail(log, 200).splitlines()
    errors = [line for line in lines if "error:" in line.lower()]
    return errors[-1].strip() if errors else "\n".join(lines[-5:])


def describe_ours(run: OursRun) -> str:
    def num(value, fmt):
        return "-" if value is None else format(value, fmt)

    lines = [f"ours ({run.device}, seed {run.seed}): wall {num(run.wall_s, '.1f')} s, {len(run.epochs)} epoch(s), "
             f"train images/s {num(run.train_images_per_sec, '.1f')}, final test acc (val/acc1 on the test set) "
             f"{num(run.final_test_acc, '.4f')}"]
    if run.test_command_acc1 is not None:
        lines.append(f"  convmixer test --ckpt_path last: test/acc1 {run.test_command_acc1:.4f} "
                     f"({run.test_command_wall_s:.1f} s)")
    for e, seconds in zip(run.epochs, run.train_times_s, strict=False):
        lines.append(f"  epoch {e['epoch']}: {num(e.get('images_per_sec'), '.1f')} images/s, training loop "
                     f"{num(seconds, '.2f')} s, val/acc1 {num(e.get('val_acc1'), '.4f')}")
    if run.error:
        lines.append(f"  error: {run.error}")
    return "\n".join(lines)


# -- summary ------------------------------------------------------------------------------------------------------
def spread(values: list[float | None]) -> dict:
    """mean, sample standard deviation (None for one value), min, max, n."""
    values = [v for v in values if v is not None]
    if not values:
        return {"n": 0, "mean": None, "sd": None, "min": None, "max": None}
    return {"n": len(values), "mean": statistics.fmean(values),
            "sd": statistics.stdev(values) if len(values) > 1 else None, "min": min(values), "max": max(values)}


def summarise_runner(runs: list) -> dict:
    return {key: spread([getattr(r, key) for r in runs])
            for key in ("wall_s", "train_images_per_sec", "final_test_acc")}


def ratios(official: dict, ours: dict) -> dict:
    """wall official/ours, images/s ours/official, and the accuracy difference against the seeds' spread."""
    def mean(side, key):
        return side[key]["mean"]

    out: dict = {}
    if mean(official, "wall_s") and mean(ours, "wall_s"):
        out["wall_official_over_ours"] = mean(official, "wall_s") / mean(ours, "wall_s")
    if mean(official, "train_images_per_sec") and mean(ours, "train_images_per_sec"):
        out["images_per_sec_ours_over_official"] = (mean(ours, "train_images_per_sec")
                                                    / mean(official, "train_images_per_sec"))
    a, b = ours["final_test_acc"], official["final_test_acc"]
    if a["mean"] is not None and b["mean"] is not None:
        out["acc_ours_minus_official"] = a["mean"] - b["mean"]
        if a["sd"] is not None and b["sd"] is not None:
            # the difference in standard errors of the difference of the two means
            se = math.sqrt(a["sd"] ** 2 / a["n"] + b["sd"] ** 2 / b["n"])
            out["acc_difference_in_standard_errors"] = out["acc_ours_minus_official"] / se if se else None
    return out


def fmt_spread(s: dict, fmt: str) -> str:
    if s["mean"] is None:
        return "-"
    text = format(s["mean"], fmt)
    if s["sd"] is not None:
        text += f" ± {format(s['sd'], fmt)} (range {format(s['min'], fmt)}–{format(s['max'], fmt)})"
    return text + f" [n={s['n']}]"


def print_summary(summary: dict, ratio: dict, skipped: dict) -> None:
    print("\n| runner | wall time of the command, s | training images/s | final test accuracy |")
    print("|---|---|---|---|")
    for name, s in summary.items():
        print(f"| {name} | {fmt_spread(s['wall_s'], '.1f')} | {fmt_spread(s['train_images_per_sec'], '.1f')} | "
              f"{fmt_spread(s['final_test_acc'], '.4f')} |")
    for name, reason in skipped.items():
        print(f"| {name} | skipped: {reason} | | |")
    print("(mean ± sample standard deviation over seeds)")
    if "wall_official_over_ours" in ratio:
        print(f"wall time official/ours: {ratio['wall_official_over_ours']:.2f}x")
    if "images_per_sec_ours_over_official" in ratio:
        print(f"training images/s ours/official: {ratio['images_per_sec_ours_over_official']:.2f}x")
    if "acc_ours_minus_official" in ratio:
        z = ratio.get("acc_difference_in_standard_errors")
        against = (f" = {z:.2f} standard errors of the difference of the means" if z is not None else
                   " (one seed per runner: no spread to compare it with; use --seeds 0 1 2)")
        print(f"final test accuracy ours - official: {ratio['acc_ours_minus_official'] * 100:+.2f} points{against}")


DIFFERENCES = [
    "weight decay: the official AdamW decays every parameter; ours decays conv and linear weights only, not biases "
    "or BatchNorm parameters",
    "last batch: the official loader keeps the last partial batch; ours drops it when there is more than one batch",
    "precision: the official script runs fp32 on the CPU and fp16 autocast on a GPU; ours runs --ours-precision",
    "lr schedule: official breakpoints epochs*2//5 and epochs*4//5 (integers), ours 2T/5 and 4T/5 of the steps "
    "(identical when epochs is a multiple of 5)",
    "loader: the official workers restart every epoch and do not pin memory; ours persist and pin on a GPU",
    "checkpoints: ours writes epochNNN.ckpt and last.ckpt every epoch and logs to TensorBoard and CSV (in its wall "
    "time); the official script saves nothing",
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--tarball", help=f"the CIFAR-10 JPEG tarball (default: ${ENV_DATA}, else {DEFAULT_TARBALL})")
    data.add_argument("--data-root", help="an extracted folder with train/ and test/ instead of the tarball")
    data.add_argument("--train-subset", type=int, help="train both on the same fixed seeded subset of this many "
                                                       "training images (the whole test set is kept)")
    data.add_argument("--subset-seed", type=int, default=0)
    p.add_argument("--runners", default="official,ours", help="comma-separated subset of official,ours")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run of each runner per seed")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS of both runs (default: torch's own choice)")
    p.add_argument("--time-budget-s", type=float, help="stop any one run after this many seconds")
    p.add_argument("--official-script", help="the official train.py (default: $CONVMIXER_OFFICIAL_SCRIPT, else the "
                                             "locuslab/convmixer-cifar10 mirror where present)")
    p.add_argument("--work-dir", help="runs, logs and the extracted data (default: a new temporary folder)")
    p.add_argument("--output", help="write every number to this JSON file")
    ours = p.add_argument_group("our speed options (the recipe stays the official one)")
    ours.add_argument("--ours-precision", default="bf16-mixed", choices=("32-true", "bf16-mixed", "16-mixed"))
    ours.add_argument("--ours-channels-last", default="auto", choices=("auto", "on", "off"))
    ours.add_argument("--ours-compile", action="store_true")
    ours.add_argument("--ours-gpu-pipeline", action="store_true", help="--data.gpu_pipeline true")
    ours.add_argument("--ours-extra", action="append", default=[],
                      help="more `convmixer fit` flags in one shell-quoted string, e.g. "
                           "\"--trainer.log_every_n_steps 10\"; repeatable")
    ours.add_argument("--ours-test", action="store_true", help="also run `convmixer test --ckpt_path last`")
    # the model and batch under the names of the issue; the official names (--hdim, --conv-ks, ...) work too
    add_recipe_arguments(p, Recipe())
    p.add_argument("--dim", dest="hdim", type=int, help="= --hdim")
    p.add_argument("--kernel", dest="conv_ks", type=int, help="= --conv-ks")
    p.add_argument("--patch", dest="psize", type=int, help="= --psize")
    args = p.parse_args(argv)
    bad = [r for r in args.runners.split(",") if r not in ("official", "ours")]
    if bad or not args.runners:
        p.error(f"--runners: {','.join(bad) or 'nothing'} not in official,ours")
    return args


def fix_aliases(args: argparse.Namespace) -> None:
    """--dim/--kernel/--patch share dest with --hdim/--conv-ks/--psize; None means the alias was not given."""
    defaults = Recipe()
    for name in ("hdim", "conv_ks", "psize"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(defaults, name))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    fix_aliases(args)
    recipe = recipe_from_args(args)
    runners = args.runners.split(",")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="convmixer_side_by_side_")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    notes = [w for w in [recipe.schedule_warning()] if w]
    for note in notes:
        print(f"warning: {note}")
    skipped: dict[str, str] = {}
    source = None
    if "official" in runners:
        try:
            source, origin = find_official_script(args.official_script)
            print(f"official script: {origin}")
        except OfficialScriptNotFound as err:
            skipped["official"] = str(err)
            print(f"official: skipped: {err}")
    root = data_root_from_args(args, work)
    if args.train_subset:
        root = subset_root(root, args.train_subset, args.subset_seed, work / f"subset_{args.train_subset}")
    options = image_folder_options() if "ours" in runners else set()
    speed = Speed(args.ours_precision, args.ours_channels_last, args.ours_compile, args.ours_gpu_pipeline,
                  tuple(word for extra in args.ours_extra for word in shlex.split(extra)))
    if "ours" in runners and speed.gpu_pipeline and "gpu_pipeline" not in options:
        skipped["ours"] = "ImageFolderDataModule has no gpu_pipeline option in this checkout (drop --ours-gpu-pipeline)"
        print(f"ours: skipped: {skipped['ours']}")
    ours_root = ours_view(root, work / "ours_data", val_link="val_fraction" not in options)
    n_train = count_images(root / "train")
    print(f"data: {root} ({n_train} training images, {count_images(root / 'test')} test images); "
          f"ours validates on the test set via {'data.val_fraction 0' if 'val_fraction' in options else 'val -> test'}")
    print(f"recipe: {' '.join(recipe.official_flags())}; seeds {args.seeds}; device {args.device}; "
          f"threads {args.threads or 'default'}; ours: {speed}")
    load_before = os.getloadavg()
    official_runs: list[OfficialRun] = []
    ours_runs: list[OursRun] = []
    for seed in args.seeds:  # alternate the runners, so a slow spell of a shared machine hits both
        if "official" in runners and "official" not in skipped:
            official_runs.append(run_official(source, recipe, root, args.device, seed, work / "official",
                                              args.time_budget_s, args.threads))
            print(describe(official_runs[-1]), flush=True)
        if "ours" in runners and "ours" not in skipped:
            ours_runs.append(run_ours(recipe, ours_root, work, args.device, seed, speed, options,
                                      args.time_budget_s, args.threads, args.ours_test))
            print(describe_ours(ours_runs[-1]), flush=True)
    summary = {}
    if official_runs:
        summary["official"] = summarise_runner(official_runs)
    if ours_runs:
        summary["ours"] = summarise_runner(ours_runs)
    ratio = ratios(summary["official"], summary["ours"]) if len(summary) == 2 else {}
    print_summary(summary, ratio, skipped)
    print("differences between the runners besides the speed options:\n" + "\n".join(f"- {d}" for d in DIFFERENCES))
    result = {"args": vars(args), "recipe": dataclasses.asdict(recipe), "data_root": str(root),
              "train_images": n_train, "work_dir": str(work), "notes": notes, "skipped": skipped,
              "official": [dataclasses.asdict(r) for r in official_runs],
              "ours": [dataclasses.asdict(r) for r in ours_runs], "summary": summary, "ratios": ratio,
              "differences": DIFFERENCES,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0],
                          "load_average_before": load_before, "load_average_after": os.getloadavg()}}
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=1))
        print(f"results: {args.output}")
    if not args.work_dir and not args.data_root:  # our own temporary folder: drop the 240 MB of images, keep logs
        shutil.rmtree(work / "data", ignore_errors=True)
    print(f"runs and logs: {work}")
    return result


if __name__ == "__main__":
    main()
