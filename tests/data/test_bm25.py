"""bm25s is imported with JAX kept on the CPU (on a GPU machine JAX would take 75% of its memory)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = "from cepe.data.bm25 import import_bm25s; import_bm25s(); import os; print(os.environ.get('JAX_PLATFORMS'))"


@pytest.mark.parametrize(("preset", "expected"), [(None, "cpu"), ("cuda", "cuda")])
def test_import_confines_jax_to_the_cpu_unless_the_user_chose(preset, expected):
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    if preset:
        env["JAX_PLATFORMS"] = preset
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected


def test_import_hides_an_installed_jax(tmp_path):
    # a stand-in JAX that leaves a mark when imported: bm25s must not import it
    (tmp_path / "jax").mkdir()
    mark = tmp_path / "imported"
    (tmp_path / "jax" / "__init__.py").write_text(f"open({str(mark)!r}, 'w').close()\n")
    (tmp_path / "jax" / "lax.py").write_text("def top_k(x, k):\n    return x[:k], list(range(k))\n")
    probe = ("import sys; from cepe.data.bm25 import import_bm25s; b = import_bm25s(); "
             "print(b.selection.JAX_IS_AVAILABLE, 'jax' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"] and not mark.exists()
    # the stand-in is importable, so without the hiding bm25s would have taken it
    plain = subprocess.run([sys.executable, "-c", "import bm25s.selection as s; print(s.JAX_IS_AVAILABLE)"], env=env,
                           capture_output=True, text=True, check=True)
    assert plain.stdout.strip() == "True" and mark.exists()


def test_retrievers_rank_with_the_numpy_backend():
    from cepe.evaluation.retrieval import BM25Retriever

    texts = ["the cat sat on the mat", "dogs bark at night", "a cat and a dog", "stock prices fell"]
    hits = BM25Retriever(texts).search("cat mat", k=2)
    assert [i for i, _ in hits] == [0, 2]
    assert BM25Retriever(texts).search("cat", k=3, exclude={0})[0][0] == 2
