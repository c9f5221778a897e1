"""Progressive compression (issue 28): steps up one technique's strength, rolls back the step that crosses
the floor, records the trajectory, runs as a recipe step and shows the trajectory in the report."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import modelpress as mp
from modelpress.optimize.progressive import progressive
from modelpress.report.html import progressive_chart
from modelpress.techniques.progressive import ProgressiveConfig


def _mlp() -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    gen = torch.Generator().manual_seed(1)
    return model, [torch.randn(8, 16, generator=gen) for _ in range(6)]


def _zeros(model: nn.Module) -> float:
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    if not weights:  # wrapped layers: read the dense weights back through the state dict
        weights = [v for k, v in model.state_dict().items() if k.endswith("weight") and v.ndim == 2]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


SPARSE = {"type": "sparsity", "method": "magnitude", "layers": ["linear"]}


def _qualities(model: nn.Module, data: list[torch.Tensor], **fields) -> list[float]:
    """Every step's quality, with a floor nothing misses (cosine is at least -1)."""
    _, trajectory = progressive(model, ProgressiveConfig(**fields, floor=-1.0), data)
    return [p.quality for p in trajectory.points]


def test_rolls_back_the_step_that_crosses_the_floor_and_records_every_step():
    model, data = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    steps = (0.2, 0.5, 0.8, 0.95)
    q = _qualities(model, data, technique=SPARSE, steps=steps)
    assert q == sorted(q, reverse=True)  # more zeros, further from the original
    floor = (q[1] + q[2]) / 2  # 0.5 meets it, 0.8 does not
    small, trajectory = progressive(
        model, ProgressiveConfig(technique=SPARSE, steps=steps, floor=floor), data
    )
    assert [p.strength for p in trajectory.points] == [0.2, 0.5, 0.8]  # 0.95 never tried
    assert [p.passed for p in trajectory.points] == [True, True, False]
    assert [p.quality for p in trajectory.points] == pytest.approx(q[:3])
    assert trajectory.chosen == 0.5 and trajectory.baseline == pytest.approx(1.0)
    assert _zeros(small) == pytest.approx(0.5, abs=0.02)  # the kept step's model, not the rolled-back one
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert "rolled back" in trajectory.format()


def test_max_drop_is_relative_to_the_original_on_the_users_metric():
    model, data = _mlp()
    calls = []

    def score(m: nn.Module) -> float:  # the user's metric: higher is better
        calls.append(m)
        with torch.no_grad():
            return 10.0 - float(sum((m(x) - model(x)).pow(2).mean() for x in data))

    config = ProgressiveConfig(
        technique={"type": "cluster", "values": 16}, steps=(64, 16, 4, 2), max_drop="1%"
    )
    _, trajectory = mp.progressive(model, config, data, evaluate=score)
    assert trajectory.metric == "score" and trajectory.baseline == 10.0
    assert trajectory.floor == pytest.approx(9.9)
    assert len(calls) == 1 + len(trajectory.points)  # the original, then once per step tried
    assert all(p.passed == (p.quality >= trajectory.floor) for p in trajectory.points)


def test_structured_steps_cumulatively_through_prune_gradually():
    model, data = _mlp()
    steps = (0.25, 0.5, 0.75)
    q = _qualities(model, data, technique="structured", steps=steps)
    floor = (q[0] + q[1]) / 2
    small, trajectory = progressive(
        model, ProgressiveConfig(technique="structured", steps=steps, floor=floor), data
    )
    assert [p.passed for p in trajectory.points] == [True, False]  # pruning stopped at 0.5
    assert [p.quality for p in trajectory.points] == pytest.approx(q[:2])
    assert trajectory.chosen == 0.25
    assert small[0].out_features == 24 and small[2].out_features == 24  # 32 less 25%


def test_a_first_step_below_the_floor_returns_the_original_and_fails_as_a_recipe_step():
    model, data = _mlp()
    config = ProgressiveConfig(technique=SPARSE, steps=(0.9,), floor=0.999)
    small, trajectory = progressive(model, config, data)
    assert trajectory.chosen is None and not trajectory.points[0].passed
    assert all(
        torch.equal(a, b)
        for a, b in zip(small.state_dict().values(), model.state_dict().values(), strict=True)
    )
    with pytest.raises(mp.RecipeError, match="weakest step"):
        mp.compress(model, [config], data)


def test_recipe_step_from_yaml_keeps_its_trajectory_on_the_model(tmp_path):
    model, data = _mlp()
    q = _qualities(model, data, technique=SPARSE, steps=(0.3, 0.6, 0.9))
    drop = f"{(1 - (q[0] + q[1]) / 2) * 100:.4f}%"  # 0.3 meets it, 0.6 does not
    path = tmp_path / "recipe.yaml"
    path.write_text(
        "- type: progressive\n"
        "  technique: {type: sparsity, method: magnitude, layers: [linear]}\n"
        f"  param: ratio\n  steps: [0.3, 0.6, 0.9]\n  max_drop: {drop}\n"
    )
    recipe = mp.load_recipe(path)
    path.write_text(mp.dump_recipe(recipe))
    assert mp.load_recipe(path) == recipe
    small = mp.compress(model, recipe, data)
    (trajectory,) = vars(small)["_modelpress_progressive"]
    assert trajectory["technique"] == "sparsity" and trajectory["floor"] == pytest.approx((q[0] + q[1]) / 2)
    assert trajectory["chosen"] == 0.3 and [p["strength"] for p in trajectory["points"]] == [0.3, 0.6]
    svg = progressive_chart(trajectory)
    assert svg.startswith("<svg") and "floor" in svg and "<polyline" in svg


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"technique": "sparsity"}, "exactly one quality floor"),
        ({"technique": "sparsity", "max_drop": "1%", "floor": 0.9}, "exactly one quality floor"),
        ({"technique": "sparsity", "max_drop": "ten"}, "not a number"),
        ({"technique": "sparsity", "max_drop": 1.5}, r"\[0, 1\)"),
        ({"technique": "static_int8", "max_drop": 0.01}, "no default strength"),
        ({"technique": "sparsity", "param": "damp", "max_drop": 0.01}, "no default steps"),
        ({"technique": "sparsity", "param": "nope", "steps": [1], "max_drop": 0.01}, "no field 'nope'"),
        ({"technique": "sparsity", "steps": [0.5, 1.5], "max_drop": 0.01}, "ratio"),
        ({"technique": "sparsity", "steps": [], "max_drop": 0.01}, "steps is empty"),
        ({"technique": "progressive", "max_drop": 0.01}, "no strength to step"),
    ],
)
def test_bad_configs_say_what_to_fix(fields, message):
    with pytest.raises(mp.RecipeError, match=message):
        ProgressiveConfig(**fields)
