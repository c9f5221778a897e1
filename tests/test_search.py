"""The constrained search across techniques (optimize/search.py): trials measured on exported artifacts,
failed and NaN evaluations recorded while the search goes on, unreachable constraints said plainly, the
chosen recipe's YAML reproducing the trial, a SIGKILLed search resuming, trials as Ray tasks, the CLI."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import modelpress as mp
from modelpress.cli import main
from modelpress.deploy.runtime import open_session
from modelpress.errors import RecipeError
from modelpress.optimize.search import (
    INTERRUPTED,
    Constraints,
    SearchConfig,
    SearchError,
    SearchSpace,
    TrialRecord,
    front_chart,
    metric_evaluator,
    parse_budget,
    search,
    summarize,
    violations,
)

# A space small enough for a handful of trials to cover it; every point compresses something.
SMALL = SearchSpace(
    structured=(0.0, 0.5),
    lowrank=(0.0,),
    sparsity=(0.0, 0.5),
    cluster=(0,),
    quantize=("int8", "static_int8"),
    keep=(0, 1),
)


def tiny() -> tuple[nn.Module, list[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]]:
    """A seeded MLP, three calibration batches, and the same batches labeled by the model itself."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(8, 16, generator=g) for _ in range(3)]
    with torch.no_grad():
        labeled = [(x, model(x).argmax(-1)) for x in data]
    return model, data, labeled


def fast(out: Path, **kw: object) -> SearchConfig:
    settings: dict[str, object] = {
        "out_dir": str(out),
        "runtime": "onnxruntime",
        "baseline_runtime": None,
        "trials": 4,
        "rounds": 2,
        "threads": 1,
        "space": SMALL,
        **kw,
    }
    return SearchConfig(**settings)  # type: ignore[arg-type]


class Flaky:
    """Accuracy, except that evaluation number `raise_at` raises and number `nan_at` returns NaN (number 0 is
    the fp32 baseline's)."""

    def __init__(self, items: list, raise_at: int, nan_at: int) -> None:
        self.inner = metric_evaluator(items)
        self.calls = 0
        self.raise_at, self.nan_at = raise_at, nan_at

    def __call__(self, target: object) -> float:
        self.calls += 1
        if self.calls - 1 == self.raise_at:
            raise RuntimeError("evaluation server down")
        if self.calls - 1 == self.nan_at:
            return math.nan
        return self.inner(target)


def test_search_front_recipe_failures_and_yaml_round_trip(tmp_path):
    model, data, labeled = tiny()
    out = tmp_path / "s"
    flaky = Flaky(labeled, raise_at=2, nan_at=3)
    result = mp.search(model, data, flaky, Constraints(max_drop=0.5), config=fast(out, trials=3))
    assert [t.number for t in result.trials] == [0, 1, 2]  # the search went on past the failure
    errors = {t.number: t.error for t in result.trials if t.state == "fail"}
    assert errors == {1: "RuntimeError: evaluation server down", 2: "ValueError: the evaluation returned nan"}
    assert result.met and result.chosen is not None and result.chosen in result.front
    assert all(t.state == "complete" and t.size_factor > 1 for t in result.front)
    saved = json.loads((out / "search.json").read_text())
    assert saved["chosen"] == result.chosen.number and saved["trials"][1]["error"] == errors[1]
    assert "<svg" in (out / "front.svg").read_text()
    # the chosen recipe's YAML reproduces the chosen trial's model: same outputs as its artifact
    recipe = mp.load_recipe(str(out / "recipe.yaml"))
    assert recipe == result.recipe
    again = mp.compress(model, recipe, data, allow_partial=True)
    session = open_session(result.chosen.artifact, "onnxruntime")
    with torch.no_grad():
        expected = again(data[0]).numpy()
    np.testing.assert_allclose(session.run([data[0].numpy()])[0], expected, atol=1e-4)


