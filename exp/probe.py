"""Probe a pretrained tiny model: induction gain by token pool, passkey at 256 with outputs."""
import sys, glob, json, numpy as np, torch, datasets
from pathlib import Path
from tokenizers import Tokenizer
from dsv3.model.model import DSV3ForCausalLM
from dsv3.eval.induction import copy_losses, repeated_random_rows, ordinary_token_ids
from dsv3.eval.passkey import PasskeyTask, greedy_answers
from dsv3.config import load_recipe
from dsv3.data.corpus import recipe_corpus

run = Path(sys.argv[1])
model_dir = run / "pretrain" / "model" if len(sys.argv) < 3 else Path(sys.argv[2])
torch.manual_seed(0)
tok = Tokenizer.from_file(glob.glob(str(run / "tokenizer" / "**" / "tokenizer.json"), recursive=True)[0])
model = DSV3ForCausalLM.from_pretrained(model_dir).eval()
recipe = load_recipe("recipes/tiny.yaml")
corpus = recipe_corpus(recipe.data)
val = corpus["validation"]["text"][:200]
train = corpus["train"]["text"][:2000]
counts = np.zeros(tok.get_vocab_size(), dtype=np.int64)
for e in tok.encode_batch(train):
    np.add.at(counts, e.ids, 1)
order = np.argsort(-counts)
ordinary = set(ordinary_token_ids(tok))
ranked = [int(i) for i in order if int(i) in ordinary]
words = [i for i in ranked[:1500] if (s := tok.id_to_token(i)).startswith("Ġ") and s[1:].isalpha() and len(s) > 3]
pools = {"all": ranked, "top128": ranked[:128], "top512": ranked[:512], "top2048": ranked[:2048], "words": words[:400],
         "bottom2048": ranked[-2048:]}
for name, pool in pools.items():
    r = copy_losses(model, repeated_random_rows(pool, 16, 64, 1234))
    print(f"{name:10s} n={len(pool):5d} first {r['first_copy_loss']:.2f} second {r['second_copy_loss']:.2f} gain {r['induction_gain']:.2f}")
task = PasskeyTask(tok, val, "heldout", 5, 1234)
ids = [task.prompt(256, d, i) for d in (0.1, 0.5, 0.9) for i in range(4)]
x = torch.tensor([p.input_ids for p in ids])
ans = greedy_answers(model, x, 8)
ok = 0
for p, a in zip(ids, ans):
    out = tok.decode(a.tolist())
    ok += out[:5] == p.key
    print(repr(p.key), repr(out))
print("passkey@256", ok / len(ids))
