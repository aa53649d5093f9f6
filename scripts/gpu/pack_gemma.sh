#!/usr/bin/env bash
# Gemma-3-270m for the lent GPU machine (no network, at most 64 MiB per call). Its Q4_K_M GGUF is
# 253 MB (the 262K x 640 embedding alone is 178 MB of Q8_0; xz saves under 5%, and re-quantising
# would train against another model than `cepe assets gemma3-270m` gives): it travels as it is, cut
# into N equal parts of at most PART_MB (default 60) MB, one ignored folder per call:
#   .gpu/g1 .. .gpu/gN   part K of the GGUF + get.sh; the last folder also holds the sha256, the
#                        gguf wheel (transformers reads GGUF through it; the machine lacks it) and
#                        the tokenizer as saved here (3.5 MB xz): the machine's transformers 5.17
#                        reads the GGUF's as a character-level Unigram without <bos> (5.24 reads it
#                        right), and `general.sh unpack` converts the weights with this one instead
# Run from the project root (`cepe assets gemma3-270m` installs the GGUF if it is not there yet):
#   bash scripts/gpu/pack_gemma.sh
# Then, back to back on ONE warm machine (it is given back 30 s after a call), with weights/ moved
# out of the checkout (53 MB: a call is the checkout, about 6 MB without it, plus what it carries):
#   call K = 1..N, carrying .gpu/gK:   bash .gpu/gK/get.sh [&& <the next step>]
# Each get.sh copies its part to /root/gemma3.parts/ (ROOT overrides /root, for a dry run); the call
# that brings the last missing part (any order) assembles /root/gemma3.gguf, checks its sha256 and
# installs the wheel into /root/site, the tokenizer into /root/gemma3.tokenizer. Then `bash scripts/gpu/general.sh unpack` converts it into
# $CEPE_HOME/models/gemma3-270m (docs/training.md, "Gemma-3-270m on the lent GPU").
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> "$(git rev-parse --git-path info/exclude)"
part_mb=${PART_MB:-60}
gguf=$(python3 -c "from cepe.assets import install, gguf_path; install('gemma3-270m'); print(gguf_path('gemma3-270m'))" | tail -1)
sha=$(python3 -c "from cepe.assets import ASSETS; print(ASSETS['gemma3-270m'].sha256)")
echo "$sha  $gguf" | sha256sum -c --quiet
tokdir=$(dirname "$gguf")
python3 - "$tokdir" <<'EOP'
import sys
from transformers import AutoTokenizer
from cepe.assets import check_tokenizer
problem = check_tokenizer(AutoTokenizer.from_pretrained(sys.argv[1]), add_bos=True)
sys.exit(f"{sys.argv[1]}: {problem}: reinstall it with transformers >= 5.24 (cepe assets gemma3-270m --force)" if problem else 0)
EOP
size=$(stat -c %s "$gguf")
n=$(( (size + part_mb * 1000000 - 1) / (part_mb * 1000000) ))
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: -d "$tmp/whl" gguf==0.19.0
rm -rf .gpu/g[0-9]*
split -n "$n" -d -a 2 "$gguf" "$tmp/gemma3.gguf.part"   # N parts of equal size (the last a few bytes more)
for k in $(seq 1 "$n"); do
  d=.gpu/g$k
  mkdir -p "$d"
  mv "$tmp/gemma3.gguf.part$(printf %02d $((k - 1)))" "$d/"
  cat > "$d/get.sh" <<EOS
set -euo pipefail
R=\${ROOT:-/root}; mkdir -p \$R/gemma3.parts && cp .gpu/g$k/* \$R/gemma3.parts/ && rm \$R/gemma3.parts/get.sh
have=\$(ls \$R/gemma3.parts/gemma3.gguf.part* | wc -l); echo "gemma3 part $k: \$have of $n parts on \$R"
if [ "\$have" = $n ]; then
  cat \$R/gemma3.parts/gemma3.gguf.part* > \$R/gemma3.gguf
  (cd \$R && sha256sum -c gemma3.parts/gemma3.sha256) && rm \$R/gemma3.parts/gemma3.gguf.part*
  python3 -m pip install -q --no-index --no-deps --target \$R/site \$R/gemma3.parts/*.whl
  mkdir -p \$R/gemma3.tokenizer && tar -xJf \$R/gemma3.parts/gemma3.tokenizer.tar.xz -C \$R/gemma3.tokenizer
  echo "\$R/gemma3.gguf ready (PYTHONPATH=\$R/site has gguf)"
fi
EOS
done
echo "$sha  gemma3.gguf" > ".gpu/g$n/gemma3.sha256"
cp "$tmp"/whl/*.whl ".gpu/g$n/"
tar -C "$tokdir" -cf - tokenizer.json tokenizer_config.json | xz -T2 -6 > ".gpu/g$n/gemma3.tokenizer.tar.xz"
du -b .gpu/g[0-9]* | sort -k2 -V | awk '{printf "%s  %.1f MB\n", $2, $1 / 1e6}'
checkout=$(git ls-files -z | grep -zv '^weights/' | xargs -0 du -cb | tail -1 | cut -f1)
echo "checkout without weights/: $(( checkout / 1000000 )) MB; a call may hold 67.1 MB (64 MiB)"
echo "calls: for K in 1..$n, carry .gpu/gK and run: bash .gpu/gK/get.sh   (weights/ moved out of the checkout)"
