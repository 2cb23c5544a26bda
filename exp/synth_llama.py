import sys, time, torch
from transformers import LlamaConfig, LlamaForCausalLM
from dsv3.eval.induction import copy_losses, repeated_random_rows
steps, lr, k = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
layers = int(sys.argv[4]) if len(sys.argv) > 4 else 4
torch.manual_seed(0)
m = LlamaForCausalLM(LlamaConfig(vocab_size=4096, hidden_size=128, intermediate_size=384, num_hidden_layers=layers,
    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, initializer_range=0.02))
pool = list(range(300, 300 + k))
opt = torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
probe_k = repeated_random_rows(pool, 16, 64, 98)
t0 = time.time()
for step in range(1, steps + 1):
    x = repeated_random_rows(pool, 8, 64, step)
    for g in opt.param_groups: g["lr"] = lr * min(1.0, step / 20)
    out = m(input_ids=x, labels=x); out.loss.backward(); torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0); opt.step(); opt.zero_grad()
    if step % 50 == 0:
        print(f"step {step} loss {out.loss.item():.3f} gain_pool {copy_losses(m, probe_k)['induction_gain']:.2f} {time.time()-t0:.0f}s", flush=True)
