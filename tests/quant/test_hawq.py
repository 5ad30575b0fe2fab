"""HAWQ: Hutchinson traces against the exact Hessian, the exact knapsack, and the plan
driving GPTQ/RTN per layer."""

import itertools

import pytest
import torch
import torch.nn as nn

from slimformer.core.runner import run_transforms
from slimformer.core.transform import build_transform
from slimformer.errors import QuantConfigError, RecipeError
from slimformer.models.tiny import tiny_model
from slimformer.techniques.quant.gptq import GPTQ
from slimformer.techniques.quant.hawq import (
    HAWQ,
    allocate_bits,
    average_bits,
    hutchinson_traces,
)
from slimformer.techniques.quant.rtn import RTN


def test_hutchinson_trace_matches_the_exact_hessian_trace():
    """A tiny least-squares "model": the loss is quadratic in W, so its Hessian is known."""
    torch.manual_seed(0)

    class Quadratic(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(6, 3, bias=False)
            self.x = torch.randn(20, 6)

        def forward(self, input_ids):
            out = self.proj(self.x)
            return type("Out", (), {"logits": None, "last_hidden_state": out})()

    model = Quadratic()
    # L = mean((W x - ref)²) over 20×3 outputs → ∂²L/∂W² = 2/(20·3) · Σ x xᵀ per output row.
    exact = 2 / 60 * 3 * (model.x ** 2).sum().item()
    ids = torch.zeros(1, 4, dtype=torch.long)
    traces = hutchinson_traces(model, {"proj": model.proj.weight}, ids, probes=400, progress=False)
    assert traces["proj"] == pytest.approx(exact, rel=0.1)
    assert all(p.requires_grad for p in model.parameters())   # restored


def test_allocation_is_the_exact_optimum_under_the_budget():
    torch.manual_seed(1)
    choices = (2, 3, 4, 8)
    sizes = {f"l{i}": int(s) for i, s in enumerate(torch.randint(50, 400, (6,)))}
    cost = {n: sorted(torch.rand(4).tolist(), reverse=True) for n in sizes}
    budget = 4.0
    bits = allocate_bits(cost, sizes, choices, budget)
    assert average_bits(bits, sizes) <= budget
    best = min(
        (sum(cost[n][choices.index(b)] for n, b in zip(sizes, combo)), combo)
        for combo in itertools.product(choices, repeat=len(sizes))
        if sum(b * sizes[n] for n, b in zip(sizes, combo)) <= budget * sum(sizes.values()) * (1 - 1e-3)
    )
    ours = sum(cost[n][choices.index(bits[n])] for n in sizes)
    assert ours <= best[0] + 1e-9


def _calib(n=4, length=32):
    return torch.randint(3, 300, (n, length), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("quantiser", ["gptq", "rtn"])
def test_plan_drives_the_quantising_stage(quantiser):
    model = tiny_model("llama")
    hawq = HAWQ(budget_bits=5.0, bit_choices=(4, 8), samples=2, probes=2)
    stage = GPTQ(bits=4) if quantiser == "gptq" else RTN(bits=4)
    result = run_transforms(model, [hawq, stage], calib=_calib(), progress=False)
    chosen = {name: facts["hawq_bits"] for name, facts in result.layers.items()}
    assert set(chosen.values()) == {4, 8}
    sizes = {}
    for name, bits in chosen.items():
        module = model.get_submodule(name)
        assert module.weight_spec.bits == bits
        sizes[name] = module.in_features * module.out_features
    assert average_bits(chosen, sizes) <= 5.0
    assert all(facts["hessian_trace"] > 0 for facts in result.layers.values())


def test_bad_settings():
    with pytest.raises(RecipeError, match="below the smallest choice"):
        build_transform("HAWQ", {"budget_bits": 1.5})
    with pytest.raises(RecipeError, match="bits must be an integer from 2 to 8"):
        build_transform("HAWQ", {"bit_choices": [4, 9]})
    model = tiny_model("llama")
    with pytest.raises(QuantConfigError, match="HAWQ allocated bits for granularity channel.*same format"):
        run_transforms(model, [HAWQ(budget_bits=5.0, bit_choices=(4, 8), samples=1, probes=1),
                               GPTQ(bits=4, granularity="group", group_size=32)], calib=_calib(), progress=False)


def test_cli_budget_bits(tmp_path, capsys):
    import json

    from slimformer.cli import main
    from slimformer.models.tiny import tiny_tokenizer

    model, tok = tiny_model("llama", seed=1), tiny_tokenizer()
    src = tmp_path / "tiny"
    model.save_pretrained(src)
    tok.save_pretrained(src)
    text = tmp_path / "calib.txt"
    text.write_text("def f(x):\n    return x * 2\n" * 400)
    common = ["--quiet", "compress", str(src), "--calib", str(text), "--calib-samples", "4", "--seqlen", "32"]
    out = tmp_path / "hawq"
    assert main([*common, "--recipe", "hawq-4.5", "--budget-bits", "5.5", "--out", str(out)]) == 0
    saved = json.loads((out / "slimformer.json").read_text())
    assert "--budget-bits 5.5" in saved["recipe"]
    sizes = {n: m["in_features"] * m["out_features"] for n, m in saved["modules"].items()}
    bits = {n: m["weight"]["bits"] for n, m in saved["modules"].items()}
    assert 4.5 < average_bits(bits, sizes) <= 5.5
    capsys.readouterr()
    assert main([*common, "--recipe", "rtn-w4", "--budget-bits", "4", "--out", str(tmp_path / "x")]) == 2
    assert "needs a recipe with a HAWQ stage" in capsys.readouterr().err
    assert main([*common, "--recipe", "hawq-4.5", "--budget-bits", "1", "--out", str(tmp_path / "y")]) == 2
    assert "below the smallest choice" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
