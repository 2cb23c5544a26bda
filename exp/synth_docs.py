"""From scratch on packed generated documents of a source: does induction form? args: source steps lr [seq]"""
import sys, glob, json, os, time, random, torch
from pathlib import Path
from tokenizers import Tokenizer
from dsv3.model.model import DSV3ForCausalLM, DSV3Config
from dsv3.eval.induction import copy_losses, repeated_random_rows
from dsv3.config import load_recipe
from dsv3.data.corpus import recipe_corpus
from dsv3.data.generated import corpus_words, generated_documents
source, steps, lr = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]); seq = int(os.environ.get("SEQ", 256)); B = int(os.environ.get("B", 8))
run = Path("runs/tiny/core1")
tok = Tokenizer.from_file(glob.glob(str(run / "tokenizer" / "**" / "tokenizer.json"), recursive=True)[0])
w = corpus_words(recipe_corpus(load_recipe("recipes/tiny.yaml").data)["train"]["text"])
docs = generated_documents(source, 3000, 1, w)
stream = [i for e in tok.encode_batch(docs) for i in e.ids + [0]]
rows = torch.tensor(stream[: len(stream) // (seq + 1) * (seq + 1)]).view(-1, seq + 1)[:, :seq]
print("rows", rows.shape, flush=True)
torch.manual_seed(0)
cfg = json.loads((run / "pretrain/model/config.json").read_text()); cfg["num_nextn_predict_layers"] = 0
model = DSV3ForCausalLM(DSV3Config(**{k: v for k, v in cfg.items() if k not in ("architectures", "transformers_version", "model_type")}))
opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
core = sorted({tok.encode(" " + x).ids[0] for x in w[:64] if len(tok.encode(" " + x).ids) == 1})
full = sorted({tok.encode(" " + x).ids[0] for x in w[:2000] if len(tok.encode(" " + x).ids) == 1})
pc, pf = repeated_random_rows(core, 16, 64, 7), repeated_random_rows(full, 16, 64, 7)
g = torch.Generator().manual_seed(0); t0 = time.time()
for step in range(1, steps + 1):
    x = rows[torch.randint(len(rows), (B,), generator=g)]
    for gr in opt.param_groups: gr["lr"] = lr * min(1.0, step / 40)
    out = model(input_ids=x, labels=x); out.loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step(); opt.zero_grad()
    if step % 50 == 0:
        print(f"step {step} loss {out.loss.item():.3f} gain_core {copy_losses(model, pc)['induction_gain']:.2f} gain_words {copy_losses(model, pf)['induction_gain']:.2f} {time.time()-t0:.0f}s", flush=True)