def test_a_recovery_on_labels_reads_labeled_items_and_calibration_their_inputs(tmp_path):
    """With `recover: {alpha: 0.5}` the data are (inputs, labels) pairs: the recovery trains on the labels,
    and the static int8 calibration, the sensitivity ranking, the example inputs and the points that recover
    nothing read the inputs alone (no trial fails on the pairs)."""
    model, _, labeled = tiny()
    recover = {"loss": "kl", "alpha": 0.5, "steps": 2, "lr": 1e-3}
    space = SearchSpace(
        structured=(0.0, 0.5), lowrank=(0.0,), sparsity=(0.0,), cluster=(0,), quantize=("static_int8",),
        keep=(0,), recover=recover,
    )  # fmt: skip
    result = mp.search(
        model, labeled, metric_evaluator(labeled), config=fast(tmp_path / "s", trials=2, space=space)
    )
    assert [t.state for t in result.trials] == ["complete", "complete"], [t.error for t in result.trials]
    assert {len(t.recipe) for t in result.trials} == {1, 2}  # static_int8 alone, and structured + static_int8
    # one recipe: the structured step's recovery takes the pairs, static_int8 their inputs
    steps = [{"type": "structured", "ratio": 0.5, "recover": recover}, {"type": "static_int8"}]
    small = mp.compress(model, mp.load_recipe(steps), labeled)
    assert small(labeled[0][0]).shape == (8, 4)
    # without a step on labels, pairs are not model inputs: the calibration says so
    with pytest.raises(mp.DataError, match="transform_fn to drop labels"):
        mp.compress(model, mp.load_recipe([{"type": "static_int8"}]), labeled)


def test_unreachable_constraints_say_so_and_return_the_closest_points(tmp_path):
    def rec(n: int, quality: float, size: float, speed: float) -> TrialRecord:
        return TrialRecord(n, {}, [{"type": "weight_only", "bits": 8}], "complete", quality, size, speed)

    trials = [rec(0, 0.99, 4.0, 1.1), rec(1, 0.90, 8.0, 2.0), rec(2, 0.98, 3.0, 1.0)]
    trials.append(TrialRecord(3, {}, [], "fail", error="RuntimeError: boom"))
    result = summarize(trials, Constraints(max_drop=0.01, size=100.0), baseline=0.99, higher_is_better=True)
    assert not result.met and result.closest and result.chosen is result.closest[0]
    assert "were not reached" in result.message and "size (best 8.00x)" in result.message
    assert {t.number for t in result.front} == {0, 1}  # trial 2 is beaten by trial 0 on all three
    # met one at a time, never together
    both = summarize(trials, Constraints(max_drop=0.01, size=6.0), baseline=0.99, higher_is_better=True)
    assert not both.met and "no trial met them all together" in both.message
    assert summarize(trials, Constraints(size=6.0), baseline=0.99, higher_is_better=True).chosen.number == 1
    assert "<circle" in front_chart(result)


def test_constraints_parse_and_bad_values():
    c = Constraints.parse("1%", ["size=8x", "latency = 3"])
    assert (c.max_drop, c.relative, c.size, c.latency) == (0.01, True, 8.0, 3.0)
    assert c.allowed_drop(0.99) == pytest.approx(0.0099)
    assert Constraints.parse("0.02").allowed_drop(0.5) == 0.02
    assert parse_budget("60m") == 3600 and parse_budget("90s") == 90 and parse_budget("2h") == 7200
    for bad in (lambda: Constraints.parse("lots"), lambda: Constraints.parse(None, ["speed=2x"])):
        with pytest.raises(RecipeError, match="not"):
            bad()
    with pytest.raises(RecipeError, match="positive factor"):
        Constraints(size=0)
    with pytest.raises(RecipeError, match="0 or more"):
        Constraints(max_drop=-0.1)
    with pytest.raises(RecipeError, match="never ends"):
        SearchConfig(trials=None)
    with pytest.raises(RecipeError, match="duration"):
        parse_budget("soon")


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:///{tmp}/no/such/dir/study.db",  # a folder that does not exist
        "postgresql://search:secret@127.0.0.1:1/study",  # nobody there (or no driver installed)
        "nosuchdb://study",  # not a database URL
    ],
)
def test_unreachable_storage_stops_before_any_work(tmp_path, url):
    model, data, labeled = tiny()
    config = fast(tmp_path / "s", storage=url.format(tmp=tmp_path))
    with pytest.raises(SearchError, match="Cannot open the study storage") as raised:
        search(model, data, metric_evaluator(labeled), config=config)
    assert "secret" not in str(raised.value) and "leave out --storage" in str(raised.value)
    assert not (tmp_path / "s" / "fp32.onnx").exists()


