"""Probes: small runs that isolate one effect the tiny pipeline cannot show at its scale (recipes/probes/).

The tiny pipeline trains ~1.6·10^6 tokens; in-context copying (induction heads) needs on the order of 10^7 tokens at
its batch and context sizes (Olsson et al. 2022; Aoyama et al. 2025: ~10^5.7·√(batch·context) tokens), so its
passkey retrieval stays at 0% and GRPO has nothing to sharpen on held-out arithmetic. Two probes show the mechanisms
where a CPU can:

    copy.py   a 2-layer DeepSeek-V3 model on synthetic repeated-segment and key-value rows (dsv3.data.probes):
              induction gain over training, key-value retrieval at the training length, then 4x the length with
              plain RoPE and with YaRN (recipes/probes/copy.yaml)
    grpo.py   the GRPO probe's table from a pipeline run of recipes/probes/grpo.yaml — a task the SFT model gets
              partly right: training reward over steps with its spread, held-out accuracy SFT vs RL

`dsv3 probes` (flows/probes.py) runs both and writes runs/probes/probes.md and .html.
"""
