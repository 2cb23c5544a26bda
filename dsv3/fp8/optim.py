"""AdamW with its moments stored in BF16, DeepSeek-V3 section 3.3.3 ("Low-precision optimizer states").

The paper tracks AdamW's first and second moments in BF16 "without incurring observable performance
degradation", while master weights and gradients stay FP32. Here each step reads the moments into FP32, does
AdamW's update in FP32 (decoupled weight decay, bias correction, as torch.optim.AdamW) and stores them back
rounded to BF16: half the optimizer memory of AdamW.
"""

import math

import torch

MOMENT_DTYPE = torch.bfloat16


class AdamWBF16Moments(torch.optim.Optimizer):
    """torch.optim.AdamW's update with exp_avg / exp_avg_sq kept in BF16 and the arithmetic in FP32."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"AdamWBF16Moments needs lr, eps, weight_decay >= 0 and betas in [0, 1), got "
                             f"lr={lr}, eps={eps}, weight_decay={weight_decay}, betas={betas}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, decay = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("AdamWBF16Moments does not take sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=MOMENT_DTYPE, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=MOMENT_DTYPE, memory_format=torch.preserve_format)
                state["step"] += 1
                t = float(state["step"])
                grad = p.grad.float()
                exp_avg = state["exp_avg"].float().lerp_(grad, 1 - beta1)  # m_t, fp32
                exp_avg_sq = state["exp_avg_sq"].float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)  # v_t
                state["exp_avg"].copy_(exp_avg)  # stored rounded to bf16
                state["exp_avg_sq"].copy_(exp_avg_sq)
                p.mul_(1 - lr * decay)
                denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**t)).add_(eps)
                update = exp_avg.div_(denom).mul_(-lr / (1 - beta1**t))
                p.add_(update.to(p.dtype))
        return loss

    def load_state_dict(self, state_dict) -> None:
        """torch casts loaded float state to each parameter's dtype (fp32); put the moments back in BF16 (exact)."""
        super().load_state_dict(state_dict)
        for state in self.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key] = state[key].to(MOMENT_DTYPE)
