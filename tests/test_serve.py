"""`convmixer serve`: the real server (the installed command, in its own processes) on a loopback port, spoken to
over HTTP: answers equal to the checkpoint's own top-k, batching under concurrent requests, a 4xx with a one-line
reason for each kind of bad upload, the page (also in a headless Chromium), bad command lines, and the throughput
benchmark in its tiny mode."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
import zlib
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import convmixer_command
from PIL import Image

from convmixer_pl.checkpoints import load_module
from convmixer_pl.cli import main as convmixer_main
from convmixer_pl.data.images import read_image
from convmixer_pl.serve import ConvMixerAPI, PixelBudget, UploadRules, decode

MAX_BYTES = 4096  # the test server's --max_bytes: the digit images are far smaller, BIG_IMAGE is larger
MAX_BATCH_SIZE = 8
CHROMIUM = os.environ.get("CONVMIXER_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


# -- talking to the server -------------------------------------------------------------------------------------------

@dataclass
class Server:
    port: int
    log: Path

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])

    def request(self, method: str, path: str, body=None, headers: dict | None = None) -> tuple[int, str, bytes]:
        """(status, Content-Type, body) of one request on a fresh connection."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, response.getheader("Content-Type", ""), response.read()
        finally:
            connection.close()

    def predict(self, body, headers: dict | None = None) -> tuple[int, dict]:
        status, _, content = self.request("POST", "/predict", body, headers)
        return status, json.loads(content)


def multipart(data: bytes, field: str = "file", filename: str = "digit.png") -> tuple[bytes, dict]:
    """A multipart/form-data body holding `data` as the file field `field`, as a browser's FormData sends it."""
    boundary = "convmixer-test-boundary-7d2f"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
            f"Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_healthy(server: Server, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"convmixer serve exited with {process.returncode}:\n{server.tail()}"
        try:
            if server.request("GET", "/health")[0] == 200:
                return
        except OSError:
            pass  # not listening yet
        time.sleep(0.5)
    raise AssertionError(f"convmixer serve did not answer GET /health within {timeout} s:\n{server.tail()}")


def stop(process: subprocess.Popen, server: Server) -> None:
    """SIGTERM, as `kill` or `docker stop` sends it: the server and every process it started must be gone."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # its workers, the HTTP process and LitServe's manager
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)
        raise AssertionError(f"processes of convmixer serve outlived it after SIGTERM:\n{server.tail()}")
    except subprocess.TimeoutExpired:
        raise AssertionError(f"convmixer serve did not stop within 60 s of SIGTERM:\n{server.tail()}") from None
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # only after a failure: leave nothing running
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def server(digits_run, tmp_path_factory):
    """`convmixer serve` of the tiny digits checkpoint on a free loopback port, batching up to 8 requests."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    command = [convmixer_command(), "serve", "--ckpt_path", str(digits_run / "last.ckpt"), "--port", str(port),
               "--accelerator", "cpu", "--max_batch_size", str(MAX_BATCH_SIZE), "--batch_timeout", "0.1",
               "--max_bytes", str(MAX_BYTES)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("CONVMIXER_DEBUG", None)
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    served = Server(port, log)
    try:
        wait_until_healthy(served, process)
        yield served
    finally:
        stop(process, served)


# -- images and what the checkpoint itself says about them -----------------------------------------------------------

def save_digit(pixels: np.ndarray, path: Path, i: int) -> Path:
    """A scikit-learn digit (8x8, 0..16) as an image file: grey PNG, RGB non-square PNG or RGB JPEG in turn, larger
    than the model's 8 px input, so the server converts, resizes and crops as `convmixer predict` does."""
    image = Image.fromarray((pixels * 255 / 16).astype(np.uint8), "L")
    kind = i % 3
    if kind == 0:
        image.resize((24, 24), Image.NEAREST).save(path.with_suffix(".png"))
    elif kind == 1:
        image.resize((20, 28), Image.BILINEAR).convert("RGB").save(path.with_suffix(".png"))
    else:
        image.resize((32, 32), Image.BILINEAR).convert("RGB").save(path.with_suffix(".jpg"), quality=95)
    return path.with_suffix(".png" if kind < 2 else ".jpg")


