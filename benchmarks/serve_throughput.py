"""`convmixer serve` under load: requests/s and p50/p95 latency with 1, 16 and 64 concurrent clients, beside the
images/s of batched inference (decoding to top-k) on the same images in this process, in the same run.

    python -m benchmarks.serve_throughput --clients [1,16,64] --servers ["--max_batch_size 8","--max_batch_size 32"]

The uploads are random RGB PNGs of 1.25x the model's input, sent as raw bytes by one thread per client over a
keep-alive connection to a server on a free 127.0.0.1 port, after a warm-up round (docs/serving.md).
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import shlex
import signal
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import torch
from jsonargparse import CLI
from PIL import Image
from torchvision.io import encode_png

from benchmarks.official import convmixer_command, convmixer_env
from convmixer_pl.benchmark import Figure, cpu_name, time_calls
from convmixer_pl.checkpoints import load_module
from convmixer_pl.console import run_entry_point
from convmixer_pl.data.cifar import CIFAR10_CLASSES
from convmixer_pl.files import atomic_write
from convmixer_pl.module import ConvMixerClassifier
from convmixer_pl.preprocessing import DataConfig


def build_checkpoint(path: Path) -> Path:
    """ConvMixer-256/8 for 32 px CIFAR-10 images, random weights: the state dict and hyper-parameters that
    `load_module` (and so `convmixer serve`) reads from a checkpoint of `convmixer fit`."""
    module = ConvMixerClassifier("convmixer_256_8", data_config=DataConfig(32, class_names=CIFAR10_CLASSES))
    with atomic_write(path, "wb") as f:
        torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, f)
    return path


def batched_inference(ckpt_path: str, payloads: list[bytes], batch_size: int, device: str) -> Callable[[], Figure]:
    """A measurement of the server's work on the same uploads, in batches in this process (images/s)."""
    module = load_module(ckpt_path).to(device)
    config = module.data_config
    per_image, per_batch, mode = config.image_transform(), config.batch_transform(), config.pil_mode

    def run_all() -> None:
        with torch.inference_mode():
            for i in range(0, len(payloads), batch_size):
                crops = torch.stack([per_image(Image.open(io.BytesIO(p)).convert(mode))
                                     for p in payloads[i:i + batch_size]])
                module(per_batch(crops.to(device))).softmax(dim=1).topk(min(5, module.num_classes)).indices.tolist()

    return lambda: time_calls(run_all, len(payloads), min_seconds=2.0)


