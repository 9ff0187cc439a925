"""The resumable stage runner on toy stages: skip, propagate, force, fail, publish atomically."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from analysis.pipeline import HashCache, Pipeline, Stage, StageFailure


def toy(tmp_path: Path, calls: list[str], fail: set[str] | None = None):
    src = tmp_path / "input.txt"
    if not src.exists():
        src.write_text("1\n")
    ctx = SimpleNamespace(src=src, root=tmp_path / "run", fail=fail or set(), factor=2)

    def double(ctx, staging, bar):
        calls.append("double")
        value = int(ctx.src.read_text()) * ctx.factor
        (staging / "value.txt").write_text(f"{value}\n")
        return {"value": value}

    def parity(ctx, staging, bar):
        calls.append("parity")
        if "parity" in ctx.fail:
            raise StageFailure("parity: input says no")
        value = int((ctx.root / "double" / "value.txt").read_text())
        (staging / "parity.txt").write_text("even\n" if value % 2 == 0 else "odd\n")
        return {}

    def report(ctx, staging, bar):
        calls.append("report")
        (staging / "report.txt").write_text((ctx.root / "parity" / "parity.txt").read_text())
        return {}

    stages = [
        Stage("double", "double", double, inputs=lambda c: [c.src], settings=lambda c: {"factor": c.factor}),
        Stage("parity", "parity", parity, inputs=lambda c: [c.root / "double"]),
        Stage("report", "report.txt", report, inputs=lambda c: [c.root / "parity"], is_file=True),
    ]
    return ctx, stages


def run(tmp_path, calls, force=None, fail=None, factor=2):
    ctx, stages = toy(tmp_path, calls, fail)
    ctx.factor = factor
    return Pipeline(ctx.root, stages, ctx, force=force, progress=False).run(), ctx


def test_first_run_then_everything_skipped(tmp_path):
    calls: list[str] = []
    results, ctx = run(tmp_path, calls)
    assert [r.status for r in results] == ["ran", "ran", "ran"]
    assert (ctx.root / "report.txt").read_text() == "even\n"
    results, _ = run(tmp_path, calls)
    assert [r.status for r in results] == ["skipped"] * 3
    assert calls == ["double", "parity", "report"]
    manifest = json.loads((ctx.root / "manifest.json").read_text())
    assert manifest["stages"]["double"]["headline"] == {"value": 2}
    assert manifest["stages"]["double"]["inputs"]  # content hashes recorded


def test_changed_input_redoes_downstream_only_when_outputs_change(tmp_path):
    calls: list[str] = []
    run(tmp_path, calls)
    (tmp_path / "input.txt").write_text("2\n")  # 4: still even
    results, ctx = run(tmp_path, calls)
    assert [r.status for r in results] == ["ran", "ran", "skipped"]  # parity.txt unchanged
    results, _ = run(tmp_path, calls, factor=3)  # settings change: 6, even
    assert [r.status for r in results][0] == "ran"
    (tmp_path / "input.txt").write_text("3\n")  # 9: odd
    results, ctx = run(tmp_path, calls, factor=3)
    assert [r.status for r in results] == ["ran", "ran", "ran"]
    assert (ctx.root / "report.txt").read_text() == "odd\n"


def test_touch_without_content_change_skips(tmp_path):
    calls: list[str] = []
    run(tmp_path, calls)
    src = tmp_path / "input.txt"
    src.write_text(src.read_text())  # new mtime, same bytes
    results, _ = run(tmp_path, calls)
    assert [r.status for r in results] == ["skipped"] * 3


def test_force_and_unknown_force(tmp_path):
    calls: list[str] = []
    run(tmp_path, calls)
    results, _ = run(tmp_path, calls, force={"parity"})
    assert [r.status for r in results] == ["skipped", "ran", "skipped"]
    with pytest.raises(ValueError, match="unknown stage"):
        run(tmp_path, calls, force={"nope"})


def test_failed_stage_keeps_previous_output_and_is_retried(tmp_path):
    calls: list[str] = []
    _, ctx = run(tmp_path, calls, factor=3)  # 1 * 3 = 3: odd
    (tmp_path / "input.txt").write_text("2\n")  # 6: even, but parity fails this time
    results, ctx = run(tmp_path, calls, fail={"parity"}, factor=3)
    assert results[1].status == "failed" and "input says no" in results[1].message
    assert (ctx.root / "parity" / "parity.txt").read_text() == "odd\n"  # old complete output kept
    results, ctx = run(tmp_path, calls, factor=3)
    assert [r.status for r in results] == ["skipped", "ran", "ran"]
    assert (ctx.root / "report.txt").read_text() == "even\n"
    assert not any((ctx.root / ".partial").iterdir())


def test_hash_cache_reuses_unchanged_files(tmp_path):
    f = tmp_path / "a.bin"
    f.write_bytes(b"abc")
    cache = HashCache()
    first = cache.file(f)
    assert first == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"  # sha256("abc")
    cache.entries[str(f.resolve())][2] = "memo"  # a cached digest is used while size and mtime match
    assert cache.file(f) == "memo"
    f.write_bytes(b"abcd")
    assert cache.file(f) != "memo"
