"""The two references agree with each other, so a bug in one cannot hide behind the other."""

import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import moe_configs, num_tokens, routing_kinds, seeds

from deepseek_moe_fused.reference import naive_moe_experts, oracle_moe_experts
from deepseek_moe_fused.testing import make_moe_inputs


@given(config=moe_configs(dtypes=[torch.float32]), data=st.data(), kind=routing_kinds, seed=seeds)
def test_naive_loop_equals_oracle_in_float64(config, data, kind, seed):
    inputs = make_moe_inputs(config, data.draw(num_tokens(config)), routing=kind, seed=seed)
    naive = naive_moe_experts(*inputs.kernel_args(), compute_dtype=torch.float64)
    torch.testing.assert_close(naive, oracle_moe_experts(*inputs.kernel_args()), rtol=1e-12, atol=1e-12)


def test_oracle_by_hand():
    """One token, one expert, H = I = 1: out = w * silu(g x) (u x) d + shared."""
    x = torch.tensor([[2.0]])
    gate_up = torch.tensor([[[0.5], [3.0]]])  # gate 0.5, up 3
    down = torch.tensor([[[0.25]]])
    g = 0.5 * 2.0
    expected = 1.5 * (g / (1 + torch.exp(torch.tensor(-g)))) * (3.0 * 2.0) * 0.25
    out = oracle_moe_experts(x, torch.tensor([[1.5]]), torch.tensor([[0]]), gate_up, down)
    torch.testing.assert_close(out, expected.double().view(1, 1))
