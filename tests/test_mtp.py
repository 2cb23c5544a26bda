"""dsv3/model/mtp.py: MTP depth losses (eqs. 21-25), the causal chain, targets within documents."""

import torch
import torch.nn.functional as F

from dsv3.model import DSV3ForCausalLM
from dsv3.model.model import DecoderLayer
from dsv3.model.mtp import shifted_targets
from tests.toy_model import toy_config


def tiny_model(depth: int) -> DSV3ForCausalLM:
    config = toy_config(
        vocab_size=64,
        n_routed_experts=8,
        n_group=2,
        num_nextn_predict_layers=depth,
        initializer_range=0.1,
    )
    torch.manual_seed(0)
    return DSV3ForCausalLM(config).eval()


def test_depth_one_loss_written_out():
    model = tiny_model(1)
    ids = torch.randint(0, 64, (2, 9))
    out = model(ids, labels=ids)
    T = ids.shape[1]
    h0 = model.model(ids).hidden_before_norm[:, : T - 1]  # h^0_i for i whose token i+1 exists
    layer = model.model.layers[2]
    cos, sin = model.model.rotary_emb(torch.arange(T - 1)[None])
    emb = model.model.embed_tokens(ids[:, 1:])
    h = layer.eh_proj(torch.cat((layer.enorm(emb), layer.hnorm(h0)), dim=-1))  # eq. 21
    h1, _ = DecoderLayer.forward(layer, h, cos, sin, None)  # eq. 22: the module's block
    logits = model.lm_head(layer.shared_head.norm(h1))  # eq. 23
    expected = F.cross_entropy(logits[:, : T - 2].reshape(-1, 64), ids[:, 2:].reshape(-1))  # predicts t_{i+2}
    torch.testing.assert_close(out.mtp_losses[0], expected, atol=1e-5, rtol=1e-5)


def test_causal_chain_is_kept_at_every_depth():
    model = tiny_model(2)
    captured = []
    for layer in model.model.layers[2:]:
        layer.register_forward_hook(lambda module, args, out: captured.append(out[0]))  # h^k
    ids = torch.randint(0, 64, (1, 10))
    model(ids, labels=ids)
    changed = ids.clone()
    changed[0, 6] = (ids[0, 6] + 1) % 64
    model(changed, labels=changed)
    for k in (1, 2):  # h^k_i sees tokens up to i + k
        before, after = captured[k - 1], captured[k + 1]
        torch.testing.assert_close(before[:, : 6 - k], after[:, : 6 - k])
        assert not torch.allclose(before[:, 6 - k], after[:, 6 - k])


def test_one_loss_per_depth_and_none_without_mtp():
    model = tiny_model(2)
    ids = torch.randint(0, 64, (2, 8))
    losses = model(ids, labels=ids).mtp_losses
    assert losses.shape == (2,) and torch.isfinite(losses).all()
    assert tiny_model(0)(ids, labels=ids).mtp_losses is None


def test_targets_stay_inside_their_document():
    labels = torch.tensor([[10, 11, 12, 13, 20, 21, 22]])
    docs = torch.tensor([[0, 0, 0, 0, 1, 1, 1]])
    assert shifted_targets(labels, docs, 2).tolist() == [[12, 13, -100, -100, 22, -100, -100]]


def test_mtp_gradients_reach_the_shared_embedding_and_head():
    model = tiny_model(1).train()
    ids = torch.randint(0, 64, (2, 8))
    model(ids, labels=ids).mtp_losses.sum().backward()
    assert model.model.layers[2].eh_proj.weight.grad.abs().sum() > 0
    assert model.lm_head.weight.grad.abs().sum() > 0 and model.model.embed_tokens.weight.grad.abs().sum() > 0
