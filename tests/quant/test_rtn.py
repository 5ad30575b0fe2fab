import pytest
import torch

from slimformer.core.runner import run_transforms
from slimformer.core.transform import Targets
from slimformer.formats.primitives import fake_quantize_weight
from slimformer.models.adapters import adapter_for
from slimformer.models.tiny import TINY_FAMILIES, tiny_model
from slimformer.nn.quant_linear import QuantLinear
from slimformer.nn.surgery import linear_weight
from slimformer.techniques.quant.rtn import RTN


def _outputs(model, ids):
    out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_rtn_swaps_every_block_projection_and_matches_fake_quant(family):
    model = tiny_model(family)
    reference = tiny_model(family)
    adapter = adapter_for(model)
    spec = RTN(bits=4, granularity="group", group_size=32, symmetric=False)
    # the reference: the same weights, fake-quantised in place
    with torch.no_grad():
        for block in adapter.get_blocks(reference):
            for module in adapter.block_linears(block).values():
                w = linear_weight(module)
                w.copy_(fake_quantize_weight(w, spec.weight_spec()))
    run_transforms(model, [spec], progress=False)
    for block in adapter.get_blocks(model):
        assert all(isinstance(m, QuantLinear) for m in adapter.block_linears(block).values())
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(_outputs(model, ids), _outputs(reference, ids), atol=1e-4, rtol=1e-4)


def test_targets_limit_which_projections_are_quantised():
    model = tiny_model("llama")
    run_transforms(model, [RTN(bits=8, targets=Targets(include=(r"mlp\..*",)))], progress=False)
    block = model.model.layers[0]
    assert isinstance(block.mlp.up_proj, QuantLinear) and not isinstance(block.self_attn.q_proj, QuantLinear)


def test_static_activation_scales_come_from_calibration():
    model = tiny_model("llama")
    calib = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    first = model.model.layers[0].self_attn.q_proj
    seen = []
    handle = first.register_forward_pre_hook(lambda m, a: seen.append(a[0].abs().max().item()))
    with torch.no_grad():
        model(input_ids=calib)
    handle.remove()
    run_transforms(model, [RTN(bits=8, act_bits=8, act_granularity="tensor", act_dynamic=False)], calib=calib, progress=False)
    q = model.model.layers[0].self_attn.q_proj
    assert q.act_scale.item() == pytest.approx(max(seen) / 127, rel=1e-4)


def test_calibration_recipes_need_data():
    from slimformer.errors import DataError

    with pytest.raises(DataError):
        run_transforms(tiny_model("llama"), [RTN(act_bits=8, act_granularity="tensor", act_dynamic=False)], progress=False)
