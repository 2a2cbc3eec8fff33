"""The transformers drop-in: tiny DeepSeek V3/V2 causal LMs before and after `patch_model`."""

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed: pip install -e .[hf]")

from deepseek_moe_fused import DeepSeekMoELayer, MoEConfig  # noqa: E402
from deepseek_moe_fused.hf import patch_model  # noqa: E402
from deepseek_moe_fused.testing import TOLERANCES, error_stats  # noqa: E402

TINY = dict(
    vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
    first_k_dense_replace=1, num_attention_heads=2, num_key_value_heads=2, q_lora_rank=16, kv_lora_rank=16,
    qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_routed_experts=8, num_experts_per_tok=2,
    max_position_embeddings=64,
)  # fmt: skip


def _model_dtype(device) -> torch.dtype:
    """bf16 where it runs natively; fp32 in the interpreter (it cannot multiply bf16)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _tiny_model(kind: str, device, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "v3":
        config = transformers.DeepseekV3Config(**TINY, n_group=2, topk_group=1, n_shared_experts=1)
        model = transformers.DeepseekV3ForCausalLM(config)
    else:
        config = transformers.DeepseekV2Config(
            **TINY, n_shared_experts=2, topk_method="group_limited_greedy", n_group=4, topk_group=2
        )
        model = transformers.DeepseekV2ForCausalLM(config)
    with torch.no_grad():  # transformers initialises routers (and the V3 bias) to zeros: make them real
        for name, p in model.named_parameters():
            if "mlp.gate.weight" in name or "experts" in name:
                p.normal_(std=0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(std=0.1)
    return model.to(device=device, dtype=_model_dtype(device)).eval()


@pytest.mark.parametrize("kind", ["v3", "v2"])
def test_patched_model_gives_same_logits_and_tokens(device, kind):
    model = _tiny_model(kind, device)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        before = model(ids).logits
        generated_before = model.generate(ids[:1], max_new_tokens=4, do_sample=False)
    keys_before = set(model.state_dict())
    assert patch_model(model) == 1
    assert isinstance(model.model.layers[1].mlp, DeepSeekMoELayer)
    assert set(model.state_dict()) == keys_before  # same names: checkpoints still load
    with torch.no_grad():
        after = model(ids).logits
        generated_after = model.generate(ids[:1], max_new_tokens=4, do_sample=False)
    assert error_stats(after, before).within(TOLERANCES[_model_dtype(device)])
    assert torch.equal(generated_after, generated_before)


@pytest.mark.parametrize("kind", ["v3", "v2"])
def test_training_step_updates_the_original_parameters(device, kind):
    reference, patched = _tiny_model(kind, device), _tiny_model(kind, device)
    original = dict(patched.named_parameters())
    patch_model(patched)
    assert all(p is original[n] for n, p in patched.named_parameters())  # shared, not copied
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(2)).to(device)
    for model in (reference, patched):
        model.train()
        model(ids, labels=ids).loss.backward()
    ref_grads = dict(reference.named_parameters())
    for name, p in patched.named_parameters():
        want = ref_grads[name].grad
        if want is None:
            assert p.grad is None or not p.grad.any(), name
            continue
        stats = error_stats(p.grad, want)
        # fp32 gradients through two decoder layers: 1e-4 relative in norm (the MoE sums in another
        # order). bf16: both models round every activation to bf16, so the table's bf16 bound.
        bound = 1e-4 if p.dtype == torch.float32 else TOLERANCES[p.dtype].rel_norm
        assert stats.rel_norm < bound, f"{name}: {stats}"


def test_config_from_hf():
    v3 = transformers.DeepseekV3Config(**TINY, n_group=2, topk_group=1, n_shared_experts=1, routed_scaling_factor=2.5)
    config = MoEConfig.from_hf(v3)
    assert (config.scoring_func, config.topk_method, config.n_group, config.topk_group) == ("sigmoid", "noaux_tc", 2, 1)
    assert (config.hidden_dim, config.intermediate_dim, config.num_experts, config.top_k) == (32, 16, 8, 2)
    assert config.norm_topk_prob and config.routed_scaling_factor == 2.5
    v2 = transformers.DeepseekV2Config(**TINY, n_shared_experts=2, norm_topk_prob=True)
    config = MoEConfig.from_hf(v2)
    assert (config.scoring_func, config.topk_method, config.n_group, config.n_shared_experts) == (
        "softmax",
        "greedy",
        1,
        2,
    )
    assert not config.norm_topk_prob  # transformers' V2 router ignores it
    with pytest.raises(TypeError, match="DeepseekV3Config or DeepseekV2Config"):
        MoEConfig.from_hf(transformers.LlamaConfig())
    with pytest.raises(TypeError, match="module must be one of"):
        DeepSeekMoELayer.from_hf(torch.nn.Linear(2, 2))
