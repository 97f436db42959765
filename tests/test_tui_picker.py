"""The model picker screen (Textual pilot at 80x24), the converter's JSON progress, and the conversion job."""

import asyncio
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from textual.app import App
from textual.widgets import DataTable, ProgressBar

from apertus_mlx.convert import JsonProgress
from apertus_mlx.load import DEMO_MODEL
from apertus_mlx.model_info import describe_model
from apertus_mlx.progress import LoadProgress
from tui import catalog
from tui.convert_job import ConversionError, ConvertJob
from tui.screens.dialogs import ConfirmScreen
from tui.screens.model_picker import ModelPickerScreen
from tui.widgets.convert_panel import ConvertPanel

# The shipped `budget` recipe measures every module at 18 widths: minutes on 2 CPU cores even for the demo
# model. Tests use the same recipe with fewer widths and a shorter calibration (about 10 s).
QUICK_BUDGET = """name = "budget"
bits = 4
group_size = 64
[calibration]
sequences = 4
sequence_length = 64
[budget]
bits_per_weight = 4.0
choices = [2, 4, 8]
group_sizes = [64]
"""
# The demo model's BF16 weights (6.8 MB) need 524 MB with an 8k chat and the runtime's 0.5 GB: they do not
# fit 0.79 GB of RAM (521 MB usable), while 8 bits per weight do.
RAM_GB = 0.79


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    path = tmp_path_factory.mktemp("recipe") / "budget.toml"
    path.write_text(QUICK_BUDGET)
    return str(path)


@pytest.fixture
def source(tmp_path):
    return shutil.copytree(DEMO_MODEL, tmp_path / "demo-src")


class PickerApp(App):
    def __init__(self, screen):
        super().__init__()
        self.picker, self.result = screen, "not dismissed"

    def on_mount(self):
        self.push_screen(self.picker, self._dismissed)

    def _dismissed(self, value):
        self.result = value


def run_picker(screen, steps):
    async def main():
        app = PickerApp(screen)
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.pause()
            await steps(pilot, screen)
            await pilot.pause()
        return app.result

    return asyncio.run(main())


async def wait_for(pilot, condition, seconds=60):
    for _ in range(int(seconds * 10)):
        if condition():
            return
        await pilot.pause(0.1)
    raise AssertionError("timed out")


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "no-hub"))


def test_enter_on_a_local_model_returns_its_path(tmp_path, empty_hub):
    models = tmp_path / "models"
    shutil.copytree(DEMO_MODEL, models / "demo-a")
    shutil.copytree(DEMO_MODEL, models / "demo-b")

    async def steps(pilot, screen):
        local = screen.query_one("#local", DataTable)
        assert local.row_count == 2 and screen.focused is local
        await pilot.press("down", "enter")

    result = run_picker(ModelPickerScreen(models_dir=models, ram_bytes=16 * 2**30), steps)
    assert result == str(models / "demo-b")


def test_escape_returns_none_and_a_published_model_that_fits_returns_its_repo_id(tmp_path, empty_hub):
    async def close(pilot, screen):
        assert screen.query_one("#published", DataTable).row_count == len(catalog.PUBLISHED)
        await pilot.press("escape")

    assert run_picker(ModelPickerScreen(models_dir=tmp_path, ram_bytes=16 * 2**30), close) is None

    async def first_published(pilot, screen):
        assert screen.focused is screen.query_one("#published", DataTable)  # nothing local: the hub list
        assert "huggingface.co/swiss-ai/Apertus-v1.1-0.5B-Instruct-MLX-INT4" in str(
            screen.query_one("#detail").render()
        )
        await pilot.press("enter")

    result = run_picker(ModelPickerScreen(models_dir=tmp_path, ram_bytes=16 * 2**30), first_published)
    assert result == catalog.PUBLISHED[0].repo_id


def test_a_model_too_big_is_converted_to_fit_with_progress(tmp_path, empty_hub, source, recipe):
    models = tmp_path / "models"
    too_big = catalog.PublishedModel(
        repo_id=str(source),
        parameters=3.4e6,
        quantization="BF16",
        size_bytes=6_827_448,
        kv_bytes_per_token=2048,
        family="original",
        source="https://example.invalid/demo",
        evidence="the bundled demo model",
    )
    ram = int(RAM_GB * 1e9)
    assert too_big.fits(ram) is False
    stages, panels = [], []

    async def steps(pilot, screen):
        panel = screen.query_one(ConvertPanel)
        panels.append(panel)  # (gone from the screen once it is dismissed)
        await pilot.press("enter")  # does not fit: the conversion is offered, not chosen
        assert panel.display and panel.job is None
        assert "budget recipe" in str(screen.query_one("#convert-text").render())
        await pilot.press("c")
        assert panel.job is not None and screen.query_one("#convert-progress", ProgressBar).display
        while panel.job is not None:
            stages.append(str(screen.query_one("#stage").render()))
            await pilot.pause(0.1)

    screen = ModelPickerScreen(
        models_dir=models, ram_bytes=ram, published=[too_big], recipe=recipe, convert_args=["--eval-sequences", "1"]
    )
    result = run_picker(screen, steps)
    out = models / "demo-src-budget-0.79gb"
    assert result == str(out)
    assert panels[0].progress_seen >= 4
    assert any(s.startswith("Measuring sensitivity") for s in stages)
    info = describe_model(out)
    assert info.quantization.startswith("budget ") and info.fits(ram)
    assert [p.name for p in models.iterdir()] == [out.name]  # nothing else left behind


