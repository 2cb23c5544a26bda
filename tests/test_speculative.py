"""dsv3/infer/speculative.py: MTP speculative decoding gives greedy decoding's tokens, whatever the drafts."""

import pytest
import torch

from dsv3.infer.absorbed import absorb_attention
from dsv3.infer.speculative import greedy_decode, mtp_speculative_decode
from dsv3.model import DSV3ForCausalLM
from tests.toy_model import toy_config

V = C = 64
CONFIG = dict(
    vocab_size=V,
    hidden_size=C,
    num_attention_heads=4,
    initializer_range=0.3,
    num_nextn_predict_layers=1,
    eos_token_id=None,
)




def random_model(**overrides) -> DSV3ForCausalLM:
    torch.manual_seed(0)
    return absorb_attention(DSV3ForCausalLM(toy_config(**CONFIG | overrides)).eval())


@torch.no_grad()
def successor_model(mtp_agrees: bool, attention_scale: float) -> DSV3ForCausalLM:
    """A model that mostly continues t with t+1 (mod V), so its greedy text is predictable from the last token alone.

    Orthonormal embeddings, lm_head row t+1 = 4·emb[t], every FFN output zeroed, attention outputs scaled by
    `attention_scale` (small: the context perturbs the successor rule now and then). The MTP module's projection
    M = [I, 0] keeps Emb(t_{i+1}) and so drafts t_{i+1}+1, the main model's next choice (agrees); M = [0, I] keeps
    the main hidden state and drafts t_i+1 = t_{i+1}, never the successor (disagrees).
    """
    model = random_model()
    for name, param in model.named_parameters():
        if "down_proj" in name:
            param.zero_()
        if "o_proj" in name:
            param.mul_(attention_scale)
    torch.nn.init.orthogonal_(model.model.embed_tokens.weight)
    model.lm_head.weight.copy_(model.model.embed_tokens.weight.roll(1, dims=0) * 4)
    eye, zero = torch.eye(C), torch.zeros(C, C)
    mtp = model.model.layers[model.config.num_hidden_layers]
    mtp.eh_proj.weight.copy_(torch.cat((eye, zero) if mtp_agrees else (zero, eye), dim=1))
    return model


def prompts(n: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, V, (1, 3 + 2 * i), generator=generator) for i in range(n)]


def check_equal_to_greedy(model, max_new_tokens=24) -> tuple[int, int]:
    drafted = accepted = 0
    for ids in prompts(3):
        reference = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
        plain = greedy_decode(model, ids, max_new_tokens)
        speculative = mtp_speculative_decode(model, ids, max_new_tokens)
        assert torch.equal(plain.sequences, reference)
        assert speculative.sequences.tolist() == reference.tolist()
        assert speculative.new_tokens == max_new_tokens
        assert speculative.main_forwards == 1 + speculative.drafted
        drafted, accepted = drafted + speculative.drafted, accepted + speculative.accepted
    return drafted, accepted


def test_random_model_speculative_equals_greedy():
    drafted, _ = check_equal_to_greedy(random_model())
    assert drafted > 0


def test_mtp_that_agrees_is_accepted_and_output_is_unchanged():
    drafted, accepted = check_equal_to_greedy(successor_model(mtp_agrees=True, attention_scale=0.15))
    assert 0.4 < accepted / drafted < 1  # both branches taken: accepted drafts and rollbacks
    # fewer main forwards than tokens: two tokens per accepted draft
    assert drafted < 3 * 24 - 1


def test_mtp_that_always_disagrees_is_rolled_back_and_output_is_unchanged():
    drafted, accepted = check_equal_to_greedy(successor_model(mtp_agrees=False, attention_scale=0.1))
    assert drafted == 3 * 23 and accepted == 0  # one draft per token after the first, none kept


def test_stops_after_eos_like_greedy():
    model = successor_model(mtp_agrees=True, attention_scale=0.0)
    ids = torch.tensor([[5, 6, 7]])
    eos = 12  # the successor chain reaches it after 4 tokens
    plain = greedy_decode(model, ids, 20, eos_token_id=eos)
    speculative = mtp_speculative_decode(model, ids, 20, eos_token_id=eos)
    assert plain.sequences.tolist() == speculative.sequences.tolist() == [[5, 6, 7, 8, 9, 10, 11, 12]]
    assert speculative.acceptance_rate == 1.0


def test_rejects_batches_and_models_without_mtp():
    with pytest.raises(ValueError, match="one prompt at a time"):
        mtp_speculative_decode(random_model(), torch.zeros(2, 3, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="no MTP module"):
        mtp_speculative_decode(
            random_model(num_nextn_predict_layers=0), torch.zeros(1, 3, dtype=torch.long), 4
        )
