"""Multi-token prediction (MTP), DeepSeek-V3 report §2.2, eqs. 21-25.

Module k (k = 1..D) combines the previous depth's representation of token i with the embedding of token i+k,
runs one transformer block and predicts token i+k+1 with the shared output head, keeping the causal chain of
every depth. Embedding and head are the main model's; each module owns its norms, projection and block. The
modules sit after the main blocks (`model.layers.{num_hidden_layers + k - 1}`), named as in DeepSeek's checkpoints.
The first depth takes the main model's last hidden state before its final norm (the module normalises it with hnorm).
"""

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.model.model import DecoderLayer, attention_mask_4d, document_ids


class SharedHead(nn.Module):
    """The module's own norm before the shared output head (the head itself is the main model's lm_head)."""

    def __init__(self, config):
        super().__init__()
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class MultiTokenPredictionLayer(DecoderLayer):
    """MTP module k: M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h_i^{k-1})] (eq. 21) -> TRM_k (eq. 22) -> shared head (eq. 23).

    The concatenation puts the embedding first, as every public implementation does (the paper writes h first).
    """

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.enorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.hnorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)  # M_k
        self.shared_head = SharedHead(config)

    def forward(self, h_prev, emb_next, cos, sin, mask, cache=None, token_mask=None):
        """h_prev (B, T, C): depth k-1; emb_next (B, T, C): Emb(t_{i+k}) -> h^k (B, T, C), the module's normed h^k
        for the shared head (eq. 23), and the block's balance loss (None for a dense block).

        Everything the module owns runs inside this one call, so that a sharded module (FSDP2) gathers its
        parameters once for all of it; the shared embedding and head are the root's."""
        h = self.eh_proj(torch.cat((self.enorm(emb_next), self.hnorm(h_prev)), dim=-1))  # eq. 21
        h, balance = super().forward(h, cos, sin, mask, cache=cache, token_mask=token_mask)  # eq. 22
        return h, self.shared_head.norm(h), balance


def shifted_targets(labels: torch.Tensor, docs: torch.Tensor, shift: int) -> torch.Tensor:
    """targets[i] = labels[i + shift], -100 past the end and where token i + shift lies in another document."""
    T = labels.shape[1]
    target = F.pad(labels[:, shift:], (0, min(shift, T)), value=-100)
    same_doc = F.pad(docs[:, shift:], (0, min(shift, T)), value=-1) == docs
    return target.masked_fill(~same_doc, -100)


def multi_token_prediction_losses(
    lm, hidden_before_norm, input_ids, inputs_embeds, labels, attention_mask, position_ids
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eqs. 24-25 per depth: L^k = CE(P^k_i, t_{i+k+1}); returns the losses (D,) and the MTP blocks' balance loss.

    The trainer forms L_MTP = (λ/D) Σ_k L^k. Tokens i+k beyond the row are fed as zero embeddings; their
    predictions have no target. Labels follow the HF convention (aligned with input_ids, -100 ignored).
    """
    config, model = lm.config, lm.model
    emb = model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
    B, T, _ = emb.shape
    if position_ids is None:
        position_ids = torch.arange(T, device=emb.device)[None]
    position_ids = position_ids.expand(B, T)
    docs = document_ids(position_ids)
    mask = attention_mask_4d(position_ids, attention_mask, 0)
    token_mask = None if attention_mask is None else attention_mask[:, -T:].bool()
    cos, sin = model.rotary_emb(position_ids)
    h, losses, balance = hidden_before_norm, [], emb.new_zeros((), dtype=torch.float32)
    for k, layer in enumerate(model.layers[config.num_hidden_layers :], start=1):
        emb_next = F.pad(emb[:, k:], (0, 0, 0, min(k, T)))  # Emb(t_{i+k}), zeros past the end
        h, normed, layer_balance = layer(h, emb_next, cos, sin, mask, token_mask=token_mask)
        if layer_balance is not None:
            balance = balance + layer_balance
        logits = lm.lm_head(normed).float()  # eq. 23
        target = shifted_targets(labels, docs, k + 1)
        n_valid = (target != -100).sum().clamp(min=1)
        losses.append(
            F.cross_entropy(logits.view(-1, logits.shape[-1]), target.reshape(-1), reduction="sum") / n_valid
        )
    return torch.stack(losses), balance
