"""Sharing bundles between sites: export, fetch over HTTP on 127.0.0.1, verify, load safely.

One export of progswin_prognosis with its shipped synthetic weights (traced model.ts
included) feeds every case; each refusal is checked for its message (naming the file) and for
leaving nothing behind.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import shutil
import stat
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest

from conftest import BUNDLES, REPO_ROOT

PROG = BUNDLES / "progswin_prognosis"
SEG = BUNDLES / "hcc_liver_seg"


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".fetch-" in p.name or ".export-" in p.name]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    from analysis.bundle_archive import export_bundle

    out = tmp_path_factory.mktemp("dist")
    zip_path = export_bundle(PROG, out)
    return {"zip": zip_path, "sha256": _sha(zip_path), "out": out}


@pytest.fixture(scope="module")
def prog_cohort(small_cohort, tmp_path_factory) -> dict:
    from analysis.datalists import write_datalists

    out = tmp_path_factory.mktemp("archive_datalists")
    return {"dir": small_cohort, "datalist": str(write_datalists(small_cohort, out=out)["prognosis"])}


def _infer(bundle: Path, cohort: dict, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """The shipped-weights inference command, as a user types it from the repository root."""
    configs = json.dumps([str(bundle / "configs" / "inference.json"), str(bundle / "configs" / "synthetic_weights.json")])
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", configs, "--bundle_root", str(bundle),
           "--dataset_dir", str(cohort["dir"]), "--datalist", cohort["datalist"], "--output_dir", str(out),
           "--device", "$torch.device('cpu')", *extra]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)


def _rezip(src_zip: Path, dst_zip: Path, edit) -> None:
    """Copy an archive, letting ``edit(name, data) -> data | None`` change or drop members."""
    with zipfile.ZipFile(src_zip) as zin, zipfile.ZipFile(dst_zip, "w") as zout:
        for info in zin.infolist():
            data = edit(info.filename, zin.read(info))
            if data is not None:
                zout.writestr(info, data)


def _consistent(zip_path: Path, name: str = "progswin_prognosis") -> None:
    """Rewrite the manifest so it matches the members (an attacker who controls the archive)."""
    with zipfile.ZipFile(zip_path) as z:
        members = {i.filename: z.read(i) for i in z.infolist() if not i.is_dir()}
        infos = {i.filename: i for i in z.infolist()}
    manifest = json.loads(members[f"{name}/manifest.json"])
    manifest["files"] = {n[len(name) + 1:]: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)}
                         for n, d in members.items() if n != f"{name}/manifest.json"}
    members[f"{name}/manifest.json"] = json.dumps(manifest).encode()
    with zipfile.ZipFile(zip_path, "w") as z:
        for n, d in members.items():
            z.writestr(infos[n], d)


def _refused(tmp_path: Path, source, sha256, match: str) -> str:
    from analysis.bundle_archive import BundleFetchError, fetch_bundle

    out = tmp_path / "site_b"
    with pytest.raises(BundleFetchError, match=match) as err:
        fetch_bundle(str(source), out, sha256=sha256)
    assert not out.exists() or not any(out.iterdir()), "a refusal wrote into --out"
    assert _leftovers(tmp_path) == [], "a refusal left temporary files"
    return str(err.value)


# -------------------------------------------------------------------------------------- export
def test_export_layout_manifest_and_trace(exported, tmp_path):
    import torch

    from analysis.bundle_archive import MANIFEST_SCHEMA

    import jsonschema

    zip_path = exported["zip"]
    meta = json.loads((PROG / "configs" / "metadata.json").read_text())
    assert zip_path.name == f"progswin_prognosis_v{meta['version']}.zip"
    sidecar = zip_path.with_name(zip_path.name + ".sha256").read_text().split()
    assert sidecar == [exported["sha256"], zip_path.name]
    with zipfile.ZipFile(zip_path) as z:
        names = set(z.namelist())
        manifest = json.loads(z.read("progswin_prognosis/manifest.json"))
        jsonschema.validate(manifest, MANIFEST_SCHEMA)
        for required in ("configs/inference.json", "configs/metadata.json", "models/model.pt", "models/model.ts",
                         "docs/README.md", "LICENSE", "scripts/integrity.py", "large_files.yml"):
            assert f"progswin_prognosis/{required}" in names
        assert {f"progswin_prognosis/{k}" for k in manifest["files"]} == names - {"progswin_prognosis/manifest.json"}
        for rel, entry in manifest["files"].items():
            assert hashlib.sha256(z.read(f"progswin_prognosis/{rel}")).hexdigest() == entry["sha256"]
        # the weights travel byte for byte: the same sha256 as the repository's large_files.yml entry
        assert manifest["files"]["models/model.pt"]["sha256"] == _sha(PROG / "models" / "synthetic_fs12.pt")
        overlay = json.loads(z.read("progswin_prognosis/configs/synthetic_weights.json"))
        assert overlay["ckpt_path"] == "$@bundle_root + '/models/model.pt'" and overlay["feature_size"] == 12
        z.extract("progswin_prognosis/models/model.ts", tmp_path)
    assert manifest["feature_size"] == 12 and manifest["traced_input_shape"] == [1, 9, 64, 64, 64]
    # the traced module computes what the eager network with the same weights computes
    ts = torch.jit.load(str(tmp_path / "progswin_prognosis/models/model.ts"), map_location="cpu")
    sys.path.insert(0, str(PROG))
    try:
        from monai.bundle import ConfigParser

        for name in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
            del sys.modules[name]
        parser = ConfigParser()
        parser.read_config([str(PROG / "configs/inference.json"), str(PROG / "configs/synthetic_weights.json")])
        parser["bundle_root"] = str(PROG)
        net = parser.get_parsed_content("network_def")
        net.load_state_dict(torch.load(PROG / "models/synthetic_fs12.pt", weights_only=True)["model"])
    finally:
        sys.path.remove(str(PROG))
        for name in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
            del sys.modules[name]
    x = torch.zeros(1, 9, 64, 64, 64)
    x[:, :3] = torch.randn(1, 3, 64, 64, 64)
    x[:, 3:, 16:48, 16:48, 16:48] = 1.0
    with torch.no_grad():
        assert torch.allclose(ts(x), net.eval()(x), atol=1e-4)
    # the same bundle exports to the same bytes
    from analysis.bundle_archive import export_bundle

    again = export_bundle(PROG, tmp_path / "again", trace=False)
    with zipfile.ZipFile(again) as z1, zipfile.ZipFile(zip_path) as z2:
        assert z1.read("progswin_prognosis/models/model.pt") == z2.read("progswin_prognosis/models/model.pt")


def test_export_refuses_feature_size_mismatch_and_missing_version(tmp_path):
    from analysis.bundle_archive import BundleExportError, export_bundle

    # inference.json alone says feature_size 48 (the paper's); the shipped file is 12
    with pytest.raises(BundleExportError, match=r"synthetic_fs12\.pt: weights have feature_size 12.*say 48"):
        export_bundle(SEG, tmp_path / "d", weights=str(SEG / "models/synthetic_fs12.pt"), overlay="none", trace=False)
    copy = tmp_path / "hcc_liver_seg"
    shutil.copytree(SEG, copy, ignore=shutil.ignore_patterns("__pycache__"))
    meta = json.loads((copy / "configs/metadata.json").read_text())
    del meta["version"]
    (copy / "configs/metadata.json").write_text(json.dumps(meta))
    with pytest.raises(BundleExportError, match=r"metadata\.json: no 'version'"):
        export_bundle(copy, tmp_path / "d2", trace=False)
    (copy / "configs/metadata.json").unlink()
    with pytest.raises(BundleExportError, match=r"metadata\.json: missing"):
        export_bundle(copy, tmp_path / "d2", trace=False)
    assert not (tmp_path / "d").exists() or list((tmp_path / "d").iterdir()) == []


def test_export_refuses_weights_that_do_not_match_large_files(tmp_path):
    from analysis.bundle_archive import BundleExportError, export_bundle

    copy = tmp_path / "progswin_prognosis"
    shutil.copytree(PROG, copy, ignore=shutil.ignore_patterns("__pycache__"))
    weights = copy / "models/synthetic_fs12.pt"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleExportError, match=r"synthetic_fs12\.pt: sha256 [0-9a-f]{64} does not match"):
        export_bundle(copy, tmp_path / "d", trace=False)


# --------------------------------------------------------------------------------------- fetch
def test_round_trip_http_fetch_and_inference(exported, prog_cohort, tmp_path):
    """Site A's archive served on 127.0.0.1, fetched and verified by site B, run without training:
    the same predictions as the repository's bundle with the same weights."""
    from analysis.bundle_archive import fetch_bundle, verify_bundle

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(exported["out"]))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{exported['zip'].name}"
        bundle = fetch_bundle(url, tmp_path / "site_b", sha256=exported["sha256"])
    finally:
        server.shutdown()
    assert bundle == tmp_path / "site_b" / "progswin_prognosis"
    assert verify_bundle(bundle) == []
    assert _leftovers(tmp_path) == []
    fetched = _infer(bundle, prog_cohort, tmp_path / "pred_fetched")
    assert fetched.returncode == 0, fetched.stderr[-3000:]
    assert "sha256 matches" in fetched.stdout + fetched.stderr
    local = _infer(PROG, prog_cohort, tmp_path / "pred_local")
    assert local.returncode == 0, local.stderr[-3000:]
    import pandas as pd

    a = pd.read_csv(tmp_path / "pred_fetched/predictions.csv")
    b = pd.read_csv(tmp_path / "pred_local/predictions.csv")
    assert len(a) == 12 and list(a.patient_id) == list(b.patient_id)
    probs = a[[f"prob_{k}" for k in range(4)]].to_numpy()
    assert abs(probs.sum(axis=1) - 1).max() < 1e-5
    assert abs(probs - b[[f"prob_{k}" for k in range(4)]].to_numpy()).max() < 1e-6