def checkpoint_probs(ckpt: Path, paths: list[Path]) -> tuple[torch.Tensor, list[str]]:
    """Class probabilities of each file computed in this process, one image at a time, with the checkpoint's own
    preprocessing: what the server must answer."""
    module = load_module(ckpt)
    transform, mode = module.eval_transform(), module.data_config.pil_mode
    with torch.no_grad():
        probs = torch.stack([module(transform(read_image(str(path), mode))[None])[0].softmax(0) for path in paths])
    return probs, module.class_names


@dataclass
class Digits:
    paths: list[Path]
    probs: torch.Tensor  # (images, classes)
    names: list[str]

    def top1(self, i: int) -> str:
        return self.names[int(self.probs[i].argmax())]


@pytest.fixture(scope="module")
def digits(digits_run, tmp_path_factory) -> Digits:
    """16 digit images whose top class the checkpoint picks by a clear margin (ties could order either way)."""
    from sklearn.datasets import load_digits

    folder = tmp_path_factory.mktemp("digit_images")
    pixels = load_digits().images[:60]
    paths = [save_digit(image, folder / f"digit_{i:02d}", i) for i, image in enumerate(pixels)]
    probs, names = checkpoint_probs(digits_run / "last.ckpt", paths)
    top2 = probs.topk(2, dim=1).values
    clear = [i for i in range(len(paths)) if top2[i, 0] - top2[i, 1] > 2e-3][:16]
    assert len(clear) == 16, "the tiny checkpoint should separate its top two classes on most digits"
    return Digits([paths[i] for i in clear], probs[clear], names)


def assert_top_k(answer: dict, probs: torch.Tensor, names: list[str], k: int = 5) -> None:
    """`answer` holds the k most probable classes of `probs`, most probable first, with their probabilities."""
    assert set(answer) == {"top_k", "batch_size"}
    entries = answer["top_k"]
    assert len(entries) == k and all(set(entry) == {"class", "prob"} for entry in entries)
    got = [entry["prob"] for entry in entries]
    assert got == sorted(got, reverse=True)
    for entry in entries:
        assert entry["prob"] == pytest.approx(float(probs[names.index(entry["class"])]), abs=1e-5), entry
    assert entries[0]["class"] == names[int(probs.argmax())]
    assert got[-1] >= float(probs.topk(k + 1).values[-1]) - 1e-5  # none left out is more probable


# -- the predict route ----------------------------------------------------------------------------------------------

