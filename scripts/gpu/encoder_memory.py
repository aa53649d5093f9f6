"""Peak GPU memory of CEPE's parallel encoder on the released SmolLM2 adapter's shapes (random
weights: memory does not depend on their values), by encoder slice size and SDPA backend.

Why: a QA batch of 64 questions x 20 passages (1,280 chunks of 256 tokens) ran out of memory on an
H200 with 34 GB allocated by PyTorch and about 105 GB held outside its allocator.
    python3 scripts/gpu/encoder_memory.py [--chunks 1280] [--out $OUT/encoder_memory.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def one(chunks: int, per_pass: int | None, backend: str) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from cepe import CepeForCausalLM

    root = Path(__file__).resolve().parents[2]
    cfg = json.loads((root / "weights/cepe-smollm2-135m/config.json").read_text())["text_config"]
    text = AutoConfig.for_model(**cfg)
    dec = AutoModelForCausalLM.from_config(text).to("cuda", torch.bfloat16)
    m = CepeForCausalLM.from_base(dec, None, chunk_size=256, encoder_num_layers=4, cross_attn_layers="every:2",
                                  cross_attn_init="zero").to("cuda", torch.bfloat16).eval()
    m.config.encoder_chunks_per_pass = per_pass
    ids = torch.randint(3, 40000, (1, chunks, 256), device="cuda")
    torch.cuda.synchronize()
    free0, total = torch.cuda.mem_get_info()
    torch.cuda.reset_peak_memory_stats()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"default": None, "efficient": [SDPBackend.EFFICIENT_ATTENTION], "math": [SDPBackend.MATH],
                "cudnn": [SDPBackend.CUDNN_ATTENTION]}[backend]
    try:
        with torch.no_grad():
            if backends:
                with sdpa_kernel(backends):
                    m.encode(ids)
            else:
                m.encode(ids)
        torch.cuda.synchronize()
        free1, _ = torch.cuda.mem_get_info()
        return {"chunks": chunks, "per_pass": per_pass, "backend": backend, "ok": True,
                "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
                "reserved_gib": torch.cuda.memory_reserved() / 2**30,
                "device_used_gib": (total - free1) / 2**30, "device_used_before_gib": (total - free0) / 2**30}
    except torch.OutOfMemoryError as e:
        return {"chunks": chunks, "per_pass": per_pass, "backend": backend, "ok": False, "error": str(e)[:300]}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--chunks", type=int, default=1280)
    p.add_argument("--out", default="encoder_memory.json")
    p.add_argument("--one", nargs=3, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:  # one measurement in a fresh process, so nothing is left over from the previous
        chunks, per_pass, backend = a.one
        print(json.dumps(one(int(chunks), None if per_pass == "all" else int(per_pass), backend)))
        return 0
    rows = []
    for backend in ("default", "efficient", "math"):
        for per_pass in ("all", "1024", "256"):
            r = subprocess.run(
                [sys.executable, __file__, "--chunks", str(a.chunks), "--one", str(a.chunks), per_pass, backend],
                capture_output=True,
                text=True,
                check=False,
            )
            row = (
                json.loads(r.stdout.strip().splitlines()[-1])
                if r.returncode == 0
                else {"backend": backend, "per_pass": per_pass, "error": r.stderr[-300:]}
            )
            rows.append(row)
            print(
                f"{backend:9s} per_pass={per_pass:5s} "
                + (
                    f"peak alloc {row['peak_allocated_gib']:.1f} GiB, reserved {row['reserved_gib']:.1f}, "
                    f"device used {row['device_used_gib']:.1f}"
                    if row.get("ok")
                    else f"FAILED {row.get('error', '')[:200]}"
                ),
                flush=True,
            )
    Path(a.out).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
