"""Fixtures: a tiny 2-member ensemble trained on real HER2ST C6 and exported to ONNX, the
viewer serving C6 with it in a subprocess (``python -m export.viewer``, JAX-free, a free
loopback port), and headless Debian Chromium driven by Playwright."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.export._process import stop_process

ROOT = Path(__file__).resolve().parents[3]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
LIME_SAMPLES = 40  # enough for a table; the LIME maths is tested in tests/stimage_jax/explain


@pytest.fixture(scope="package")
def c6_model(her2st_root, tmp_path_factory):
    """(C6.h5ad, exported .onnx): tiny backbone, 128 px tiles (0.78 µm/px: nuclei stay
    segmentable), 2 members (an epistemic variance), one epoch."""
    from data_pipelines.io import write_h5ad
    from data_pipelines.slides import read_her2st
    from stimage_jax.cli import main

    tmp = tmp_path_factory.mktemp("viewer")
    write_h5ad(read_her2st(her2st_root, "C6"), tmp / "C6.h5ad")
    assert main(["train", "--quiet", "--data", str(tmp / "C6.h5ad"), "--genes", "markers", "--backbone", "tiny",
                 "--tile-px", "128", "--members", "2", "--max-epochs", "1", "--workdir", str(tmp / "wd")]) == 0
    assert main(["export-onnx", "--quiet", "--model", str(tmp / "wd"), "--out", str(tmp / "m.onnx")]) == 0
    return tmp / "C6.h5ad", tmp / "m.onnx"


class Viewer:
    """``python -m export.viewer`` on a free port; ``url`` once it prints its address."""

    def __init__(self, *args, cwd=ROOT):
        self.proc = subprocess.Popen([sys.executable, "-m", "export.viewer", "--quiet", "--port", "0", *map(str, args)],
                                     cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("viewing "):
            self.proc.kill()
            raise AssertionError(f"viewer did not start: {line}{self.proc.stderr.read()[-2000:]}")
        self.url = line.split(" on ")[1].split()[0].rstrip("/")

    def get(self, path, *, raw=False, headers=None):
        req = urllib.request.Request(self.url + path, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                body = r.read()
                return r.status, (body if raw else json.loads(body))
        except urllib.error.HTTPError as e:
            body = e.read()
            try:
                return e.code, json.loads(body or b"{}")
            except ValueError:  # Starlette's own plain-text refusals (a bad Host header)
                return e.code, {"error": body.decode()}

    def post(self, path, body: bytes, headers=None):
        req = urllib.request.Request(self.url + path, data=body, method="POST",
                                     headers={"X-Stimage": "1", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def wait_ready(self, timeout=120) -> dict:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            code, st = self.get("/api/status")
            if st["state"] in ("ready", "error"):
                return st
            time.sleep(0.2)
        raise AssertionError("predictions did not finish")

    def stop(self) -> int:
        return stop_process(self.proc)


@pytest.fixture(scope="package")
def viewer(c6_model, tmp_path_factory):
    data, model = c6_model
    v = Viewer("--model", model, "--data", data, "--cache", tmp_path_factory.mktemp("view-cache"),
               "--samples", LIME_SAMPLES, "--max-upload-mb", "0.05")
    try:
        assert v.wait_ready()["state"] == "ready"
        yield v
    finally:
        v.stop()


@pytest.fixture(scope="package")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser, viewer):
    """A fresh page on the viewer; records console errors and uncaught exceptions."""
    ctx = browser.new_context(viewport={"width": 1280, "height": 860}, accept_downloads=True)
    pg = ctx.new_page()
    pg.errors = []
    pg.on("console", lambda m: pg.errors.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
    pg.on("pageerror", lambda e: pg.errors.append(f"pageerror: {e}"))
    pg.goto(viewer.url + "/")
    pg.wait_for_selector("body[data-ready='1']", timeout=60_000)
    pg.wait_for_selector("[data-testid=viewer][data-opened='1']", timeout=30_000)
    yield pg
    ctx.close()


os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
