"""Where does the answer position look on RULER's multi-key needles? Each cross-attention layer's
softmax at the question's last token, averaged over heads, summed over each needle statement's
encoder tokens: the asked needle's share against the largest other needle's. The intro and
haystack go to the encoder, the question alone to the decoder. CPU, about 20 s a sample:

    python3 scripts/probe_multikey_attention.py ADAPTER [SAMPLES] [LENGTH]
"""
import re
import sys

import torch

from cepe import CepeForCausalLM
from cepe.evaluation.tasks.ruler import PromptBuilder
from cepe.model.cross_attention import CrossAttention

torch.set_num_threads(2)
model = CepeForCausalLM.from_pretrained(sys.argv[1], decoder="smollm2-135m").eval()
samples, length = int(sys.argv[2]) if len(sys.argv) > 2 else 8, int(sys.argv[3]) if len(sys.argv) > 3 else 4096
tok = model.tokenizer
probs: dict[str, torch.Tensor] = {}


def keep_last_position(name):
    def hook(block, args, out):
        hidden, key = args[0], args[1]  # (1, T, H), (1, Hkv, S, d)
        kv, group = key.shape[1], block.num_heads // key.shape[1]
        q = block.q_proj(block.norm(hidden[:, -1:])).view(1, kv, group, block.head_dim)
        logits = torch.einsum("bkgd,bksd->bkgs", q, key) * block.scaling
        probs[name] = logits.softmax(-1)[0].mean(dim=(0, 1))  # (S,)
    return hook


for name, block in model.named_modules():
    if isinstance(block, CrossAttention):
        block.register_forward_hook(keep_last_position(name))
builder, wins, right = PromptBuilder(tok, seed=0), 0, 0
for i in range(samples):
    s = builder.prompt("niah_multikey", length, i).sample
    asked = re.findall(r"for ([\w-]+) mentioned", s.question)[0]
    text = s.intro + s.context
    offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True).offset_mapping
    spans = {}
    for k, v in re.findall(r"magic numbers for ([\w-]+) is: (\d+)", s.context):
        statement = f"for {k} is: {v}"
        c0 = text.index(statement)
        c1 = c0 + len(statement)
        spans[k] = [j for j, (a, z) in enumerate(offsets) if a < c1 and z > c0]
    x = tok(s.question, add_special_tokens=False, return_tensors="pt").input_ids
    context = model.encode_context([text])
    with torch.no_grad():
        model(x, context=context)  # the hooks keep this forward's last position: where the answer starts
        at_answer = dict(probs)
        gen = model.generate(x, context=context, max_new_tokens=9, do_sample=False)
    answer = tok.decode(gen[0, x.shape[1]:]).strip()
    right += s.answers[0] in answer
    cells = []
    for p in at_answer.values():
        mass = {k: float(p[idx].sum()) for k, idx in spans.items()}
        other = max(v for k, v in mass.items() if k != asked)
        wins += mass[asked] > other
        cells.append(f"{mass[asked]:.2f}/{other:.2f}")
    print(f"{i} {asked}: answer {answer[:12]!r}, gold {s.answers[0]}; asked/best other needle per layer:",
          " ".join(cells), flush=True)
layers = len(at_answer)
print(f"answers right {right}/{samples}; layers where the asked needle gets more than any other: "
      f"{wins}/{samples * layers} (chance with 4 needles: 1/4)")
