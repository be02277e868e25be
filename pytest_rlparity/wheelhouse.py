"""An offline wheelhouse for GPU runners: build it where there is network, install it where there is none.

GPU CI runners usually have torch and CUDA already and no internet. ``build`` picks the
vLLM release whose torch pin matches the runner's torch, downloads it and only the
run-time dependencies the runner lacks, slims the vLLM wheel (FlashAttention 2 and the
``vllm-rs`` binary are not used on Hopper), and splits archives larger than a transfer
limit into parts. ``install`` verifies and reassembles the parts and installs everything
with ``pip --no-index``. A ``manifest.json`` records what was chosen and why.

    python -m pytest_rlparity wheelhouse build .wheelhouse --python 3.12 --torch 2.11.0 --have runner-freeze.txt
    python -m pytest_rlparity wheelhouse install .wheelhouse            # on the runner
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import lzma
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from packaging.requirements import Requirement

VLLM_FOR_TORCH = {"2.11.0": "0.26.0", "2.9.0": "0.13.0"}
"""The newest vLLM whose wheel pins each torch (0.24-0.26 pin 2.11.0; 0.26.0 links CUDA 13)."""

EXCLUDE = (
    "torch", "torchvision", "torchaudio", "triton", "nvidia-*", "cuda-*", "flashinfer*", "tilelang",
    "*cutlass-dsl*", "quack*", "humming*", "tokenspeed-mla", "torchcodec", "pynvvideocodec",
    "fastsafetensors", "compressed-tensors", "mcp", "anthropic", "opentelemetry*", "ray", "xformers",
    "mistral-common",
)  # fmt: skip
"""Not needed to run this suite's engines (or already provided by the runner's CUDA stack).

