"""A small resumable stage runner: content-hash manifest, staging folders, progress, timings.

Each stage declares the files it reads (``inputs``), its ``settings`` and one output path. A
stage's key is the hash of its settings and the content of its inputs; a rerun skips a stage
whose key matches the manifest and whose output exists. A stage writes into a private staging
folder that is renamed onto its output only when the stage finishes, and the manifest is
rewritten atomically after each stage, so a run killed at any point resumes with every finished
stage intact and no half-written output.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from analysis import io

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STAGING = ".partial"


@dataclass
class Stage:
    """One step of a pipeline.

    ``run(ctx, staging, bar)`` writes everything into ``staging`` (a folder, or for a file output
    the folder that will hold it) and returns a dict of headline numbers (may be empty).
    """

    name: str
    output: str  # relative to the run folder; a folder, or a file name for single-file outputs
    run: Callable[[Any, Path, Any], dict | None]
    inputs: Callable[[Any], list[Path]] = lambda ctx: []
    settings: Callable[[Any], dict] = lambda ctx: {}
    description: str = ""
    is_file: bool = False


@dataclass
class StageResult:
    name: str
    status: str  # "ran", "skipped", "failed"
    seconds: float
    headline: dict = field(default_factory=dict)
    message: str = ""


class HashCache:
    """sha256 of files, memoised on (path, size, mtime) across runs via the manifest."""

    def __init__(self, entries: dict | None = None):
        self.entries: dict[str, list] = dict(entries or {})

    def file(self, path: Path) -> str:
        st = path.stat()
        key = str(path.resolve())
        cached = self.entries.get(key)
        if cached and cached[0] == st.st_size and cached[1] == st.st_mtime_ns:
            return cached[2]
        digest = io.file_sha256(path)
        self.entries[key] = [st.st_size, st.st_mtime_ns, digest]
        return digest

    def tree(self, path: Path) -> str:
        """Content hash of a file or of every file below a folder (names relative to it)."""
        path = Path(path)
        if not path.exists():
            return "missing"
        if path.is_file():
            return self.file(path)
        h = hashlib.sha256()
        for f in sorted(p for p in path.rglob("*") if p.is_file() and STAGING not in p.parts
                        and "__pycache__" not in p.parts):
            h.update(f.relative_to(path).as_posix().encode())
            h.update(self.file(f).encode())
        return h.hexdigest()


def _settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


class Pipeline:
    """Runs stages in order inside ``root``; see the module docstring for the resume rules."""

    def __init__(self, root: Path, stages: list[Stage], ctx: Any, force: set[str] | None = None,
                 progress: bool = True):
        self.root = Path(root)
        self.stages = stages
        self.ctx = ctx
        self.force = set(force or ())
        unknown = self.force - {s.name for s in stages}
        if unknown:
            raise ValueError(f"--force names unknown stage(s) {sorted(unknown)}; stages are "
                             f"{', '.join(s.name for s in stages)}")
        self.progress = progress
        self.manifest = self._load_manifest()
        self.hashes = HashCache(self.manifest.get("hash_cache"))

    # ----------------------------------------------------------------------------- manifest
    def _load_manifest(self) -> dict:
        path = self.root / MANIFEST
        if path.exists():
            try:
                return json.loads(path.read_text())
            except ValueError:
                log.warning("%s is unreadable; every stage will run again", path)
        return {"version": 1, "stages": {}}

    def _save_manifest(self) -> None:
        self.manifest["hash_cache"] = self.hashes.entries
        io.write_json(self.root / MANIFEST, self.manifest)

    def stage_key(self, stage: Stage) -> tuple[str, dict]:
        inputs = {}
        for p in stage.inputs(self.ctx):
            p = Path(p)
            try:
                name = p.resolve().relative_to(self.root.resolve()).as_posix()
            except ValueError:
                name = str(p)
            inputs[name] = self.hashes.tree(p)
        settings = stage.settings(self.ctx)
        key = _settings_hash({"inputs": inputs, "settings": settings})
        return key, {"inputs": inputs, "settings": settings}

    # ---------------------------------------------------------------------------------- run
    def run(self, set_meta: dict | None = None) -> list[StageResult]:
        from tqdm.auto import tqdm

        self.root.mkdir(parents=True, exist_ok=True)
        if set_meta:
            self.manifest.update(set_meta)
        results: list[StageResult] = []
        overall = tqdm(total=len(self.stages), desc="study", unit="stage", position=0,
                       disable=not self.progress, leave=True)
        try:
            for stage in self.stages:
                overall.set_postfix_str(stage.name)
                results.append(self._run_stage(stage))
                overall.update(1)
                if results[-1].status == "failed" and getattr(self.ctx, "stop_on_failure", {}).get(stage.name):
                    break
        finally:
            overall.close()
            self._save_manifest()
        return results

    def _run_stage(self, stage: Stage) -> StageResult:
        from tqdm.auto import tqdm

        key, record = self.stage_key(stage)
        done = self.manifest["stages"].get(stage.name, {})
        target = self.root / stage.output
        if (stage.name not in self.force and done.get("key") == key and done.get("status") == "done"
                and target.exists()):
            log.info("stage %s: inputs unchanged, skipped", stage.name)
            return StageResult(stage.name, "skipped", 0.0, done.get("headline", {}))

        staging = self.root / STAGING / f"{stage.name}-{key[:12]}"
        # a staging folder of the same key is an interrupted attempt at this very stage: keep it,
        # so stages with their own checkpoints (network training) resume inside it
        for old in (self.root / STAGING).glob(f"{stage.name}-*") if (self.root / STAGING).exists() else []:
            if old != staging:
                shutil.rmtree(old, ignore_errors=True)
        staging.mkdir(parents=True, exist_ok=True)
        self.manifest["stages"][stage.name] = {"status": "running", **record}
        self._save_manifest()
        start = time.perf_counter()
        bar = tqdm(desc=f"  {stage.name}", unit="step", position=1, leave=False, disable=not self.progress)
        try:
            headline = stage.run(self.ctx, staging, bar) or {}
        except (StageFailure, ValueError, FileNotFoundError) as exc:
            # input problems the analysis functions diagnose (they name the file/column): the
            # stage is recorded as failed with that message and the run goes on where it can
            seconds = time.perf_counter() - start
            log.error("stage %s failed: %s", stage.name, exc)
            self.manifest["stages"][stage.name] = {"status": "failed", "message": str(exc), "seconds": seconds,
                                                   **record}
            self._save_manifest()
            return StageResult(stage.name, "failed", seconds, message=str(exc))
        finally:
            bar.close()
        self._publish(staging, target, stage.is_file)
        seconds = time.perf_counter() - start
        outputs = [target.relative_to(self.root).as_posix()]
        self.manifest["stages"][stage.name] = {
            "status": "done", "key": key, **record, "outputs": outputs, "seconds": round(seconds, 2),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "headline": headline,
        }
        self._save_manifest()
        return StageResult(stage.name, "ran", seconds, headline)

    @staticmethod
    def _publish(staging: Path, target: Path, is_file: bool) -> None:
        """Move a finished stage's staging folder (or its one file) onto the output path."""
        if is_file:
            produced = staging / target.name
            if not produced.exists():
                raise RuntimeError(f"stage finished without writing {target.name}")
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(produced, target)
            shutil.rmtree(staging, ignore_errors=True)
            return
        if target.exists():
            # rename first, delete after: the output path never holds a mix of old and new files
            trash = target.with_name(f".{target.name}.old")
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(target, trash)
            os.replace(staging, target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging, target)


class StageFailure(RuntimeError):
    """A stage could not produce its output for a reason worth reporting (not a bug)."""
