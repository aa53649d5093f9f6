"""Perplexity of the released adapter with its context read as stored in each format (table in
docs/benchmarks.md). Run from this folder: python3 summ.py"""
import json, os
cats = ["books", "techdocs", "science", "code"]
fmts = ["float32", "bfloat16", "int8", "fp8"]
def load(path, method):
    d = json.load(open(path))["results"]["methods"][method]
    (v,) = d.values()
    return v["nll"], v["ppl"], v["tokens"], v["window_nll"]
rows = []
tot = {f: [0, 0] for f in fmts + ["truncated"]}
for c in cats:
    base = f"ppl_d256_s5_{c}.json"
    trunc = load(f"../../ppl_d256_s4_{c}.json", "truncated")
    line = {"category": c, "truncated_ppl": trunc[1]}
    tot["truncated"][0] += trunc[0] * trunc[2]; tot["truncated"][1] += trunc[2]
    for f in fmts:
        path = base if f == "float32" else f"ppl_d256_s5_{f}_{c}.json"
        if not os.path.exists(path):
            continue
        nll, ppl, n, w = load(path, "cepe")
        line[f + "_ppl"] = ppl
        tot[f][0] += nll * n; tot[f][1] += n
    rows.append(line)
import math
for r in rows:
    print(r["category"], " ".join(f"{k}={v:.3f}" for k, v in r.items() if k != "category"))
allr = {f: math.exp(a / b) for f, (a, b) in tot.items() if b}
print("all", {k: round(v, 3) for k, v in allr.items()})
for f in ["bfloat16", "int8", "fp8"]:
    if f in allr:
        print(f, "ppl change vs float32: %+.2f%%" % (100 * (allr[f] / allr["float32"] - 1)),
              "| share of context's gain lost: %.1f%%" % (100 * (math.log(allr[f]) - math.log(allr["float32"])) / (math.log(allr["truncated"]) - math.log(allr["float32"]))))
json.dump({"rows": rows, "all": allr}, open("summary.json", "w"), indent=1)
