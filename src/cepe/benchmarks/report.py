"""The short printed tables and the plot of a benchmark result."""

from __future__ import annotations

from pathlib import Path


def _k(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def _f(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def score_table(result: dict) -> str:
    rows = [r for r in result["rows"] if r["task"] == "score"]
    if not rows:
        return ""
    lines = [f"{'method':<6} {'length':>6} {'time s':>8} {'spread':>14} {'1st/med':>7} {'tok/s':>9} {'peak GB':>8} "
             f"{'TFLOP/s':>8} {'MFU':>5}  status"]
    for r in rows:
        lines.append(
            f"{r['method']:<6} {_k(r['total_len']):>6} {_f(r.get('time_s'), '8.3f'):>8} {spread(r):>14} "
            f"{_f(r.get('first_over_median'), '7.2f'):>7} "
            f"{_f(r.get('tokens_per_s'), '9.0f'):>9} {_f(r.get('peak_gb'), '8.1f'):>8} "
            f"{_f(r.get('tflops_per_s'), '8.0f'):>8} {_f(r.get('mfu'), '5.0%'):>5}  {status(r)}"
        )
    speed = speedups(result)
    if speed:
        lines.append("CEPE speed-up over full attention: " + ", ".join(f"{_k(n)} {s:.1f}x" for n, s in speed.items()))
    return "\n".join(lines)


def decode_table(result: dict) -> str:
    rows = [r for r in result["rows"] if r["task"] == "decode"]
    if not rows:
        return ""
    lines = [f"{'method':<6} {'policy':<9} {'used':<9} {'mode':<6} {'length':>6} {'TTFT s':>7} {'ms/tok':>7} "
             f"{'GB/s':>6} {'peak GB':>8} {'graph~eager':>11}  status"]
    for r in rows:
        ok = r["status"] == "ok"
        lines.append(
            f"{r['method']:<6} {r['policy']:<9} {r.get('policy_used') or '-':<9} {r.get('mode') or '-':<6} "
            f"{_k(r['total_len']):>6} {_f(r.get('ttft_s'), '7.3f'):>7} {_f(r.get('ms_per_token'), '7.2f'):>7} "
            f"{_f(r.get('gb_per_s'), '6.0f'):>6} {_f(r.get('peak_gb'), '8.1f'):>8} "
            f"{_f(r.get('graph_logits_rel_err'), '11.1e'):>11}  "
            f"{'' if ok else r['status'] + ': ' + str(r.get('error'))[:60]}"
        )
    return "\n".join(lines)


def spread(r: dict) -> str:
    """'min-max ms' of a row's timed calls, with '*' when the warm-up hit its bound before
    repeated calls agreed within its tolerance."""
    if r.get("time_min_s") is None:
        return "-"
    lo, hi = r["time_min_s"], r["time_max_s"]
    unit, k = ("s", 1) if hi >= 10 else ("ms", 1e3)
    text = f"{lo * k:.3g}-{hi * k:.3g}{unit}"
    return text + ("" if r.get("warm_converged", True) else "*")


def status(r: dict) -> str:
    if r["status"] == "ok":
        return ""
    return r["status"] + (f": {str(r.get('error'))[:60]}" if r["status"] == "skipped" else "")


def ttft_table(result: dict) -> str:
    """Time to first token of a question over a stored document (CEPE: states on the device, no
    encoder run) or over the same text with full attention (prefill everything)."""
    rows = [r for r in result["rows"] if r["task"] == "ttft"]
    if not rows:
        return ""
    q = rows[0]["question_tokens"]
    lines = [f"time to first token, {q}-token question over a stored document",
             f"{'method':<6} {'length':>6} {'TTFT s':>8} {'spread':>14} {'1st/med':>7} {'load s':>7} "
             f"{'state B/tok':>11} {'peak GB':>8}  status"]
    for r in rows:
        lines.append(
            f"{r['method']:<6} {_k(r['total_len']):>6} {_f(r.get('time_s'), '8.4f'):>8} {spread(r):>14} "
            f"{_f(r.get('first_over_median'), '7.2f'):>7} {_f(r.get('load_s'), '7.3f'):>7} "
            f"{_f(r.get('stored_state_bytes_per_token'), '11d'):>11} {_f(r.get('peak_gb'), '8.1f'):>8}  {status(r)}")
    t = {(r["method"], r["total_len"]): r["time_s"] for r in rows if r["status"] == "ok"}
    speed = {n: t[("full", n)] / t[("cepe", n)] for (m, n) in sorted(t) if m == "cepe" and ("full", n) in t}
    if speed:
        lines.append(
            "CEPE TTFT speed-up over full attention: " + ", ".join(f"{_k(n)} {s:.0f}x" for n, s in speed.items())
        )
    return "\n".join(lines)


def kernel_table(result: dict) -> str:
    rows = [r for r in result["rows"] if r["task"] == "kernel"]
    if not rows:
        return ""
    lines = [f"cross-attention alone, {_k(rows[0]['context_tokens'])} context tokens, "
             f"{rows[0]['heads']} query / {rows[0]['kv_heads']} key-value heads",
             f"{'phase':<8} {'kernel':<10} {'ms':>8} {'TFLOP/s':>8} {'GB/s':>7}  status"]
    for r in rows:
        lines.append(f"{r['phase']:<8} {r['backend']:<10} {_f(r.get('time_ms'), '8.3f'):>8} "
                     f"{_f(r.get('tflops_per_s'), '8.0f'):>8} {_f(r.get('gb_per_s'), '7.0f'):>7}  "
                     f"{'' if r['status'] == 'ok' else str(r.get('error'))[:60]}")
    return "\n".join(lines)


def speedups(result: dict) -> dict[int, float]:
    t = {
        (r["method"], r["total_len"]): r["time_s"]
        for r in result["rows"]
        if r["task"] == "score" and r["status"] == "ok"
    }
    return {n: t[("full", n)] / t[("cepe", n)] for (m, n) in sorted(t) if m == "cepe" and ("full", n) in t}


def summary(result: dict) -> str:
    env, c = result["env"], result.get("ceilings", {})
    head = (
        f"{result['model']['name']} on {env['device']} | torch {env['torch']} | transformers {env['transformers']} | "
        f"{env['dtype']} | {env['attention']}"
    )
    if c.get("matmul_tflops"):
        head += f" | ceilings: bf16 matmul {c['matmul_tflops']:.0f} TFLOP/s, copy {c['copy_gbps']:.0f} GB/s"
    acc = result["model"].get("bytes_per_context_token")
    if acc:
        head += (f"\nkept per context token: encoder states {acc['states']:,} B | cross-attention keys/values "
                 f"{acc['cross_kv_cache']:,} B ({acc['cache_over_states']:.0f}x)")
        if acc.get("full_attention_kv"):
            head += f" | full attention's KV cache {acc['full_attention_kv']:,} B ({acc['full_over_states']:.0f}x)"
    compile_s = result["model"].get("encoder_compile_s")
    head += "\nencoder: " + (f"compiled (compiling took {compile_s:.1f} s, outside every row)"
                              if compile_s is not None else "eager")
    tables = (head, kernel_table(result), score_table(result), decode_table(result), ttft_table(result))
    return "\n".join(x for x in tables if x)


def plot(result: dict, path: str | Path) -> None:
    """Scoring time and peak memory against total length (every method), and decoding ms/token."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, axes = plt.subplots(1, 4, figsize=(21, 4.6))
    styles = {"cepe": dict(color="tab:blue", marker="o"), "full": dict(color="tab:red", marker="s")}
    names = {"cepe": "CEPE", "full": "full attention"}
    methods = list(dict.fromkeys(r["method"] for r in rows if r["task"] == "score"))
    extra = iter(["tab:green", "tab:purple", "tab:olive", "tab:cyan"])
    for method in methods:
        style = styles.get(method) or dict(color=next(extra), marker="^")
        label = names.get(method, method)
        rs = [r for r in rows if r["task"] == "score" and r["method"] == method]
        ok = [r for r in rs if r["status"] == "ok"]
        axes[0].plot([r["total_len"] for r in ok], [r["time_s"] for r in ok], label=label, **style)
        mem = [r for r in ok if r.get("peak_gb") is not None]  # none on CPU
        axes[1].plot([r["total_len"] for r in mem], [r["peak_gb"] for r in mem], label=label, **style)
        for r in rs:
            if r["status"] == "oom":
                for ax in axes[:2]:
                    ax.axvline(r["total_len"], color=style["color"], ls=":", lw=1)
                    ax.annotate("OOM", (r["total_len"], 0.5), xycoords=("data", "axes fraction"), color=style["color"])
    dec = [r for r in rows if r["task"] == "decode" and r["status"] == "ok"]
    series = sorted(
        {(r["method"], r["policy"], r["mode"]) for r in dec} - {("cepe", "none", "graph"), ("cepe", "none", "eager")}
    )
    for method, policy, mode in series:
        rs = [r for r in dec if (r["method"], r["policy"], r["mode"]) == (method, policy, mode)]
        if method == "cepe":  # without context (length <= D) CEPE is the plain decoder: the series' first point
            rs = [r for r in dec if (r["method"], r["policy"], r["mode"]) == ("cepe", "none", mode)] + rs
        name = "full attention" if method == "full" else f"CEPE {policy}"
        axes[2].plot([r["total_len"] for r in rs], [r["ms_per_token"] for r in rs],
                     marker="o" if method == "cepe" else "s", ls="-" if mode == "graph" else "--",
                     label=f"{name} ({mode})")
    for r in rows:
        if r["task"] == "decode" and r["status"] == "oom":
            axes[2].annotate(f"{names.get(r['method'], r['method'])}: OOM", (r["total_len"], 0.95),
                             xycoords=("data", "axes fraction"), ha="right", fontsize=8, color="tab:red")
    for method in ("cepe", "full"):
        rs = [r for r in rows if r["task"] == "ttft" and r["method"] == method and r["status"] == "ok"]
        if not rs:  # no legend entry for a method that was not run
            continue
        label = "CEPE, stored states" if method == "cepe" else names[method]
        axes[3].plot([r["total_len"] for r in rs], [r["time_s"] for r in rs], label=label, **styles[method])
    axes[3].set_yscale("log")
    ttft_q = next((r["question_tokens"] for r in rows if r["task"] == "ttft"), 512)
    titles = ("scoring time (s)", "scoring peak memory (GB)", "decoding ms / token (batch 1)",
              f"time to first token (s), {ttft_q}-token question")
    lengths = sorted({r["total_len"] for r in rows if "total_len" in r})
    for ax, title in zip(axes, titles):
        ax.set_xscale("log", base=2)
        if lengths:
            ax.set_xticks(lengths, [_k(n) for n in lengths])
            # x only: a log y axis spanning less than a decade is labelled by its minor ticks
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("total tokens")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    axes[0].set_yscale("log")
    env = result["env"]
    fig.suptitle(
        f"{result['model']['name']} shapes, random weights, {env['dtype']} | {env['device']} | {env['date']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
