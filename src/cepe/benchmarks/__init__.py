"""Long-context speed and memory of CEPE against full attention (`cepe bench`).

    from cepe.benchmarks import BenchConfig, run_bench
    result = run_bench(BenchConfig(preset="llama2-7b", lengths=(8192, 131072), out="bench"))
"""

from .flops import CrossShape, StackShape, cepe_scoring_flops, decode_step_cost, full_scoring_flops
from .presets import PRESETS, ModelSpec, build_model, get_spec
from .runner import BenchConfig, run_bench

__all__ = ["BenchConfig", "run_bench", "build_model", "get_spec", "ModelSpec", "PRESETS", "StackShape", "CrossShape",
           "cepe_scoring_flops", "full_scoring_flops", "decode_step_cost"]
