"""Shared by tests/test_labeling*.py: tiny tasks on disk and a real ``tn-ray label serve`` process."""
from __future__ import annotations

import csv
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
PAIR = ("clip:tiny", "textnorm(clip:tiny)")


def _shapes(count: int, color, rng: np.random.Generator, circle: bool) -> Image.Image:
    """A 32 px picture of ``count`` small shapes on a light table, so screenshots show something to judge."""
    img = Image.new("RGB", (32, 32), (236, 228, 212))
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, 24, 31, 31), fill=(170, 130, 90))
    for j in range(count):
        if circle:  # balls anywhere (they may touch), cubes in a row on the table
            x, y = rng.integers(1, 24), rng.integers(2, 17)
            draw.ellipse((x, y, x + 6, y + 6), fill=color)
        else:
            draw.rectangle((1 + 5 * j, 19, 4 + 5 * j, 23), fill=color)
    return img


def make_manifest(root: Path, n: int = 5) -> Path:
    """n distinct 32 px images under root/img and a manifest root/manifest.csv (paths relative to it)."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        _shapes(i + 1 if i % 2 == 0 else i + 2, (200, 30, 30), rng, circle=False).save(root / "img" / f"s{i}.png")
        rows.append((f"img/s{i}.png", f"{i + 1} red cube{'s' if i else ''} on a table"))
    path = root / "manifest.csv"
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([("image", "prompt"), *rows])
    return path


def make_comparison(root: Path, prompts: int = 3, samples: int = 6, k: int = 4) -> tuple[Path, Path]:
    """A real best-of-n human-evaluation export (tn_ray.analysis.human_eval.export) of two rewards."""
    from tn_ray.analysis.human_eval import export

    src = root / "pool"
    src.mkdir(parents=True, exist_ok=True)
    images, sel = [], []
    rng = np.random.default_rng(0)
    for pid in range(prompts):
        for s in range(samples):
            p = src / f"p{pid}_s{s}.png"
            _shapes(1 + (s + pid) % 4, (40, 80, 210), rng, circle=True).save(p)
            images.append({"prompt_id": pid, "sample": s, "prompt": f"{pid + 2} blue balls on a table",
                           "image_id": p.name, "image": str(p)})
        for reward, order in zip(PAIR, (range(samples), reversed(range(samples)))):
            for rank, s in enumerate(list(order)[:k]):
                sel.append({"n": samples, "k": k, "reward": reward, "prompt_id": pid, "rank": rank, "sample": s})
    out, key = root / "human_eval", root / "human_eval_key.csv"
    export(pd.DataFrame(sel), pd.DataFrame(images), [PAIR], samples, k, 0, out, key, lambda p: Path(p).read_bytes())
    return out, key


class Server:
    """``tn-ray label serve ARGS --port 0`` as a subprocess; ``kill()`` is a real SIGKILL."""

    def __init__(self, *args: str, env: dict | None = None):
        self.args, self.env = list(args), env
        self.proc = None
        self.start()

    def start(self) -> None:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", **(self.env or {})}
        self.proc = subprocess.Popen([sys.executable, "-m", "tn_ray.cli", "label", "serve", *self.args, "--port", "0"],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
        self.banner = self.proc.stdout.readline()
        m = re.search(r"at http://(\S+?):(\d+)/(\S*)", self.banner)
        if not m:
            rest = self.proc.stdout.read() if self.proc.poll() is not None else ""
            raise RuntimeError(f"server did not start: {self.banner}{rest}")
        self.host, self.port, self.query = m.group(1), int(m.group(2)), m.group(3)
        self.url = f"http://{self.host}:{self.port}/"
        deadline = time.monotonic() + 30
        while True:  # the banner comes before uvicorn's loop accepts: wait for the first answer
            try:
                self.request("GET", "/static/style.css")
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.05)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.proc.stdout.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        if not self.proc.stdout.closed:
            self.proc.stdout.close()

    def request(self, method: str, path: str, body=None, headers: dict | None = None) -> tuple[int, dict, bytes]:
        """One raw HTTP request (http.client sends the path exactly as given, ``..`` included)."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        data = json.dumps(body).encode() if body is not None else None
        hdrs = {"Content-Type": "application/json"} if data else {}
        conn.request(method, path, body=data, headers={**hdrs, **(headers or {})})
        r = conn.getresponse()
        out = (r.status, dict(r.getheaders()), r.read())
        conn.close()
        return out


class Annotator:
    """The JSON API as one annotator sees it (what the pages' scripts do)."""

    def __init__(self, server: Server, name: str, secret: str | None = None, headers: dict | None = None):
        self.server, self.name, self.extra = server, name, headers or {}
        status, _, body = server.request("POST", "/api/session", {"name": name, "secret": secret}, self.extra)
        assert status == 200, body
        self.secret = json.loads(body)["secret"]

    def call(self, method: str, path: str, body=None) -> tuple[int, dict]:
        status, _, raw = self.server.request(
            method, path, body, {"X-Annotator": self.name, "X-Session": self.secret, **self.extra}
        )
        return status, json.loads(raw)

    def state(self, pos: int | None = None) -> dict:
        status, body = self.call("GET", "/api/state" + ("" if pos is None else f"?pos={pos}"))
        assert status == 200, body
        return body

    def answer(self, pos: int, **value) -> dict:
        status, body = self.call("POST", "/api/answer", {"pos": pos, **value})
        assert status == 200, body
        return body