def test_escape_while_converting_asks_then_stops_and_keeps_nothing(tmp_path, empty_hub, source, recipe):
    models = tmp_path / "models"
    too_big = catalog.PublishedModel(
        str(source), 3.4e6, "BF16", 6_827_448, 2048, "original", "https://x.invalid", "demo"
    )

    async def steps(pilot, screen):
        panel = screen.query_one(ConvertPanel)
        await pilot.press("c", "c")  # offer, then start
        await wait_for(pilot, lambda: panel.progress_seen > 0)
        await pilot.press("escape")
        assert isinstance(pilot.app.screen, ConfirmScreen)
        await pilot.press("n")  # keep converting
        assert pilot.app.screen is screen and panel.job is not None
        await pilot.press("escape", "y")
        await wait_for(pilot, lambda: panel.job is None)
        assert "stopped" in str(screen.query_one("#stage").render())
        await pilot.press("escape", "escape")  # back to the lists, then close

    screen = ModelPickerScreen(models_dir=models, ram_bytes=int(RAM_GB * 1e9), published=[too_big], recipe=recipe)
    assert run_picker(screen, steps) is None
    assert list(models.iterdir()) == []


def test_the_converter_reports_json_progress_and_a_done_line_last(tmp_path, source, recipe):
    out = tmp_path / "out"
    args = ["--model", str(source), "--recipe", recipe, "--ram-gb", str(RAM_GB), "--out", str(out)]
    result = subprocess.run(
        [sys.executable, "-m", "apertus_mlx.convert", *args, "--progress", "json", "--eval-sequences", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["type"] for r in records[:-1]] == ["progress"] * (len(records) - 1) and records[-1]["type"] == "done"
    stages = {r["stage"]: r for r in records[:-1]}  # the last update of each stage
    assert set(stages) == {"measuring sensitivity", "quantizing layers"}
    assert all(r["done"] == r["total"] == 4 and r["unit"] == "layer" for r in stages.values())
    done = records[-1]
    assert done["out"] == str(out) and done["size_bytes"] == describe_model(out).weights_bytes
    assert 2 < done["bits_per_weight"] < 9


def test_a_failed_conversion_raises_the_converters_one_line_error(tmp_path):
    async def main():
        job = ConvertJob("/no/such", 8, tmp_path / "models" / "x")
        return [record async for record in job.run()]

    with pytest.raises(ConversionError) as failure:
        asyncio.run(main())
    assert str(failure.value) == "model path /no/such does not exist"
    assert not (tmp_path / "models" / "x").exists()


def test_json_progress_is_throttled_but_keeps_the_last_update_of_every_stage():
    out = io.StringIO()
    progress = JsonProgress(out, interval=60)
    for n in range(0, 101, 10):
        progress.download(LoadProgress("download", n, 100, "B", "model.safetensors"))
    progress.download(LoadProgress("download", 3, None, "it", "Fetching files"))
    progress.download(LoadProgress("download", 5, None, "it", "Fetching files"))  # held back, then flushed
    assert list(progress.passes(iter("abc"), "quantizing layers", 3)) == ["a", "b", "c"]
    report = {"bits_per_weight": 4.1, "size_bytes": 7, "kl_divergence": 0.1, "top1_agreement": 0.9, "warnings": []}
    progress.done(Path("/out"), report)
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(r["type"], r.get("description"), r.get("done")) for r in records] == [
        ("progress", "model.safetensors", 0),
        ("progress", "model.safetensors", 100),
        ("progress", "Fetching files", 3),
        ("progress", "quantizing layers", 0),
        ("progress", "quantizing layers", 3),
        ("progress", "Fetching files", 5),
        ("done", None, None),
    ]
    assert records[1] == {
        "type": "progress",
        "stage": "download",
        "done": 100,
        "total": 100,
        "unit": "B",
        "description": "model.safetensors",
    }
    assert records[-1]["out"] == str(Path("/out")) and records[-1]["size_bytes"] == 7
