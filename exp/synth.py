"""From scratch on pure repeated-random-token rows: does induction form, and when? args: steps lr pool_k [llama] [init]"""
import sys, glob, time, json, numpy as np, torch
from pathlib import Path
from tokenizers import Tokenizer
from dsv3.model.model import DSV3ForCausalLM, DSV3Config
from dsv3.eval.induction import copy_losses, repeated_random_rows
steps, lr, k = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
init = float(sys.argv[5]) if len(sys.argv) > 5 else 0.02
import os; seq = int(os.environ.get("SEQ", 128)); B = int(os.environ.get("B", 8))
torch.manual_seed(0)
cfg = json.loads(Path("runs/tiny/base/pretrain/model/config.json").read_text())
cfg["initializer_range"] = init
if sys.argv[4:5] == ["nomtp"] or True:
    cfg["num_nextn_predict_layers"] = 0
config = DSV3Config(**{k2: v for k2, v in cfg.items() if k2 not in ("architectures", "transformers_version", "model_type")})
model = DSV3ForCausalLM(config)
V = config.vocab_size
pool = list(range(300, 300 + k))
opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
probe = repeated_random_rows(list(range(300, 4000)), 16, 64, 99)
probe_k = repeated_random_rows(pool, 16, 64, 98)
t0 = time.time()
for step in range(1, steps + 1):
    x = repeated_random_rows(pool, B, seq // 2, step)
    warm = min(1.0, step / 20)
    for g in opt.param_groups: g["lr"] = lr * warm
    out = model(input_ids=x, labels=x)
    out.loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step(); opt.zero_grad()
    if step % 50 == 0:
        a = copy_losses(model, probe)["induction_gain"]; b = copy_losses(model, probe_k)["induction_gain"]
        print(f"step {step} loss {out.loss.item():.3f} gain_all {a:.2f} gain_pool {b:.2f} {time.time()-t0:.0f}s", flush=True)