def test_unreachable_ray_cluster_is_refused_at_once(tmp_path):
    model, data, labeled = tiny()
    config = fast(tmp_path / "s", trials=1, ray_address="127.0.0.1:1")
    start = time.monotonic()
    with pytest.raises(SearchError, match="Cannot reach the Ray cluster"):
        search(model, data, metric_evaluator(labeled), config=config)
    assert time.monotonic() - start < 30  # not Ray's minutes of retries


KILLED = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from test_search import fast, tiny
    from modelpress.optimize.search import metric_evaluator, search

    model, data, labeled = tiny()
    accuracy = metric_evaluator(labeled)
    calls = []

    def evaluate(target):
        calls.append(1)
        if len(calls) == int(os.environ.get("HANG_AT", "-1")):
            Path(sys.argv[1], "in-flight").touch()
            time.sleep(600)  # killed here, mid-trial
        return accuracy(target)

    search(model, data, evaluate, config=fast(Path(sys.argv[1]), trials=int(sys.argv[2])))
    """
)


@pytest.mark.slow
def test_search_killed_mid_trial_resumes_losing_only_the_trial_in_flight(tmp_path):
    import optuna

    script = tmp_path / "killed.py"
    script.write_text(KILLED.format(tests=str(Path(__file__).parent)))
    out = tmp_path / "s"
    out.mkdir()
    env = {**os.environ, "HANG_AT": "3"}  # evaluation 1 is the fp32 baseline's, 2 trial 0's, 3 trial 1's
    proc = subprocess.Popen([sys.executable, str(script), str(out), "3"], env=env)
    deadline = time.monotonic() + 120
    while not (out / "in-flight").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert (out / "in-flight").exists(), "the search never reached its second trial"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    storage = f"sqlite:///{out / 'study.db'}"
    before = optuna.load_study(study_name="modelpress-search", storage=storage).trials
    assert [t.state.name for t in before] == ["COMPLETE", "RUNNING"]
    subprocess.run([sys.executable, str(script), str(out), "3"], check=True, env={**os.environ})
    after = optuna.load_study(study_name="modelpress-search", storage=storage).trials
    assert [t.state.name for t in after] == ["COMPLETE", "FAIL", "COMPLETE"]  # 3 finished, as asked
    assert after[0].values == before[0].values and after[0].params == before[0].params  # kept as it was
    saved = json.loads((out / "search.json").read_text())
    assert saved["trials"][1]["error"] == INTERRUPTED


@pytest.mark.slow
def test_search_runs_trials_as_ray_tasks(tmp_path):
    ray = pytest.importorskip("ray")
    model, data, labeled = tiny()
    ray.init(num_cpus=1, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        result = search(
            model, data, metric_evaluator(labeled), config=fast(tmp_path / "s", trials=1, ray_address="auto")
        )
    finally:
        ray.shutdown()
    assert [t.state for t in result.trials] == ["complete"]
    assert all(Path(t.artifact).exists() for t in result.trials)


@pytest.mark.slow
def test_cli_search_then_compress_reproduces_the_recipe(tiny_model_file, tmp_path):
    model = f"{tiny_model_file}:build"
    out = tmp_path / "search"
    args = ["search", model, "--data", f"{tiny_model_file}:calib", "--eval", f"{tiny_model_file}:labeled"]
    args += ["--max-drop", "100%", "--target", "latency=0.1x", "--trials", "1", "--runtime", "onnxruntime"]
    args += ["--baseline-runtime", "same", "--rounds", "2", "--threads", "1", "--out", str(out)]
    space = tmp_path / "space.yaml"
    space.write_text(
        "structured: [0.0]\nlowrank: [0.0]\nsparsity: [0.0]\ncluster: [0]\nquantize: [int8]\nkeep: [0]\n"
    )
    result = CliRunner().invoke(main, [*args, "--space", str(space)])
    assert result.exit_code == 0, result.output
    assert "Pareto front" in result.output and (out / "recipe.yaml").exists()
    assert "weight_only" in (out / "recipe.yaml").read_text()  # the only point of the space given
    again = tmp_path / "again"
    compress = ["compress", model, "--recipe", str(out / "recipe.yaml"), "--data", f"{tiny_model_file}:calib"]
    compress += ["--out", str(again), "--runtime", "onnxruntime", "--rounds", "2", "--batch", "1"]
    result = CliRunner().invoke(main, [*compress, "--allow-partial"])
    assert result.exit_code == 0, result.output
    assert (again / "recipe.yaml").read_text() == (out / "recipe.yaml").read_text()
    bad = CliRunner().invoke(main, [*args[:6], "--target", "speed=2x", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "size=8x" in bad.output


def test_a_bad_space_file_says_what_is_wrong(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("depths: [0.5]\n")
    bad = CliRunner().invoke(main, ["search", "m.py:build", "--eval", "m.py:e", "--space", str(space)])
    assert bad.exit_code != 0 and "'depths'" in bad.output and "search space fields" in bad.output
    space.write_text("quantize: [int3]\n")
    bad = CliRunner().invoke(main, ["search", "m.py:build", "--eval", "m.py:e", "--space", str(space)])
    assert bad.exit_code != 0 and "int3" in bad.output
    missing = CliRunner().invoke(main, ["search", "m.py:build", "--eval", "m.py:e", "--space", "nope.yaml"])
    assert missing.exit_code != 0 and "no such file" in missing.output


def test_a_point_seen_again_is_not_rerun_and_a_failing_storage_keeps_what_was_found(tmp_path, monkeypatch):
    import optuna
    import sqlalchemy.exc

    one = SearchSpace(
        structured=(0.0,), lowrank=(0.0,), sparsity=(0.0,), cluster=(0,), quantize=("int8",), keep=(0,)
    )
    real_tell, calls = optuna.study.Study.tell, []

    def tell(self, *args, **kwargs):  # the database goes away at the third trial's result
        calls.append(1)
        if len(calls) == 3:
            raise sqlalchemy.exc.OperationalError("UPDATE trials", {}, Exception("disk I/O error"))
        return real_tell(self, *args, **kwargs)

    monkeypatch.setattr(optuna.study.Study, "tell", tell)
    model, data, labeled = tiny()
    result = search(model, data, metric_evaluator(labeled), config=fast(tmp_path / "s", trials=5, space=one))
    assert [t.duplicate_of for t in result.trials] == [None, 0, 0]  # measured once
    assert result.trials[1].quality == result.trials[0].quality and result.trials[1].seconds == 0
    assert "storage failed" in result.stopped and result.stopped in result.message
    assert result.chosen is result.trials[0]  # kept, and written
    assert json.loads((tmp_path / "s" / "search.json").read_text())["stopped"] == result.stopped


def test_an_mcu_budget_is_a_constraint_on_flash_and_arena():
    c = Constraints.parse(None, ["mcu=256KB/64KB", "size=2x"])
    assert c.mcu == "256KB/64KB" and c.size == 2.0 and "microcontroller" in c.describe()
    with pytest.raises(RecipeError, match="mcu=lots"):
        Constraints(mcu="lots")

    def rec(n: int, flash: int | None, arena: int | None) -> TrialRecord:
        r = TrialRecord(n, {}, [{"type": "static_int8"}], "complete", 0.99, 4.0, 2.0)
        r.flash_bytes, r.arena_bytes = flash, arena
        return r

    kb = 1024
    trials = [
        rec(0, 300 * kb, 10 * kb),
        rec(1, 100 * kb, 80 * kb),
        rec(2, 100 * kb, 10 * kb),
        rec(3, None, None),
    ]
    result = summarize(trials, Constraints(mcu="256KB/64KB"), baseline=0.99, higher_is_better=True)
    assert result.met and result.chosen.number == 2
    assert [t.feasible for t in trials] == [False, False, True, False]
    assert len(violations(trials[0], Constraints(mcu="256KB/64KB"), 0.99)) == 4
    assert len(violations(trials[0], Constraints(), 0.99)) == 3


@pytest.mark.slow
def test_a_search_with_an_mcu_budget_measures_each_trial_in_tflite_micro(tmp_path):
    pytest.importorskip("tflite_micro", reason="the tflm extra is not installed")
    model, data, labeled = tiny()
    space = SearchSpace(
        structured=(0.0,), lowrank=(0.0,), sparsity=(0.0,), cluster=(0,), quantize=("static_int8",)
    )
    result = search(
        model,
        data,
        metric_evaluator(labeled, "accuracy"),
        Constraints(mcu="256KB/64KB"),
        config=fast(tmp_path / "s", trials=3, space=space),
    )
    # a point keeping its most sensitive layer in float cannot run on the microcontroller: infeasible, not failed
    measured = [t for t in result.trials if t.state == "complete"]
    assert measured and all((t.flash_bytes and t.arena_bytes) or "float" in t.mcu_error for t in measured)
    assert all(not t.feasible for t in measured if t.mcu_error)
    assert result.met and result.chosen.flash_bytes < 256 * 1024 and result.chosen.arena_bytes < 64 * 1024


# ------------------------------------------------------------------------------------------------ depth, embeddings

DEEP = SearchSpace(
    structured=(0.0, 0.5),
    lowrank=(0.0,),
    sparsity=(0.0,),
    cluster=(0,),
    quantize=("int8", "static_int8"),
    keep=(0,),
    depth=(1.0, 0.5),
    embeddings=(0, 16),
    recover={"loss": "mse", "steps": 2},
    depth_recover={"loss": "mse", "features": "mse", "steps": 3, "lr": 1e-3},
    options={"static_int8": {"smooth_alpha": 0.75}, "depth": {"importance": "last"}},
)


def tiny_bert(layers: int = 4) -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    """A seeded 4-layer BERT encoder (hidden 32, vocab 100) and four batches of (input_ids, attention_mask)."""
    import zoo
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation="eager",
    )
    model = zoo.BertEncoderWrapper(BertModel(config, add_pooling_layer=False)).eval()
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(1, 100, (4, 12), generator=g) for _ in range(4)]
    return model, [(x, torch.ones_like(x)) for x in ids]


def test_depth_and_embeddings_build_steps_in_order_and_round_trip_through_yaml(tmp_path):
    from modelpress.optimize.search import build_recipe, describe_recipe
    from modelpress.pipeline.recipe import dump_recipe, load_recipe

    point = {"depth": 0.5, "structured": 0.5, "lowrank": 0.0, "sparsity": 0.0, "cluster": 0, "embeddings": 16}
    steps = build_recipe({**point, "quantize": "static_int8", "keep": 0}, DEEP, [])
    assert [s["type"] for s in steps] == ["depth", "structured", "cluster", "static_int8"]
    assert steps[0] == {
        "type": "depth",
        "ratio": 0.5,
        "recover": {"loss": "mse", "features": "mse", "steps": 3, "lr": 1e-3},
        "importance": "last",
    }
    assert steps[1]["recover"] == {"loss": "mse", "steps": 2}  # the shared recovery, not the depth one
    assert steps[2] == {"type": "cluster", "values": 16, "codebook_bits": 8, "layers": ["embedding"]}
    assert steps[3] == {"type": "static_int8", "smooth_alpha": 0.75}
    assert describe_recipe(steps) == "depth keep 0.5 + structured 0.5 + embeddings 16 + static_int8"
    configs = load_recipe(steps)
    (tmp_path / "recipe.yaml").write_text(dump_recipe(configs))
    assert load_recipe(tmp_path / "recipe.yaml") == configs
    # off: depth 1.0 and embeddings 0 add no step; without depth_recover the depth step takes `recover`
    off = build_recipe({**point, "depth": 1.0, "embeddings": 0, "quantize": "int8", "keep": 0}, DEEP, [])
    assert [s["type"] for s in off] == ["structured", "weight_only"]
    shared = SearchSpace(depth=(1.0, 0.75), recover={"loss": "kl"})
    assert build_recipe({**point, "depth": 0.75, "quantize": "none", "keep": 0}, shared, [])[0] == {
        "type": "depth",
        "ratio": 0.25,
        "recover": {"loss": "kl"},
    }


def test_the_default_space_draws_and_resumes_as_before_depth_and_embeddings():
    space = SearchSpace()
    assert list(space.choices()) == ["structured", "lowrank", "sparsity", "cluster", "quantize", "keep"]
    assert not {"depth", "embeddings", "depth_recover", "options"} & set(space.key())
    assert next(iter(DEEP.choices())) == "depth" and "embeddings" in DEEP.choices()
    assert SearchSpace(depth=[1.0], embeddings=[0]).choices() == space.choices()  # lists, as YAML gives them
    for bad in ({"depth": (0.0,)}, {"depth": (1.5,)}, {"embeddings": (1,)}, {"options": {"prune": {}}}):
        with pytest.raises(RecipeError, match="search:"):
            SearchSpace(**bad)  # type: ignore[arg-type]


def test_seeds_start_with_the_strong_depth_point_where_the_space_has_depth():
    from modelpress.optimize.search import _seed_points

    seeds = _seed_points(DEEP, fragile=0)
    strong = {"depth": 0.5, "embeddings": 16, "quantize": "static_int8", "keep": 0}
    assert {k: seeds[0][k] for k in strong} == strong and seeds[0]["structured"] == 0.0
    assert seeds[1] == {**seeds[0], "structured": 0.5}
    assert seeds[2]["depth"] == 1.0 and seeds[2]["embeddings"] == 0  # then the points without depth
    # a space that always clusters the embeddings, offering a quarter of the channels too (the MiniLM benchmark's)
    minilm = SearchSpace(
        structured=(0.0, 0.25, 0.5), lowrank=(0.0,), sparsity=(0.0,), cluster=(0,), quantize=("static_int8",),
        keep=(0,), depth=[1.0, 0.5], embeddings=[16, 4],
    )  # fmt: skip
    assert [(p["depth"], p["structured"], p["embeddings"]) for p in _seed_points(minilm, fragile=0)] == [
        (0.5, 0.0, 16),
        (0.5, 0.5, 16),
        (0.5, 0.25, 16),
        (1.0, 0.0, 16),
        (1.0, 0.5, 16),
    ]
    # a space without depth seeds exactly as before
    assert _seed_points(SMALL, fragile=1) == [
        {
            "structured": 0.0,
            "lowrank": 0.0,
            "sparsity": 0.0,
            "cluster": 0,
            "quantize": "static_int8",
            "keep": 1,
        },
        {
            "structured": 0.5,
            "lowrank": 0.0,
            "sparsity": 0.0,
            "cluster": 0,
            "quantize": "static_int8",
            "keep": 1,
        },
    ]


def test_a_depth_step_seen_before_starts_from_the_kept_model(caplog):
    """A trial whose recipe opens with an earlier trial's depth step starts from that trial's model, and
    records the seconds that model took to build (`reused_s`: part of the recipe's cost, not spent again)."""
    import logging

    from modelpress.optimize.search import TrialContext, _compress
    from modelpress.pipeline.recipe import load_recipe

    model, data = tiny_bert()
    ctx = TrialContext(model, data[0], data, lambda t: 0.0, "onnxruntime", "", "onnxruntime", 1, 1, 1)
    depth = {"type": "depth", "ratio": 0.5, "importance": "last"}
    first, paid = _compress(ctx, load_recipe([depth, {"type": "weight_only", "bits": 8}]))
    ((student, built_s),) = ctx.students.values()
    assert len(student.bert.encoder.layer) == 2 and paid == 0.0 and built_s > 0.0
    with caplog.at_level(logging.INFO, logger="modelpress.optimize.search"):
        second, reused = _compress(
            ctx, load_recipe([depth, {"type": "weight_only", "bits": 4, "group_size": 32}])
        )
    assert "reusing the model" in caplog.text and list(ctx.students.values()) == [(student, built_s)]
    assert reused == built_s
    assert len(student.bert.encoder.layer) == 2 and second is not student and first is not student
    for ratio in (0.25, 0.75):  # other depth steps: each kept, the two most recent
        _compress(ctx, load_recipe([{**depth, "ratio": ratio}]))
    assert [len(m.bert.encoder.layer) for m, _ in ctx.students.values()] == [3, 1]
    # a cut that removes no block is no model to keep: the recipe runs whole
    none, _ = _compress(ctx, load_recipe([{**depth, "ratio": 0.1}, {"type": "weight_only", "bits": 8}]))
    assert len(none.bert.encoder.layer) == 4 and len(ctx.students) == 2


@pytest.mark.slow
def test_a_search_with_depth_and_clustered_embeddings_on_a_tiny_transformer(tmp_path):
    model, data = tiny_bert()

    def cosine(target: object) -> float:  # agreement with the fp32 model's hidden states
        predict = mp.as_predictor(target)
        with torch.no_grad():
            sims = [torch.cosine_similarity(predict(d).flatten(1), model(*d).flatten(1)).mean() for d in data]
        return float(torch.stack(sims).mean())

    space = SearchSpace(
        structured=(0.0,),
        lowrank=(0.0,),
        sparsity=(0.0,),
        cluster=(0,),
        quantize=("int8",),
        keep=(0,),
        depth=(1.0, 0.5),
        embeddings=(0, 16),
        depth_recover={"loss": "mse", "features": "mse", "steps": 3, "lr": 1e-3},
    )
    out = tmp_path / "s"
    result = search(model, data, cosine, Constraints(), config=fast(out, trials=2, space=space))
    deep, flat = result.trials
    assert deep.params["depth"] == 0.5 and deep.params["embeddings"] == 16  # the strong depth seed first
    assert [s["type"] for s in deep.recipe] == ["depth", "cluster", "weight_only"]
    assert deep.state == flat.state == "complete" and deep.size_factor > flat.size_factor
    assert deep.speedup is not None and deep.quality > 0.5
    # the trial's recipe.yaml reproduces its artifact
    recipe = mp.load_recipe(str(out / "trials" / "0000" / "recipe.yaml"))
    again = mp.compress(model, recipe, data, allow_partial=True)
    assert len(again.bert.encoder.layer) == 2
    with torch.no_grad():
        expected = again(*data[0]).numpy()
    session = open_session(deep.artifact, "onnxruntime")
    np.testing.assert_allclose(session.run([t.numpy() for t in data[0]])[0], expected, atol=1e-4)


def test_a_recovery_on_labels_without_labeled_data_is_refused_before_any_trial(tmp_path):
    model, data, _ = tiny()
    space = SearchSpace(
        structured=(0.5,), quantize=("int8",), keep=(0,), recover={"loss": "kl", "alpha": 0.5}
    )
    with pytest.raises(mp.DataError, match=r"search: .*\(inputs, labels\) items, but the first data item"):
        mp.search(model, data, metric_evaluator(data), config=fast(tmp_path / "s", space=space))
    assert not (tmp_path / "s" / "study.db").exists()
