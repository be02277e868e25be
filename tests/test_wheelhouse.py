"""The offline wheelhouse: packing, splitting, verified reassembly, dependency selection (no network)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from pytest_rlparity import wheelhouse
from tests.conftest import REPO


def make_wheel(path, files, requires=()):
    meta = "Metadata-Version: 2.1\nName: demo\nVersion: 1.0\n" + "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("demo-1.0.dist-info/METADATA", meta)
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def test_pack_splits_drops_and_reassembles_exactly(tmp_path):
    big = os.urandom(int(2.5 * (1 << 20)))  # incompressible: forces three 1 MiB parts
    wheel = make_wheel(tmp_path / "demo-1.0-py3-none-any.whl", {"demo/big.bin": big, "demo/fa2.so": b"x" * 100, "demo/a.py": b"A = 1\n"})
    dest = tmp_path / "house"
    dest.mkdir()
    entry = wheelhouse.pack(wheel, dest, part_mib=1, drop=["demo/fa2.so"])
    assert len(entry["parts"]) == 3 and all((dest / p).stat().st_size <= 1 << 20 for p in entry["parts"])
    out = tmp_path / "out"
    out.mkdir()
    rebuilt = wheelhouse.unpack(entry, dest, out)
    with zipfile.ZipFile(rebuilt) as zf:
        assert zf.read("demo/big.bin") == big and zf.read("demo/a.py") == b"A = 1\n"
        assert "demo/fa2.so" not in zf.namelist()


def test_corrupt_or_missing_parts_are_refused(tmp_path):
    wheel = make_wheel(tmp_path / "demo-1.0-py3-none-any.whl", {"demo/big.bin": os.urandom(1 << 20)})
    dest = tmp_path / "house"
    dest.mkdir()
    entry = wheelhouse.pack(wheel, dest, part_mib=1)
    first = dest / entry["parts"][0]
    first.write_bytes(first.read_bytes()[:-1] + b"\0")
    with pytest.raises(SystemExit, match="do not add up"):
        wheelhouse.unpack(entry, dest, tmp_path)
    first.unlink()
    with pytest.raises(SystemExit, match="parts missing"):
        wheelhouse.unpack(entry, dest, tmp_path)


def test_requirements_follow_the_target_markers(tmp_path):
    wheel = make_wheel(
        tmp_path / "demo-1.0-py3-none-any.whl",
        {},
        ["xgrammar<1.0.0,>=0.2.1; platform_machine == \"x86_64\"", "six; python_version > \"3.11\"", "pywin32; sys_platform == \"win32\"", "rich; extra == \"cli\""],
    )
    names = [r.name for r in wheelhouse.requirements(wheel, "3.12")]
    assert names == ["xgrammar", "six"]
    assert [r.name for r in wheelhouse.requirements(wheel, "3.11")] == ["xgrammar"]


def test_conflicting_picks_are_found(tmp_path):
    make_wheel(tmp_path / "xgrammar-0.2.8-py3-none-any.whl", {}, ["apache-tvm-ffi>=0.1.11"])
    make_wheel(tmp_path / "apache_tvm_ffi-0.1.10-py3-none-any.whl", {})
    conflicts = wheelhouse._conflicts(tmp_path, "3.12")
    assert conflicts == [("xgrammar", "0.2.8", "apache-tvm-ffi>=0.1.11 (picked 0.1.10)")]


def test_runner_packages_and_exclusions_are_not_downloaded(tmp_path):
    freeze = tmp_path / "freeze.txt"
    freeze.write_text("torch==2.11.0+cu130\nTransformers==5.17.0\n# comment\nsafetensors @ file:///x\n")
    have = wheelhouse.read_have(freeze)
    assert have == {"torch", "transformers", "safetensors"}
    assert wheelhouse.excluded("flashinfer-python") and wheelhouse.excluded("nvidia-cudnn-cu13")
    assert wheelhouse.excluded("mistral_common") and not wheelhouse.excluded("xgrammar")


def house(tmp_path, manifest=None):
    wheel = make_wheel(tmp_path / "a-1.0-py3-none-any.whl", {"a.py": b"A = 1\n"})
    document = {"wheels": [wheel.name], "sha256": {wheel.name: wheelhouse._sha256(wheel)}, "archives": [], **(manifest or {})}
    (tmp_path / "manifest.json").write_text(json.dumps(document))
    return wheel


def test_install_checks_every_wheel_then_reads_the_manifest(tmp_path, monkeypatch):
    wheel = house(tmp_path)
    calls = []
    monkeypatch.setattr(wheelhouse, "_pip", calls.append)
    assert wheelhouse.install(tmp_path, target=tmp_path / "site") == [wheel.name]
    assert calls[0][:3] == ["install", "--no-index", "--no-deps"] and "--target" in calls[0]
    make_wheel(wheel, {"a.py": b"A = 2\n"})  # another file under the same name
    with pytest.raises(SystemExit, match="sha256 mismatch"):
        wheelhouse.install(tmp_path)
    house(tmp_path, {"sha256": {}})
    with pytest.raises(SystemExit, match="records no sha256"):
        wheelhouse.install(tmp_path)
    assert len(calls) == 1  # pip never ran on an unchecked file


@pytest.mark.parametrize("name", ["/etc/passwd", "../outside.whl", "sub/../../x.whl", "..", ""])
def test_names_that_point_outside_the_wheelhouse_are_refused(tmp_path, name):
    house(tmp_path, {"wheels": [name]})
    with pytest.raises(SystemExit, match="not a plain file name"):
        wheelhouse.install(tmp_path)
    house(tmp_path, {"archives": [{"wheel": "v-1.whl", "parts": [name], "sha256": "0"}]})
    with pytest.raises(SystemExit, match="not a plain file name"):
        wheelhouse.install(tmp_path)


def test_the_plugins_own_wheel_builds_from_an_installed_package(tmp_path):
    """In a normal install the package lies in site-packages: the wheel is packed from the installed files."""
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile", "--target", str(site), str(REPO)], check=True)
    out = tmp_path / "out"
    out.mkdir()
    code = "import sys, pathlib; from pytest_rlparity import wheelhouse; print(wheelhouse.own_wheel(pathlib.Path(sys.argv[1])))"
    env = {**os.environ, "PYTHONPATH": str(site)}
    built = Path(subprocess.run([sys.executable, "-c", code, str(out)], env=env, cwd=tmp_path, check=True, capture_output=True, text=True).stdout.strip())
    with zipfile.ZipFile(built) as zf:
        names = zf.namelist()
    assert "pytest_rlparity/plugin.py" in names and any(n.endswith(".dist-info/entry_points.txt") for n in names)
    assert not any(n.endswith(("direct_url.json", "INSTALLER")) or "__pycache__" in n for n in names)
    again = tmp_path / "again"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(again), str(built)], check=True)
    assert (again / "pytest_rlparity" / "wheelhouse.py").read_bytes() == (REPO / "pytest_rlparity" / "wheelhouse.py").read_bytes()
