"""Fine-tune a pretrained tiny model on passkey docs only (train keys) at length L; eval heldout passkey@L."""
import sys, glob, random, time, numpy as np, torch
from pathlib import Path
from tokenizers import Tokenizer
from dsv3.model.model import DSV3ForCausalLM
from dsv3.eval.passkey import PasskeyTask, evaluate_passkey
from dsv3.config import load_recipe
from dsv3.data.corpus import recipe_corpus

run = Path(sys.argv[1]); steps = int(sys.argv[2]); lr = float(sys.argv[3]); L = int(sys.argv[4]) if len(sys.argv) > 4 else 256
answer_only = "ans" in sys.argv
torch.manual_seed(0)
tok = Tokenizer.from_file(glob.glob(str(run / "tokenizer" / "**" / "tokenizer.json"), recursive=True)[0])
model = DSV3ForCausalLM.from_pretrained(run / "pretrain" / "model")
recipe = load_recipe("recipes/tiny.yaml")
corpus = recipe_corpus(recipe.data)
train_task = PasskeyTask(tok, corpus["train"]["text"][:3000], "train", 5, 1)
eval_task = PasskeyTask(tok, corpus["validation"]["text"][:300], "heldout", 5, 1234)
eos = tok.token_to_id("<|eos|>")
opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
rng = random.Random(0)
def ev():
    acc = evaluate_passkey(model, eval_task, [L], [0.1, 0.5, 0.9], 8)
    return np.mean(list(acc.values()))
print("step 0 acc", ev(), flush=True)
t0 = time.time()
for step in range(1, steps + 1):
    docs = [train_task.document(L, rng, eos) for _ in range(8)]
    x = torch.tensor(docs)
    labels = x.clone()
    if answer_only:
        labels[:, : L - 6] = -100
    out = model(input_ids=x, labels=labels)
    out.loss.backward(); opt.step(); opt.zero_grad()
    if step % 25 == 0:
        print(f"step {step} loss {out.loss.item():.3f} acc {ev():.3f} {time.time()-t0:.0f}s", flush=True)