mistral-common is left out on purpose: installed beside transformers 5.17 it makes
tokenizer loading try ``MistralCommonBackend`` and fail (seen with vLLM 0.26.0).
"""

SLIM = ("vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so", "vllm/vllm-rs")
"""Members dropped from the vLLM wheel for Hopper runners (FlashAttention 3 is used there)."""

PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux_2_31_x86_64", "manylinux_2_34_x86_64", "manylinux_2_35_x86_64", "manylinux1_x86_64")  # fmt: skip


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_have(path: Path | None) -> set[str]:
    """Package names on the runner, from ``pip freeze``/``pip list --format=freeze`` or one name per line."""
    if path is None:
        return set()
    names = set()
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            names.add(normalize(re.split(r"[=<>@ ;]", line, maxsplit=1)[0]))
    return names


def excluded(name: str, patterns: Sequence[str] = EXCLUDE) -> bool:
    return any(fnmatch.fnmatch(normalize(name), p) for p in patterns)


def _pip(args: Sequence[str]) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def _target_args(python: str) -> list[str]:
    args = ["--only-binary=:all:", "--python-version", python, "--implementation", "cp"]
    for platform in PLATFORMS:
        args += ["--platform", platform]
    return args


def requirements(wheel: Path, python: str) -> list[Requirement]:
    """The wheel's run-time requirements that apply on the target (Linux x86-64, ``python``, no extras)."""
    from packaging.requirements import Requirement

    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = zf.read(name).decode()
    env = {"python_version": python, "python_full_version": f"{python}.0", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython", "extra": ""}  # fmt: skip
    found = []
    for line in metadata.splitlines():
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is None or req.marker.evaluate(env):
                found.append(req)
    return found


def collect(vllm_version: str, python: str, have: set[str], download: Path) -> tuple[list[Path], list[str]]:
    """vLLM and every requirement the runner lacks, consistent with each other; returns wheels and skipped names.

    Requirements are followed level by level with ``pip download --no-deps`` (resolving
    everything would drag in torch and the CUDA stack). When a package picked late
    needs another version of one picked earlier, that package's version is excluded and
    the walk starts again.
    """
    avoid: dict[str, list[str]] = {}
    for _ in range(8):
        for wheel in download.glob("*.whl"):
            wheel.unlink()
        skipped = _walk(vllm_version, python, have, download, avoid)
        conflicts = _conflicts(download, python)
        if not conflicts:
            return sorted(download.glob("*.whl")), skipped
        for requirer, version, why in conflicts:
            avoid.setdefault(requirer, []).append(f"!={version}")
            print(f"wheelhouse: {requirer} {version} needs {why}; trying an older {requirer}", file=sys.stderr)
    raise SystemExit(f"could not find consistent versions; still conflicting: {conflicts}")


def _walk(vllm_version: str, python: str, have: set[str], download: Path, avoid: dict[str, list[str]]) -> list[str]:
    seen: set[str] = {"vllm"}
    skipped: set[str] = set()
    pending = [f"vllm=={vllm_version}"]
    while pending:
        before = set(download.glob("*.whl"))
        _pip(["download", "--no-deps", "--quiet", "-d", str(download), *_target_args(python), *pending])
        pending = []
        for wheel in sorted(set(download.glob("*.whl")) - before):
            for req in requirements(wheel, python):
                name = normalize(req.name)
                if name in seen:
                    continue
                seen.add(name)
                if name in have or excluded(name):
                    skipped.add(name)
                else:
                    specs = [str(req.specifier)] if req.specifier else []
                    pending.append(req.name + ",".join(specs + avoid.get(name, [])))
    return sorted(skipped)


def _conflicts(download: Path, python: str) -> list[tuple[str, str, str]]:
    """(requirer, its version, unmet requirement) for every requirement a picked version violates."""
    picked = {}
    for wheel in download.glob("*.whl"):
        name, version = wheel.name.split("-")[:2]
        picked[normalize(name)] = (wheel, version)
    found = []
    for name, (wheel, version) in picked.items():
        for req in requirements(wheel, python):
            dep = picked.get(normalize(req.name))
            if dep is not None and not req.specifier.contains(dep[1], prereleases=True):
                found.append((name, version, f"{req.name}{req.specifier} (picked {dep[1]})"))
    return found


def build(dest: Path, *, python: str, torch: str, have: set[str], part_mib: int = 60, vllm: str | None = None,
          slim: bool = True) -> dict[str, Any]:  # fmt: skip
    """Download, slim and split; returns the manifest it writes to ``dest/manifest.json``."""
    version = vllm or VLLM_FOR_TORCH.get(torch)
    if version is None:
        raise SystemExit(f"no known vLLM release pins torch {torch}; pass --vllm VERSION (known: {VLLM_FOR_TORCH})")
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        _, skipped = collect(version, python, have, work)
        own_wheel(work)
        archives = []
        for wheel in sorted(work.glob("*.whl")):
            if wheel.stat().st_size <= part_mib << 20 and not (slim and wheel.name.startswith("vllm-")):
                shutil.copy2(wheel, dest / wheel.name)
                continue
            archives.append(pack(wheel, dest, part_mib=part_mib, drop=SLIM if slim else ()))
    wheels = sorted(p.name for p in dest.glob("*.whl"))
    manifest = {
        "python": python,
        "torch": torch,
        "vllm": version,
        "wheels": wheels,
        "sha256": {name: _sha256(dest / name) for name in wheels},
        "archives": archives,
        "skipped_on_runner_or_excluded": skipped,
    }
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def own_wheel(out: Path) -> Path:
    """A wheel of this plugin in ``out``: built from its source tree when run from one, else packed
    from the installed distribution's own files (in a normal install the package sits in
    site-packages, whose parent is no project)."""
    source = Path(__file__).resolve().parents[1]
    if (source / "pyproject.toml").is_file() and 'name = "pytest-rlparity"' in (source / "pyproject.toml").read_text():
        _pip(["wheel", "--no-deps", "--quiet", "-w", str(out), str(source)])
        return max(out.glob("pytest_rlparity-*.whl"), key=lambda p: p.stat().st_mtime)
    import base64
    import importlib.metadata

    dist = importlib.metadata.distribution("pytest-rlparity")
    info = next(str(f).split("/")[0] for f in dist.files or () if str(f).endswith(".dist-info/METADATA"))
    skip = {f"{info}/{name}" for name in ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json")}
    wheel = out / f"pytest_rlparity-{dist.version}-py3-none-any.whl"
    record = []
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in dist.files or ():
            name = str(f)
            if name in skip or name.startswith("..") or "__pycache__" in name or not name.startswith(("pytest_rlparity/", info)):
                continue
            data = Path(f.locate()).read_bytes()
            zf.writestr(name, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{name},sha256={digest},{len(data)}")
        record.append(f"{info}/RECORD,,")
        zf.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
    return wheel


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _plain_name(name: Any, source: Path) -> str:
    """A manifest's file name, refused unless it names a file directly inside the wheelhouse."""
    if not isinstance(name, str) or not name or name in (".", "..") or Path(name).name != name or "\\" in name:
        raise SystemExit(f"{source / 'manifest.json'}: {name!r} is not a plain file name; refusing a manifest that points outside {source}")
    return name


def pack(wheel: Path, dest: Path, *, part_mib: int, drop: Iterable[str] = ()) -> dict[str, Any]:
    """``wheel`` minus ``drop`` as tar.xz, split into parts of at most ``part_mib`` MiB."""
    drop = set(drop)
    archive = dest / (wheel.name + ".tar.xz")
    with zipfile.ZipFile(wheel) as zf, lzma.open(archive, "wb", preset=6) as xz, tarfile.open(fileobj=xz, mode="w") as tar:
        for info in zf.infolist():
            if info.filename in drop or info.is_dir():
                continue
            data = zf.read(info)
            member = tarfile.TarInfo(info.filename)
            member.size = len(data)
            member.mode = (info.external_attr >> 16) or 0o644
            tar.addfile(member, io.BytesIO(data))
    digest = _sha256(archive)
    parts = []
    with archive.open("rb") as f:
        while chunk := f.read(part_mib << 20):
            part = dest / f"{archive.name}.part{len(parts):03d}"
            part.write_bytes(chunk)
            parts.append(part.name)
    archive.unlink()
    return {"wheel": wheel.name, "parts": parts, "sha256": digest, "dropped": sorted(drop)}


def unpack(entry: dict[str, Any], source: Path, out: Path) -> Path:
    """Reassemble one archive's parts into a wheel under ``out``, after checking its hash."""
    parts = [_plain_name(p, source) for p in entry["parts"]]
    name = _plain_name(entry["wheel"], source)
    missing = [p for p in parts if not (source / p).is_file()]
    if missing:
        raise SystemExit(f"{entry['wheel']}: parts missing from {source}: {missing}")
    joined = out / (name + ".tar.xz")
    digest = hashlib.sha256()
    with joined.open("wb") as f:
        for part in parts:
            data = (source / part).read_bytes()
            digest.update(data)
            f.write(data)
    if digest.hexdigest() != entry["sha256"]:
        raise SystemExit(f"{entry['wheel']}: the parts do not add up (sha256 mismatch); copy them again")
    wheel = out / name
    with lzma.open(joined) as xz, tarfile.open(fileobj=xz, mode="r") as tar, zipfile.ZipFile(wheel, "w", zipfile.ZIP_STORED) as zf:
        for member in tar:
            handle = tar.extractfile(member)
            if handle is not None:
                info = zipfile.ZipInfo(member.name)
                info.external_attr = (member.mode & 0o7777) << 16
                zf.writestr(info, handle.read())
    joined.unlink()
    return wheel


def install(source: Path, *, target: Path | None = None) -> list[str]:
    """Install every wheel of the wheelhouse with ``pip --no-index --no-deps``, each checked against
    the sha256 the manifest records for it first; returns their names."""
    manifest = json.loads((source / "manifest.json").read_text())
    hashes = manifest.get("sha256", {})
    for name in manifest["wheels"]:
        path = source / _plain_name(name, source)
        if name not in hashes:
            raise SystemExit(f"{name}: the manifest records no sha256 for it; rebuild the wheelhouse")
        if not path.is_file() or _sha256(path) != hashes[name]:
            raise SystemExit(f"{name}: missing or not the file the wheelhouse was built with (sha256 mismatch); copy it again")
    with tempfile.TemporaryDirectory() as tmp:
        rebuilt = [unpack(entry, source, Path(tmp)) for entry in manifest["archives"]]
        wheels = [source / w for w in manifest["wheels"]] + rebuilt
        args = ["install", "--no-index", "--no-deps", "--no-compile", "--quiet", "--upgrade"]
        if target is not None:
            args += ["--target", str(target)]
        _pip([*args, *map(str, wheels)])
    return [w.name for w in wheels]


def main(argv: Sequence[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pytest_rlparity wheelhouse", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="download and pack wheels for a runner (needs network)")
    b.add_argument("dest", type=Path)
    b.add_argument("--python", default="3.12", help="the runner's Python (default 3.12)")
    b.add_argument("--torch", default="2.11.0", help="the runner's torch version; picks the vLLM that pins it")
    b.add_argument("--vllm", help="a vLLM version instead of the one picked from --torch")
    b.add_argument("--have", type=Path, help="`pip freeze` of the runner: those packages are not downloaded")
    b.add_argument("--part-mib", type=int, default=60, help="largest file in the wheelhouse, MiB (default 60)")
    b.add_argument("--no-slim", action="store_true", help="keep FlashAttention 2 and vllm-rs (non-Hopper GPUs)")
    i = sub.add_parser("install", help="install a wheelhouse without network")
    i.add_argument("source", type=Path)
    i.add_argument("--target", type=Path, help="install into this directory (pip --target) instead of the environment")
    args = parser.parse_args(argv)
    if args.command == "build":
        manifest = build(args.dest, python=args.python, torch=args.torch, have=read_have(args.have),
                         part_mib=args.part_mib, vllm=args.vllm, slim=not args.no_slim)  # fmt: skip
        print(json.dumps({k: manifest[k] for k in ("python", "torch", "vllm")}), f"{len(manifest['wheels'])} wheels,",
              f"{sum(len(a['parts']) for a in manifest['archives'])} parts in {args.dest}")  # fmt: skip
    else:
        print(f"installed {len(install(args.source, target=args.target))} wheels")
    return 0
