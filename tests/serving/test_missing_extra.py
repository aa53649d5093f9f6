"""Without the serving extra, `cepe serve` says what to install (not "invalid choice: 'serve'")."""

from __future__ import annotations

import os
import subprocess
import sys

WITHOUT_FASTAPI = "import sys; sys.modules['fastapi'] = None; from cepe.cli import main; sys.exit(main(sys.argv[1:]))"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT_FASTAPI, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


def test_serve_without_its_extra_says_what_to_install():
    r = run("serve", "--port", "8001", "--adapter", "released")
    assert r.returncode == 2, r.stderr
    assert "pip install 'cepe[serve]'" in r.stderr and "fastapi" in r.stderr and "invalid choice" not in r.stderr
    assert "Traceback" not in r.stderr
    listed = run("--help")
    assert "serve" in listed.stdout
    bad = run("assets", "--no-such-flag")  # other commands still refuse unknown flags
    assert bad.returncode == 2 and "unrecognized arguments" in bad.stderr
