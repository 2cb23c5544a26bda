"""From scratch on rows of episodes `a x b x` of token ids from a 64-id pool. args: steps lr span_lo span_hi gapa gapb"""
import sys, json, os, time, random, torch
from pathlib import Path
from dsv3.model.model import DSV3ForCausalLM, DSV3Config
from dsv3.eval.induction import copy_losses, repeated_random_rows
steps, lr, lo, hi, ga, gb = int(sys.argv[1]), float(sys.argv[2]), *map(int, sys.argv[3:7])
import os; seq, B = 256, int(os.environ.get("B", 8))
pool = list(range(300, 364))
def row(rng):
    out = []
    while len(out) < seq:
        x = [rng.choice(pool) for _ in range(rng.randint(lo, hi))]
        out += [rng.choice(pool) for _ in range(rng.randint(0, ga))] + x + [rng.choice(pool) for _ in range(rng.randint(0, gb))] + x
    return out[:seq]
rng = random.Random(0)
torch.manual_seed(0)
cfg = json.loads(Path("runs/tiny/core1/pretrain/model/config.json").read_text()); cfg["num_nextn_predict_layers"] = 0
model = DSV3ForCausalLM(DSV3Config(**{k: v for k, v in cfg.items() if k not in ("architectures", "transformers_version", "model_type")}))
opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
pc = repeated_random_rows(pool, 16, 64, 7); t0 = time.time()
for step in range(1, steps + 1):
    x = torch.tensor([row(rng) for _ in range(B)])
    for gr in opt.param_groups: gr["lr"] = lr * min(1.0, step / 20)
    out = model(input_ids=x, labels=x); out.loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step(); opt.zero_grad()
    if step % 50 == 0:
        print(f"step {step} loss {out.loss.item():.3f} gain {copy_losses(model, pc)['induction_gain']:.2f} {time.time()-t0:.0f}s", flush=True)