@contextlib.contextmanager
def serving(ckpt_path: str, options: list[str], log: Path, env: dict[str, str]) -> Iterator[int]:
    """`convmixer serve` on a free loopback port, from when it answers GET /health; stopped afterwards (SIGTERM,
    which stops its worker processes too, then SIGKILL)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(convmixer_command("serve", "--ckpt_path", ckpt_path, "--port", str(port),
                                                 "--log_level", "warning", *options),
                               stdout=open(log, "w"), stderr=subprocess.STDOUT, env={**convmixer_env(), **env},
                               start_new_session=True)
    try:
        for _ in range(600):  # 300 s
            if process.poll() is not None:
                raise RuntimeError(f"convmixer serve exited with {process.returncode}: {log.read_text()[-2000:]}")
            with contextlib.suppress(OSError):
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                connection.request("GET", "/health")
                if connection.getresponse().status == 200:
                    break
            time.sleep(0.5)
        else:
            raise RuntimeError(f"convmixer serve did not answer /health within 300 s: {log.read_text()[-2000:]}")
        yield port
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def load(port: int, payloads: list[bytes], requests: int, clients: int) -> dict:
    """`requests` uploads (after a warm-up round) from `clients` threads, one keep-alive connection each."""
    local = threading.local()

    def post(data: bytes) -> tuple[float, int]:
        start = time.perf_counter()
        for again in (False, True):  # a connection the server closed while it was idle is opened again, once
            if again or not hasattr(local, "connection"):
                local.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            try:
                local.connection.request("POST", "/predict", body=data, headers={"Content-Type": "image/png"})
                response = local.connection.getresponse()
                break
            except ConnectionError:  # RemoteDisconnected and BrokenPipeError among them
                if again:
                    raise
        body = response.read()
        if response.status != 200:
            raise RuntimeError(f"POST /predict answered {response.status}: {body[:300]!r}")
        return time.perf_counter() - start, json.loads(body)["batch_size"]

    with ThreadPoolExecutor(clients) as pool:
        sent = [payloads[i % len(payloads)] for i in range(requests)]
        list(pool.map(post, sent[:max(clients, min(requests, 2 * clients))]))  # warm-up
        start = time.perf_counter()
        results = list(pool.map(post, sent))
        wall = time.perf_counter() - start
    latencies = sorted(seconds for seconds, _ in results)
    return {"clients": clients, "requests": requests, "requests_per_s": requests / wall,
            "p50_ms": 1e3 * statistics.median(latencies), "p95_ms": 1e3 * latencies[int(0.95 * (len(latencies) - 1))],
            "mean_batch": statistics.fmean(batch for _, batch in results)}


def serve_throughput(ckpt_path: str | None = None, requests: int = 512, clients: tuple[int, ...] = (1, 16, 64),
                     servers: tuple[str, ...] = ("",), images: int = 256, batch_size: int = 64,
                     accelerator: Literal["cpu", "cuda"] = "cpu", output: str | None = None) -> list[dict]:
    """`convmixer serve` requests/s and latency under concurrent clients, beside batched inference.

    Args:
        ckpt_path: The checkpoint to serve (default: a ConvMixer-256/8 at 32 px built here).
        requests: Timed requests per row.
        clients: Concurrent clients (threads) of each row.
        servers: `convmixer serve` options, one server each, e.g. ["--max_batch_size 32", "OMP_NUM_THREADS=1"]
            (NAME=value words: the server's environment).
        images: Distinct uploads, cycled.
        batch_size: Batch size of the batched inference.
        accelerator: Where the model runs, in the server and in the batched inference.
        output: Also write the rows to this JSON file.
    """
    work = Path(tempfile.mkdtemp(prefix="serve_throughput_"))
    ckpt_path = str(Path(ckpt_path).resolve()) if ckpt_path else str(build_checkpoint(work / "convmixer_256_8.ckpt"))
    size = load_module(ckpt_path).data_config.image_size
    g, side = torch.Generator().manual_seed(0), max(8, round(1.25 * size))
    payloads = [encode_png(torch.randint(0, 256, (3, side, side), dtype=torch.uint8, generator=g)).numpy().tobytes()
                for _ in range(images)]
    batched = batched_inference(ckpt_path, payloads, batch_size, "cuda" if accelerator == "cuda" else "cpu")
    print(f"{ckpt_path}: {size} px, {images} PNG uploads of {side} px; {cpu_name()}, torch {torch.__version__}, "
          f"{accelerator}; batched inference: batch {batch_size}, this process, measured just before each row\n"
          f"{'server options':<40} {'clients':>7} {'requests/s':>10} {'batched/s':>9} {'ratio':>5} {'p50 ms':>8} "
          f"{'p95 ms':>8} {'mean batch':>10} {'others CPUs':>11}")
    rows = []
    for i, options in enumerate(servers):
        words = shlex.split(options)  # NAME=value words set the server's environment, the others are its options
        env = dict(word.split("=", 1) for word in words if "=" in word and not word.startswith("-"))
        options_list = ["--accelerator", accelerator, *(word for word in words if word.split("=")[0] not in env)]
        with serving(ckpt_path, options_list, work / f"serve_{i}.log", env) as port:
            for n in clients:
                figure = batched()  # beside the row: a busy machine's load changes by the minute
                rows.append(row := {"server": options, **load(port, payloads, requests, n),
                                    "batched_images_per_s": figure.rates()[1], "batched_others_cpus": figure.others})
                print(f"{options or '(defaults)':<40} {n:>7} {row['requests_per_s']:>10.1f} {figure.rates()[1]:>9.1f} "
                      f"{row['requests_per_s'] / figure.rates()[1]:>5.2f} {row['p50_ms']:>8.1f} {row['p95_ms']:>8.1f} "
                      f"{row['mean_batch']:>10.2f} {figure.load_text():>11}", flush=True)
    if output:
        with atomic_write(output) as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    run_entry_point(lambda: CLI(serve_throughput), prog="benchmarks.serve_throughput")
