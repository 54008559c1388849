"""Helpers of the dashboard tests: the tiny device's measurements, a uvicorn server thread,
a log of what a page did, and screenshots."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

from server_testing import ServerThread

REPO_ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO_ROOT / "test-artifacts" / "dashboard"
# Whole-model measurements in the device file: the three uniform maps and these mixed ones.
MIXED_MAPS = 6


def _root_conftest():
    """The repository's tests/conftest.py, which defines ``write_tiny_checkpoint``."""
    path = REPO_ROOT / "tests" / "conftest.py"
    spec = importlib.util.spec_from_file_location("cn4_root_conftest_for_dashboard", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


write_tiny_checkpoint = _root_conftest().write_tiny_checkpoint


def tiny_device_records(model_dir: Path, *, device: str = "tiny-cpu") -> list[dict]:
    """Measurements of a made-up device for the tiny model, as a device file would hold them.

    The file has every eligible Linear shape at every level with its 10th and 90th
    percentiles, and the remainder. Its whole-model records (the uniform maps and a few mixed
    maps) are the remainder plus the layers, off by a few percent, so the fit has errors to score.
    """
    from search.models import eligible_layers, load_checkpoint

    loaded = load_checkpoint(model_dir)
    layers = eligible_layers(loaded.model)

    def layer_ms(out_features: int, in_features: int, level: int) -> float:
        return 0.002 + 0.001 * out_features * in_features * (4 - level) / 4096

    records = []
    for out_features, in_features in sorted({(layer.out_features, layer.in_features) for layer in layers}):
        for level in range(4):
            median = layer_ms(out_features, in_features, level)
            records.append({
                "format": "cn4.latency/1", "device": device, "op": "linear",
                "out_features": out_features, "in_features": in_features, "level": level,
                "tokens": 1, "median_ms": median, "p10_ms": 0.9 * median, "p90_ms": 1.2 * median,
                "repeats": 50,
            })
    remainder_ms = 0.005
    records.append({
        "format": "cn4.latency/1", "device": device, "op": "remainder",
        "model": loaded.fingerprint, "tokens": 1, "median_ms": remainder_ms,
    })
    level_maps = [{layer.name: level for layer in layers} for level in (1, 2, 3)]
    for index in range(MIXED_MAPS):
        # Distinct maps (a repeated map would be combined into one record on upload), none uniform.
        step = 1 + index // 4
        level_maps.append({
            layer.name: (index + step * position) % 4 for position, layer in enumerate(layers)
        })
    for index, level_map in enumerate(level_maps):
        exact = remainder_ms + sum(
            layer_ms(layer.out_features, layer.in_features, level_map[layer.name]) for layer in layers
        )
        records.append({
            "format": "cn4.latency/1", "device": device, "op": "model",
            "model": loaded.fingerprint, "tokens": 1,
            "levels": {
                layer.name: [layer.out_features, layer.in_features, level_map[layer.name]]
                for layer in layers
            },
            # Off by -6% .. +6%, so some predictions fall outside the 5% band.
            "median_ms": exact * (1 + 0.02 * ((index % 7) - 3)),
        })
    return records


# Generous limits: Chromium parses the 4.6 MB Plotly bundle slowly on a busy 2-core machine.
ACTION_TIMEOUT_MS = 90_000
NAVIGATION_TIMEOUT_MS = 120_000


def new_context(browser, base_url: str):
    """A browser context on ``base_url`` with a fixed viewport and the limits above."""
    context = browser.new_context(
        base_url=base_url, viewport={"width": 1280, "height": 900}, device_scale_factor=1
    )
    context.set_default_timeout(ACTION_TIMEOUT_MS)
    context.set_default_navigation_timeout(NAVIGATION_TIMEOUT_MS)
    return context


class PageLog:
    """Console errors, uncaught exceptions and every URL a page requested."""

    def __init__(self, page) -> None:
        self.errors: list[str] = []
        self.requests: list[str] = []
        page.on("console", lambda message: message.type == "error" and self.errors.append(message.text))
        page.on("pageerror", lambda error: self.errors.append(f"uncaught: {error}"))
        page.on("request", lambda request: self.requests.append(request.url))

    def script_errors(self) -> list[str]:
        """Errors other than Chromium's notes on HTTP error responses, which tests provoke."""
        return [text for text in self.errors if "Failed to load resource" not in text]


def save_screenshot(page, name: str, **options) -> Path:
    """Save a screenshot under test-artifacts/dashboard (git-ignored) and return its path."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), **options)
    return path


def copy_file(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