def test_multipart_and_raw_uploads_get_the_checkpoints_own_top_k(server, digits):
    for i in (0, 1, 2):  # grey PNG, RGB PNG, RGB JPEG
        data = digits.paths[i].read_bytes()
        content_type = "image/jpeg" if digits.paths[i].suffix == ".jpg" else "image/png"
        answers = [server.predict(*multipart(data)),
                   server.predict(data, {"Content-Type": content_type}),
                   server.predict(data, {"Content-Type": "application/octet-stream"}),
                   server.predict(data)]  # no Content-Type at all
        for status, answer in answers:
            assert status == 200, answer
        assert all(answer["top_k"] == answers[0][1]["top_k"] for _, answer in answers)
        assert_top_k(answers[0][1], digits.probs[i], digits.names)


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(server, digits):
    count = len(digits.paths)
    answers: list = [None] * count
    start = threading.Barrier(count)

    def send(i: int) -> None:
        data = digits.paths[i].read_bytes()
        start.wait()
        answers[i] = server.predict(data, {"Content-Type": "application/octet-stream"})

    threads = [threading.Thread(target=send, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for i, (status, answer) in enumerate(answers):
        assert status == 200, answer
        assert answer["top_k"][0]["class"] == digits.top1(i)
        assert_top_k(answer, digits.probs[i], digits.names)
    sizes = [answer["batch_size"] for _, answer in answers]
    assert max(sizes) > 1, f"16 simultaneous requests never shared a forward pass: {sizes}"
    assert max(sizes) <= MAX_BATCH_SIZE
    for size in set(sizes):  # every request of a batch of n reports n: the sizes are honest
        assert sizes.count(size) % size == 0, sizes


def png_declaring(width: int, height: int) -> bytes:
    """A valid PNG header declaring width x height grey pixels, with no pixel data: a decompression bomb's shape
    at no cost (PIL refuses it from the header, before decoding anything)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def random_png(side: int) -> bytes:
    buffer = BytesIO()
    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


BIG_IMAGE = random_png(48)  # a real image, larger than MAX_BYTES
PNG = {"Content-Type": "image/png"}
BAD_UPLOADS = {  # id: (body, headers, status, words the reason must contain)
    "not-an-image": (b"this is not an image", PNG, 400, "not an image"),
    "truncated-png": (random_png(16)[:300], PNG, 400, "not an image"),
    "empty-body": (b"", PNG, 400, "empty"),
    "empty-file-field": (*multipart(b""), 400, "empty"),
    "multipart-without-boundary": (random_png(4), {"Content-Type": "multipart/form-data"}, 400,
                                   "malformed multipart form"),
    "no-file-field": (*multipart(random_png(4), field="image"), 400, "no file field `file`"),
    "decompression-bomb": (png_declaring(20_000, 20_000), PNG, 413, "decompression bomb"),
    "over-pil-pixel-limit": (png_declaring(10_000, 10_000), PNG, 413, "decompression bomb"),  # PIL only warns
    "over-max-bytes": (BIG_IMAGE, PNG, 413, f"--max_bytes {MAX_BYTES}"),
    "over-max-bytes-multipart": (*multipart(BIG_IMAGE), 413, f"--max_bytes {MAX_BYTES}"),
    "json": (b'{"image": "digit.png"}', {"Content-Type": "application/json"}, 415, "Content-Type application/json"),
    "text": (b"hello", {"Content-Type": "text/plain"}, 415, "Content-Type text/plain"),
    "url-encoded-form": (b"file=digit.png", {"Content-Type": "application/x-www-form-urlencoded"}, 415,
                         "is not an image upload"),
}


@pytest.mark.parametrize("case", list(BAD_UPLOADS) + ["over-max-bytes-chunked"])
def test_bad_uploads_get_a_4xx_with_a_one_line_reason_and_the_server_keeps_serving(server, digits, case):
    if case == "over-max-bytes-chunked":  # no Content-Length: the body is cut off while it streams in
        body, headers, status, words = iter([BIG_IMAGE[:3000], BIG_IMAGE[3000:]]), PNG, 413, "--max_bytes"
    else:
        body, headers, status, words = BAD_UPLOADS[case]
    got, answer = server.predict(body, headers)
    assert got == status, answer
    assert set(answer) == {"detail"} and isinstance(answer["detail"], str)
    reason = answer["detail"]
    assert words in reason and "\n" not in reason and len(reason) < 400, reason
    assert re.search(r"\bsend\b|\bPOST\b", reason, re.I), reason  # and what to send instead
    got, answer = server.predict(digits.paths[0].read_bytes(), PNG)
    assert got == 200, answer
    assert_top_k(answer, digits.probs[0], digits.names)


def test_the_model_answers_one_crop_or_a_batch_alike(digits_run, digits):
    """ConvMixerAPI in this process: LitServe hands predict one crop without batching, a stack of them with it."""
    api = ConvMixerAPI(str(digits_run / "last.ckpt"), top_k=3)
    api.setup("cpu")
    rules = UploadRules("L", api.model.data_config.image_transform(), MAX_BYTES, PixelBudget(10**8))
    crops = [api.decode_request(decode(path.read_bytes(), rules)) for path in digits.paths[:3]]
    alone = [api.predict(crop) for crop in crops]
    together = api.predict(torch.stack(crops))
    assert [answer["batch_size"] for answer in alone] == [1, 1, 1]
    assert [answer["batch_size"] for answer in together] == [3, 3, 3]
    for i, (one, batched) in enumerate(zip(alone, together, strict=True)):
        assert_top_k(one, digits.probs[i], digits.names, k=3)
        assert [entry["class"] for entry in batched["top_k"]] == [entry["class"] for entry in one["top_k"]]
        assert [entry["prob"] for entry in batched["top_k"]] == pytest.approx([e["prob"] for e in one["top_k"]],
                                                                              abs=1e-5)


# -- the page ----------------------------------------------------------------------------------------------------------

def test_page_is_served_self_contained_and_posts_to_predict(server):
    status, content_type, body = server.request("GET", "/")
    page = body.decode()
    assert status == 200 and content_type.startswith("text/html")
    assert 'type="file"' in page and 'fetch("predict"' in page and 'form.append("file"' in page
    assert "last.ckpt: 10 classes, 1×8×8 input" in page
    # nothing from elsewhere: no external script, style sheet, font or image
    assert not re.search(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//|@import|url\(""", page)
    assert server.request("GET", "/health")[2] == b"ok"  # LitServe's health check stays where it was
    info = json.loads(server.request("GET", "/info")[2])
    assert info["model"]["class_names"] == [str(i) for i in range(10)]


def test_page_in_chromium_shows_the_top_classes_as_bars(server, digits, digits_run, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed")
    if not CHROMIUM:
        pytest.skip("no Chromium on PATH (apt install chromium, or set CONVMIXER_CHROMIUM to its path)")
    image = tmp_path / "digit.png"  # the first digit, large enough to see in the screenshot
    Image.open(digits.paths[0]).convert("L").resize((96, 96), Image.NEAREST).save(image)
    probs, names = checkpoint_probs(digits_run / "last.ckpt", [image])
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not an image")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 720, "height": 560})
            page.goto(server.url("/"))
            page.set_input_files("#file", str(not_an_image))  # a bad file: its one-line reason, no bars
            page.wait_for_function("document.getElementById('error').textContent.length > 0", timeout=30_000)
            assert "not an image" in page.text_content("#error") and page.locator("#bars .row").count() == 0
            page.set_input_files("#file", str(image))
            page.wait_for_selector("#bars .row", timeout=30_000)
            rows = page.locator("#bars .row")
            assert rows.count() == 5 and page.text_content("#error") == ""
            shown = rows.locator(".name").all_text_contents()
            percents = rows.locator(".pct").all_text_contents()
            assert shown[0] == names[int(probs[0].argmax())]
            assert percents == [f"{100 * float(probs[0, names.index(name)]):.1f}%" for name in shown]
            widths = [rows.nth(i).locator(".bar").evaluate("bar => bar.style.width") for i in range(5)]
            assert widths == percents  # each bar is as long as its percentage
            screenshot = tmp_path / "serve_page.png"
            page.screenshot(path=str(screenshot), full_page=True)
            if os.environ.get("CONVMIXER_SCREENSHOT"):
                Path(os.environ["CONVMIXER_SCREENSHOT"]).parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=os.environ["CONVMIXER_SCREENSHOT"], full_page=True)
        finally:
            browser.close()
    assert screenshot.stat().st_size > 1000
    print(f"screenshot of the page: {screenshot}")


# -- memory -------------------------------------------------------------------------------------------------------

def process_group_memory(pgid: int) -> dict[int, tuple[int, int]]:
    """{pid: (resident KiB, peak resident KiB)} of every process in the group (the server, its HTTP process, its
    inference worker)."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit() or os.getpgid(int(entry.name)) != pgid:
                continue
            status = dict(line.split(":", 1) for line in (entry / "status").read_text().splitlines() if ":" in line)
            found[int(entry.name)] = (int(status["VmRSS"].split()[0]), int(status["VmHWM"].split()[0]))
        except (OSError, KeyError, ValueError):
            continue  # gone meanwhile, or a kernel thread
    return found


def large_png(side: int, seed: int) -> bytes:
    """An RGB PNG of side x side pixels that compresses to little (rows of a few colours): 3 bytes a pixel once
    decoded, a small upload."""
    rng = np.random.default_rng(seed)
    rows = np.repeat(rng.integers(0, 256, size=(side // 250, 1, 3), dtype=np.uint8), 250, axis=0)
    out = BytesIO()
    Image.fromarray(np.broadcast_to(rows, (side, side, 3)).copy()).save(out, format="PNG")
    return out.getvalue()


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads process memory from /proc (Linux)")
def test_concurrent_large_uploads_are_decoded_within_the_pixel_budget_and_the_memory_is_given_back(digits_run,
                                                                                                   tmp_path):
    """16 uploads of a 5000 x 5000 RGB PNG at once (75 MB each decoded, 1.2 GB together): with --decode_pixels of
    one such image they are decoded in turn, so no process of the server grows by more than a few of them, and the
    HTTP process hands the memory back afterwards."""
    side, uploads = 5000, 16
    port, log = free_port(), tmp_path / "serve.log"
    command = [convmixer_command(), "serve", "--ckpt_path", str(digits_run / "last.ckpt"), "--port", str(port),
               "--accelerator", "cpu", "--max_bytes", str(8 * 2**20), "--decode_pixels", str(side * side),
               "--log_level", "warning"]
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    served = Server(port, log)
    try:
        wait_until_healthy(served, process)
        bodies = [large_png(side, seed) for seed in range(uploads)]
        before = process_group_memory(process.pid)
        answers: list[int] = []
        threads = [threading.Thread(target=lambda b=body: answers.append(served.predict(b, PNG)[0]))
                   for body in bodies]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=600)
        after = process_group_memory(process.pid)
    finally:
        stop(process, served)
    assert answers == [200] * uploads
    decoded = side * side * 3 // 1024  # KiB of one decoded upload
    growth = {pid: after[pid][1] - before[pid][0] for pid in before if pid in after}
    assert max(growth.values()) < 6 * decoded, growth  # unbounded, 16 at once: more than 16 of them
    resident = {pid: after[pid][0] - before[pid][0] for pid in before if pid in after}
    assert max(resident.values()) < 2 * decoded, resident  # given back, not kept for the next burst


# -- bad command lines -------------------------------------------------------------------------------------------------

def one_error_line(capsys, *args: str) -> str:
    """Run `convmixer serve ARGS` in this process; it must stop with exit code 2 and one line on stderr."""
    with pytest.raises(SystemExit) as stopped:
        convmixer_main(["serve", *args])
    assert stopped.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("convmixer serve: error: "), lines
    return lines[0]


def test_bad_command_lines_end_in_one_line_and_exit_code_2(digits_run, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("CONVMIXER_DEBUG", raising=False)
    ckpt = str(digits_run / "last.ckpt")
    (tmp_path / "notes.ckpt").write_text("not a checkpoint")
    cases = [
        (["--ckpt_path", str(tmp_path / "missing.ckpt")], "no such file"),
        (["--ckpt_path", str(tmp_path / "notes.ckpt")], "is not a checkpoint torch can read"),
        ([], "ckpt_path"),
        (["--ckpt_path", ckpt, "--top_k", "0"], "--top_k must be at least 1"),
        (["--ckpt_path", ckpt, "--max_batch_size", "0"], "--max_batch_size must be at least 1"),
        (["--ckpt_path", ckpt, "--batch_timeout", "-1"], "--batch_timeout must be >= 0"),
        (["--ckpt_path", ckpt, "--port", "80"], "--port must be from 1024 to 65535"),
        (["--ckpt_path", ckpt, "--host", "example.com"], "host"),
        (["--ckpt_path", ckpt, "--decode_pixels", "0"], "--decode_pixels must be at least 1"),
        (["--ckpt_path", ckpt, "--accelerator", "cpu", "--devices", "2"], "--workers_per_device"),
        (["--ckpt_path", ckpt, "--accelerator", "cuda", "--devices", "99"], "GPU"),
        (["--ckpt_path", ckpt, "--devices", "two"], "--devices must be auto or a number"),
    ]
    for args, words in cases:
        assert words in one_error_line(capsys, *args), args
    with socket.socket() as taken:  # a port another program listens on
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = one_error_line(capsys, "--ckpt_path", ckpt, "--accelerator", "cpu", "--port", str(port))
    assert f"cannot listen on 127.0.0.1:{port}" in line and "choose another --port" in line
