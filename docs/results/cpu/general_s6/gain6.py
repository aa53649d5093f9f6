"""recovered gain (truncated - cepe)/(truncated - full) per domain: s6 (cepe only) against the
truncated/full/cepe rows of the stage-4 runs on the same windows"""
import json, sys, os
for D, new, old in ((256, "ppl_d256_s6_%s", "ppl_d256_s4_%s"), (512, "ppl_s6_%s", "ppl_s4_%s")):
    rows = []
    for cat in ("books", "techdocs", "science", "code"):
        fn, fo = f"/work/evals/{new % cat}.json", f"/work/evals/{old % cat}.json"
        if not (os.path.exists(fn) and os.path.exists(fo)):
            continue
        n, o = json.load(open(fn)), json.load(open(fo))
        assert n["results"]["windows"] == o["results"]["windows"], cat
        get = lambda d, m: next(iter(d["results"]["methods"][m].values()))["ppl"]
        t, f = get(o, "truncated"), get(o, "full")
        s4 = get(o, "s4") if D == 512 else get(o, "cepe")
        s6 = get(n, "cepe")
        g = lambda c: (t - c) / (t - f)
        rows.append((cat, t, f, s4, s6, g(s4), g(s6)))
        print(f"D={D} {cat:9s} trunc {t:7.2f} full {f:7.2f} s4 {s4:7.2f} s6 {s6:7.2f}  gain s4 {g(s4):5.0%} s6 {g(s6):5.0%}  ctx helps s6 {s6/t-1:+.1%}")
    if rows:
        print(f"D={D} mean gain s4 {sum(r[5] for r in rows)/len(rows):.0%} s6 {sum(r[6] for r in rows)/len(rows):.0%} over {len(rows)} domains")
