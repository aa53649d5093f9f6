#!/usr/bin/env bash
# Issue 15's CPU checks of a candidate adapter before it may replace the release (the "Release checks"
# tables of docs/results_general_stage21.md were made this way; GPU retrieval: scripts/gpu/general.sh):
#
#   bash scripts/release_gates.sh ADAPTER OUT [GATE ...]      GATE: ppl icl qa passkey wording (default: all)
#
#   ppl      perplexity gain recovered on the 4 held-out domains at D = 256 / 512, 4K context; truncated
#            and full attention come from the release's runs (docs/results/cpu/soup_s45), the target is
#            the release's 68 / 84%
#   icl      intent_recognition and multiemo, N = 8 / 32 demonstrations, 2 in the decoder
#   qa       NQ substring match at k = 1 / 20 passages (BM25), one in the decoder
#   passkey  pass key in Moby-Dick, top-k 16, depths 0-0.9 at 16K / 64K
#   wording  how many RULER multi-value values each question wording finds (scripts/question_wording.py)
#
# Needs the held-out mix (MIX, default data/mix: `cepe data build`) and the ICL / NQ sets (DATA,
# default ../shared/data). CPU fp32, THREADS (2) threads. EXAMPLES (100), PPL_DOCS (4), PK_LENGTHS
# (16K,64K) and SAMPLES (12) shrink a run. Each check writes OUT/<check>.json, .png and .log.
set -euo pipefail
adapter=${1:?usage: release_gates.sh ADAPTER OUT [ppl icl qa passkey wording]}
out=${2:?usage: release_gates.sh ADAPTER OUT [ppl icl qa passkey wording]}
shift 2
gates=${*:-ppl icl qa passkey wording}
MIX=${MIX:-data/mix} DATA=${DATA:-../shared/data} THREADS=${THREADS:-2} EXAMPLES=${EXAMPLES:-100}
here=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
common=(--adapter "$adapter" --device cpu --threads "$THREADS" --out "$out" --no-progress)
run() {  # name, then the command: its output goes to OUT/name.log, and a failure stops the script
  local name=$1; shift
  echo "== $name ($(date +%H:%M:%S))"
  "$@" > "$out/$name.log" 2>&1 || { echo "failed: $name (see $out/$name.log)"; tail -5 "$out/$name.log"; exit 1; }
}
for gate in $gates; do
  case $gate in
    ppl)
      for d in 256 512; do
        for domain in books techdocs science code; do
          run "ppl_gate_${domain}_D$d" cepe eval ppl --data "$MIX"/heldout/$domain/*.jsonl -D $d -W $((d / 2)) -E 4K \
            --windows-per-doc 4 --max-docs "${PPL_DOCS:-4}" --methods cepe --name "ppl_gate_${domain}_D$d" "${common[@]}"
        done
        # the baselines scored PPL_DOCS=4's windows: a smaller run has perplexities but no gain
        python3 "$here/scripts/gain_recovered.py" "$out"/ppl_gate_*_D$d.json --out "$out/gain_recovered_D$d.png" \
          --baselines "$here"/docs/results/cpu/soup_s45/ppl_s45_*_D$d.json > "$out/gain_recovered_D$d.md" 2>&1 \
          || echo "gain recovered at D = $d: not computed ($(tail -1 "$out/gain_recovered_D$d.md"))"
        cat "$out/gain_recovered_D$d.md"
      done ;;
    icl)
      for set in intent_recognition multiemo_en; do
        run "icl_$set" cepe eval icl --data "$DATA/icl/$set.jsonl" --demos 8,32 --decoder-demos 2 \
          --max-examples "$EXAMPLES" --methods cepe --name "icl_$set" "${common[@]}"
      done ;;
    qa)
      run qa_nq cepe eval qa --questions "$DATA/qa/nq/questions.jsonl" --passages "$DATA/qa/nq/passages.jsonl" \
        -m 1 -k 1,20 --max-examples "$EXAMPLES" --methods cepe --name qa_nq "${common[@]}" ;;
    passkey)
      run passkey_moby cepe eval passkey --lengths "${PK_LENGTHS:-16K,64K}" --depths 0,0.3,0.6,0.9 --trials 1 \
        --filler "$here/src/cepe/resources/moby_dick_ch1-3.txt" --cross-attn-topk 16 --methods cepe \
        --name passkey_moby "${common[@]}" ;;
    wording)
      run wording python3 "$here/scripts/question_wording.py" --adapter "$adapter" --samples "${SAMPLES:-12}" \
        --threads "$THREADS" --out "$out/wording.json" ;;
    *) echo "unknown check: $gate (ppl icl qa passkey wording)"; exit 2 ;;
  esac
done
echo "== summary"
for log in "$out"/*.log; do  # each command's closing table
  echo "-- $(basename "$log" .log)"
  grep -vE "Warn|warn|^\s*$|results:|plot:" "$log" | tail -n 8
done