def test_flipped_byte_in_archive_is_refused(exported, tmp_path):
    bad = tmp_path / exported["zip"].name
    data = bytearray(exported["zip"].read_bytes())
    data[len(data) // 2] ^= 0x01
    bad.write_bytes(bytes(data))
    msg = _refused(tmp_path, bad, exported["sha256"], r"sha256 [0-9a-f]{64} does not match --sha256")
    assert str(bad) in msg


def test_flipped_byte_in_a_member_is_refused(exported, tmp_path):
    """A member changed inside an archive whose own sha256 the attacker also republishes."""
    bad = tmp_path / "tampered.zip"
    _rezip(exported["zip"], bad, lambda n, d: (d[:-10] + bytes([d[-10] ^ 1]) + d[-9:]) if n.endswith("models/model.pt") else d)
    msg = _refused(tmp_path, bad, _sha(bad), r"progswin_prognosis/models/model\.pt: sha256 [0-9a-f]{64}.*manifest")
    assert "refused, nothing written" in msg


def test_missing_and_unlisted_members_are_refused(exported, tmp_path):
    bad = tmp_path / "missing.zip"
    _rezip(exported["zip"], bad, lambda n, d: None if n.endswith("scripts/net.py") else d)
    with zipfile.ZipFile(bad, "a") as z:
        z.writestr("progswin_prognosis/scripts/extra.py", "import os\n")
    msg = _refused(tmp_path, bad, _sha(bad), r"in the manifest but not in the archive")
    assert "scripts/net.py" in msg and "scripts/extra.py: in the archive but not in the manifest" in msg


def test_dotdot_member_is_refused(exported, tmp_path):
    bad = tmp_path / "dotdot.zip"
    shutil.copy(exported["zip"], bad)
    with zipfile.ZipFile(bad, "a") as z:
        z.writestr("progswin_prognosis/../escaped.txt", "x")
    _consistent(bad)
    msg = _refused(tmp_path, bad, _sha(bad), r"'\.\.' component")
    assert "progswin_prognosis/../escaped.txt" in msg
    assert not (tmp_path / "escaped.txt").exists()


@pytest.mark.parametrize("mode, message", [(stat.S_IFLNK | 0o777, "symbolic link"),
                                           (stat.S_IFCHR | 0o644, "not a regular file"),
                                           (stat.S_IFIFO | 0o644, "not a regular file")],
                         ids=["symlink", "char-device", "fifo"])
def test_link_and_device_members_are_refused(exported, tmp_path, mode, message):
    bad = tmp_path / "link.zip"
    shutil.copy(exported["zip"], bad)
    info = zipfile.ZipInfo("progswin_prognosis/configs/passwd")
    info.external_attr = mode << 16
    with zipfile.ZipFile(bad, "a") as z:
        z.writestr(info, "/etc/passwd")
    _consistent(bad)
    msg = _refused(tmp_path, bad, _sha(bad), message)
    assert "progswin_prognosis/configs/passwd" in msg


def test_missing_hash_is_refused_unless_insecure(exported, tmp_path, capsys):
    from analysis.bundle_archive import fetch_bundle

    msg = _refused(tmp_path, exported["zip"], None, r"no --sha256 given")
    assert "--insecure-no-hash" in msg
    # the CLI: exit 2, the message on stderr
    proc = subprocess.run([sys.executable, "-m", "analysis", "fetch-bundle", str(exported["zip"]), "--out",
                           str(tmp_path / "cli")], cwd=REPO_ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "no --sha256 given" in proc.stderr and not (tmp_path / "cli").exists()
    proc = subprocess.run([sys.executable, "-m", "analysis", "fetch-bundle", str(exported["zip"]), "--out",
                           str(tmp_path / "cli"), "--insecure-no-hash", "false"], cwd=REPO_ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 2 and not (tmp_path / "cli").exists()
    with pytest.warns(UserWarning, match="WITHOUT a sha256"):
        bundle = fetch_bundle(str(exported["zip"]), tmp_path / "insecure", insecure_no_hash=True)
    assert (bundle / "models/model.pt").is_file()


def test_pickle_payload_never_runs(exported, prog_cohort, tmp_path):
    """A consistent archive (manifest and sha256 rewritten) whose model.pt is a pickle with code:
    fetched, then refused when the bundle loads it; the payload's file is never created."""
    import torch

    from analysis.bundle_archive import fetch_bundle

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('ran')",))

    evil_pt = tmp_path / "evil.pt"
    torch.save({"model": Payload()}, evil_pt)
    bad = tmp_path / "evil.zip"
    _rezip(exported["zip"], bad, lambda n, d: evil_pt.read_bytes() if n.endswith("models/model.pt") else d)
    _consistent(bad)
    bundle = fetch_bundle(str(bad), tmp_path / "site_b", sha256=_sha(bad))
    proc = _infer(bundle, prog_cohort, tmp_path / "pred")
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "models/model.pt: not a weights-only checkpoint" in out and "refused" in out
    assert not marker.exists()
    assert not (tmp_path / "pred/predictions.csv").exists()


def test_tampered_weights_and_configs_after_fetch(exported, prog_cohort, tmp_path):
    from analysis.bundle_archive import fetch_bundle, verify_bundle

    bundle = fetch_bundle(str(exported["zip"]), tmp_path / "site_b", sha256=exported["sha256"])
    weights = bundle / "models/model.pt"
    original = weights.read_bytes()
    weights.write_bytes(original[:-10] + bytes([original[-10] ^ 1]) + original[-9:])
    proc = _infer(bundle, prog_cohort, tmp_path / "p1")
    assert proc.returncode != 0
    assert f"{weights}: sha256" in proc.stdout + proc.stderr and "does not match" in proc.stdout + proc.stderr
    weights.write_bytes(original)

    config = bundle / "configs/inference.json"
    content = json.loads(config.read_text())
    content["predictions_file"] = "$@output_dir + '/other.csv'"
    config.write_text(json.dumps(content, indent=4))
    assert any(str(config) in p for p in verify_bundle(bundle))
    for flag in ([], ["--trust_configs", "false"]):
        proc = _infer(bundle, prog_cohort, tmp_path / "p2", *flag)
        assert proc.returncode != 0
        assert "configs differ from the bundle's manifest" in proc.stdout + proc.stderr
        assert str(config) in proc.stdout + proc.stderr
    proc = _infer(bundle, prog_cohort, tmp_path / "p3", "--trust_configs", "true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "p3/other.csv").is_file()


def test_integrity_module_identical_in_both_bundles():
    """Each bundle must run alone, so each carries scripts/integrity.py; one copy, two places."""
    assert (PROG / "scripts/integrity.py").read_bytes() == (SEG / "scripts/integrity.py").read_bytes()


def test_verified_weights_against_large_files(tmp_path):
    """The repository bundles check their shipped files against large_files.yml."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_integrity_test", SEG / "scripts/integrity.py")
    integrity = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(integrity)
    shipped = SEG / "models/synthetic_fs12.pt"
    assert integrity.verified_weights(str(shipped), str(SEG)) == str(shipped)
    copy = tmp_path / "hcc_liver_seg"
    (copy / "models").mkdir(parents=True)
    (copy / "configs").mkdir()
    shutil.copy(SEG / "large_files.yml", copy / "large_files.yml")
    data = bytearray(shipped.read_bytes())
    data[1000] ^= 1
    (copy / "models/synthetic_fs12.pt").write_bytes(bytes(data))
    with pytest.raises(integrity.IntegrityError, match=r"synthetic_fs12\.pt: sha256 [0-9a-f]{64} does not match .*large_files\.yml's 9670d36c"):
        integrity.verified_weights(str(copy / "models/synthetic_fs12.pt"), str(copy))
    assert integrity.verified_weights(None) is None
    # a study folder's manifest.json (the pipeline's) is not a bundle manifest: weights a study
    # trained under OUT/segmentation/models are loaded as unlisted, not refused
    study = tmp_path / "study"
    (study / "segmentation" / "models").mkdir(parents=True)
    (study / "manifest.json").write_text(json.dumps({"stages": {}}))
    trained = study / "segmentation" / "models" / "model.pt"
    shutil.copy(shipped, trained)
    assert integrity.verified_weights(str(trained)) == str(trained)
    with pytest.raises(ValueError, match="trust_configs"):
        integrity._as_bool("maybe")


@pytest.mark.parametrize("bundle", [SEG, PROG], ids=lambda b: b.name)
def test_large_files_list_only_hashed_files_and_download_keeps_them(bundle, tmp_path):
    """Every large_files.yml entry has a sha256 (MONAI checks nothing without one), and
    ``monai.bundle download_large_files`` keeps the shipped file without going online."""
    import yaml

    from monai.bundle import download_large_files

    entries = yaml.safe_load((bundle / "large_files.yml").read_text())["large_files"]
    assert entries and all(len(e["hash_val"]) == 64 and e["hash_type"] == "sha256" for e in entries)
    for e in entries:
        assert (bundle / e["path"]).is_file() and _sha(bundle / e["path"]) == e["hash_val"]
        assert ".example/" in e["url"], "the URL is the documented placeholder a site replaces"
    copy = tmp_path / bundle.name
    shutil.copytree(bundle, copy, ignore=shutil.ignore_patterns("__pycache__"))
    download_large_files(bundle_path=str(copy))  # present and matching: nothing to fetch
    shipped = copy / entries[0]["path"]
    shipped.write_bytes(shipped.read_bytes()[:-1])
    with pytest.raises(Exception, match="hash check"):
        download_large_files(bundle_path=str(copy))


def test_absolute_member_is_refused(exported, tmp_path):
    bad = tmp_path / "absolute.zip"
    shutil.copy(exported["zip"], bad)
    with zipfile.ZipFile(bad, "a") as z:
        z.writestr(zipfile.ZipInfo("/tmp/escaped_absolute.txt"), "x")
    msg = _refused(tmp_path, bad, _sha(bad), r"an absolute path")
    assert "/tmp/escaped_absolute.txt" in msg and not Path("/tmp/escaped_absolute.txt").exists()


def test_relative_weights_are_the_bundles_own(tmp_path, monkeypatch):
    """``--weights models/X.pt`` from the repository root (as the bundle READMEs write it) names
    the bundle's file; the feature_size check then applies to it."""
    from analysis.bundle_archive import BundleExportError, export_bundle

    monkeypatch.chdir(REPO_ROOT)
    with pytest.raises(BundleExportError, match=r"hcc_liver_seg/models/synthetic_fs12\.pt: weights have feature_size 12"):
        export_bundle(SEG, tmp_path / "d", weights="models/synthetic_fs12.pt", overlay="none", trace=False)
