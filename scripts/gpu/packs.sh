#!/usr/bin/env bash
# Here (the development machine, with network to the registries), once per fresh checkout: build
# every ignored folder that the lent GPU's calls carry for the general adapter (issue 15):
#   .gpu/p1 .gpu/p2 .gpu/p3  SmolLM2's GGUF in two halves + the gguf wheel, MiniLM (../shared/tools/gpu_pack.sh)
#   .whl/                    the bm25s and vaderSentiment wheels (the GPU machine lacks them; RULER and
#                            retrieval samples use bm25s, tone-labelled demonstrations vaderSentiment)
#   .gpu/d0                  the 200 M-character subset of the mix as xz parts under 48 MiB
# and the mix itself under DATA (default /work/data): src (downloads), mixfull, mixsub, and mix -> mixfull.
# About 10 minutes on 2 cores, most of it `cepe data fetch`. Each step is skipped when its output exists.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:-/work/data}
[ -f .gpu/p2/gpu_unpack.sh ] || bash ../shared/tools/gpu_pack.sh
ls .whl/bm25s-*.whl >/dev/null 2>&1 || python3 -m pip download -q --no-deps -d .whl bm25s
ls .whl/vaderSentiment-*.whl >/dev/null 2>&1 || python3 -m pip download -q --no-deps -d .whl vaderSentiment
if [ ! -f "$DATA/mixfull/manifest.json" ]; then
  # the pinned Debian versions can be newer than a fresh machine's package lists
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then apt-get update -qq; fi
  cepe data fetch --dir "$DATA/src"
  cepe data build --dir "$DATA/src" --out "$DATA/mixfull" --jobs 2
fi
[ -f "$DATA/mixsub/manifest.json" ] || cepe data subset --out "$DATA/mixfull" --to "$DATA/mixsub" --chars 2e8
[ -f .gpu/d0/SHA256SUMS ] || cepe data pack --out "$DATA/mixsub" --packs .gpu/d0 --max-mib 48
ln -sfn "$DATA/mixfull" "$DATA/mix"
du -sh .gpu/* .whl
