"""Distillation: the losses, feature matching, checkpoints that resume, divergence, bad input, recipes."""

from __future__ import annotations

import copy
import logging
import re

import pytest
import torch
import torch.nn.functional as F
import zoo
from torch import nn

import modelpress as mp
from modelpress.errors import DataError, RecipeError
from modelpress.techniques.distill import DistillConfig, layer_map, train

LOGGER = "modelpress.techniques.distill"


def _mlp(width: int, classes: int = 4, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, classes)).eval()


def _batches(count: int, seed: int = 1, rows: int = 16) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, 8, generator=gen) for _ in range(count)]


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.fc(x))


class Deep(nn.Module):
    """Linear in, a stack of residual blocks, Linear out: hidden states (N, width) per block."""

    def __init__(self, width: int, depth: int, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Linear(8, width)
        self.blocks = nn.Sequential(*[Block(width) for _ in range(depth)])
        self.out = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.blocks(self.inp(x)))


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a: nn.Module | dict[str, torch.Tensor], b: nn.Module) -> bool:
    left = a if isinstance(a, dict) else a.state_dict()
    right = b.state_dict()
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


def test_kl_at_a_temperature_mixes_with_cross_entropy_on_labels():
    teacher, student = _mlp(32), _mlp(8, seed=1)
    x = _batches(1)[0]
    labels = torch.randint(0, 4, (16,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        s, t = student(x), teacher(x)
    kl = F.kl_div(F.log_softmax(s / 2, -1), F.log_softmax(t / 2, -1), log_target=True, reduction="batchmean")
    want = 0.7 * 4 * kl + 0.3 * F.cross_entropy(s, labels)  # (1 - alpha) T^2 KL + alpha CE
    config = DistillConfig(temperature=2.0, alpha=0.3, steps=1, lr=1e-9)
    got = train(student, teacher, [(x, labels)], config)  # the first step's loss, before its update
    assert got == pytest.approx(float(want), rel=1e-5)
    task = train(_mlp(8, seed=1), None, [(x, labels)], DistillConfig(loss="task", steps=1, lr=1e-9))
    assert task == pytest.approx(float(F.cross_entropy(s, labels)), rel=1e-5)


def test_labels_asked_for_but_absent_and_mismatched_outputs_are_named():
    teacher, student = _mlp(32), _mlp(8, seed=1)
    before = _state(student)
    with pytest.raises(DataError, match=r"alpha=0.5 trains on hard labels.*\(inputs, labels\) pair.*Tensor"):
        mp.distill(student, teacher, _batches(2), DistillConfig(alpha=0.5, steps=2))
    with pytest.raises(DataError, match=r"loss: task trains on hard labels"):
        mp.distill(student, teacher, _batches(2), DistillConfig(loss="task", steps=2))
    for loss in ("kl", "mse"):
        with pytest.raises(
            RecipeError, match=r"student's outputs \[\(16, 5\)\] do not match the teacher's \[\(16, 4\)\]"
        ):
            mp.distill(_mlp(8, classes=5), teacher, _batches(2), DistillConfig(loss=loss, steps=2))
    with pytest.raises(RecipeError, match="same object"):
        mp.distill(student, student, _batches(2))
    assert _same(before, student)


class Returns(nn.Module):
    """The same computation returning its result as a tensor, a tuple (logits, hidden) or a dict of keys."""

    def __init__(self, kind: str | tuple[str, ...]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.kind = nn.Linear(8, 16), nn.Linear(16, 4), kind

    def forward(self, x: torch.Tensor) -> object:
        hidden = torch.relu(self.a(x))
        logits = self.b(hidden)
        if isinstance(self.kind, tuple):
            return dict(zip(self.kind, (logits, hidden), strict=True))
        return (logits, hidden) if self.kind == "tuple" else logits


def test_outputs_of_another_structure_are_named():
    data, config = _batches(2), DistillConfig(loss="mse", steps=2)
    with pytest.raises(
        RecipeError,
        match=r"student's outputs \[\(16, 4\)\] do not match the teacher's \[\(16, 4\), \(16, 16\)\]",
    ):
        mp.distill(Returns("tensor"), Returns("tuple"), data, config)
    with pytest.raises(
        RecipeError, match=r"student returns \['logits', 'hidden'\] but the teacher \['logits', 'h'\]"
    ):
        mp.distill(Returns(("logits", "hidden")), Returns(("logits", "h")), data, config)
    mp.distill(
        Returns(("logits", "hidden")), Returns(("logits", "h")), data, DistillConfig(steps=2)
    )  # kl: logits
    mp.distill(Returns(("logits", "hidden")), Returns("tuple"), data, config)  # the same results, by position


def test_labels_asked_for_in_a_recipe_but_absent_are_named_and_nothing_is_lost():
    model = _mlp(32)
    before = _state(model)
    with pytest.raises(
        DataError,
        match=r"structured: recover trains on hard labels .*first data item is a Tensor.*recover: \{loss: kl\}",
    ):
        mp.compress(
            model, [mp.StructuredPruningConfig(ratio=0.5, recover={"loss": "task", "steps": 2})], _batches(2)
        )
    with pytest.raises(DataError, match=r"distill: loss: task trains on hard labels"):
        mp.compress(
            model, [mp.StructuredPruningConfig(ratio=0.5), DistillConfig(loss="task", steps=2)], _batches(2)
        )
    with pytest.raises(DataError, match=r"lowrank: alpha=0.5 trains on hard labels"):
        mp.compress(model, [mp.LowRankConfig(rank=2, recover={"alpha": 0.5, "steps": 2})], _batches(2))
    assert _same(before, model)


def test_bad_configs_say_what_to_change():
    for fields, message in [
        ({"loss": "ce"}, "loss='ce' is unknown"),
        ({"temperature": 0}, "temperature=0 must be positive"),
        ({"alpha": 1.5}, r"alpha=1.5 must be in \[0, 1\]"),
        ({"loss": "task", "alpha": 0.5}, "Drop alpha"),
        ({"features": "cosine"}, "features='cosine'"),
        ({"steps": 0}, "steps=0"),
        ({"lr": 2.0}, "lr=2.0"),
        ({"patience": 0}, "patience=0"),
    ]:
        with pytest.raises(RecipeError, match=message):
            DistillConfig(**fields)


def test_feature_matching_projects_the_students_width_and_drops_the_projections(caplog):
    teacher, student = Deep(32, 4, seed=0), Deep(16, 2, seed=1)
    keys = set(student.state_dict())
    assert layer_map(2, 4) == [1, 3] and layer_map(3, 6) == [1, 3, 5] and layer_map(4, 2) == [0, 0, 1, 1]
    config = DistillConfig(loss="mse", features="mse", steps=60, lr=1e-2, every=20)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        mp.distill(student, teacher, _batches(8), config)
    assert "blocks.0->blocks.1, blocks.1->blocks.3" in caplog.text
    assert "2 learned projections" in caplog.text
    features = [float(v) for v in re.findall(r"features ([0-9.e+-]+)\)", caplog.text)]
    assert len(features) == 4 and features[-1] < 0.5 * features[0]
    assert set(student.state_dict()) == keys  # the projections are gone
    assert all(p.grad is None for p in student.parameters())


def test_resuming_from_a_checkpoint_gives_the_uninterrupted_result(tmp_path, caplog):
    teacher, original = _mlp(32), _mlp(8, seed=1)
    data = _batches(8)
    config = DistillConfig(steps=6, lr=1e-2, every=2)
    whole = copy.deepcopy(original)
    mp.distill(
        whole, teacher, data, DistillConfig(**{**config.__dict__, "checkpoint_dir": str(tmp_path / "a")})
    )

    class Interrupted:  # the data source fails once at item 5, as a killed run would stop there
        armed = True

        def __iter__(self):
            for index, item in enumerate(data):
                if index == 5 and self.armed:
                    self.armed = False
                    raise KeyboardInterrupt
                yield item

    folder = str(tmp_path / "b")
    resumable = DistillConfig(**{**config.__dict__, "checkpoint_dir": folder})
    source = Interrupted()
    with pytest.raises(KeyboardInterrupt):
        mp.distill(copy.deepcopy(original), teacher, source, resumable)
    assert (tmp_path / "b" / "distill.pt").exists()
    again = copy.deepcopy(original)  # a new process: the model as it was before training
    with caplog.at_level(logging.INFO, logger=LOGGER):
        mp.distill(again, teacher, source, resumable)
    assert "at step 4" in caplog.text
    assert _same(whole, again)
    assert not _same(original, again)
    # a finished run's rerun trains nothing; another model's checkpoint is refused
    done = copy.deepcopy(original)
    mp.distill(done, teacher, data, resumable)
    assert _same(whole, done)
    with pytest.raises(RecipeError, match="saved from another model"):
        mp.distill(_mlp(16, seed=1), teacher, data, resumable)


def test_a_diverging_loss_puts_back_the_last_good_weights():
    teacher, original = _mlp(32), _mlp(8, seed=1)
    data = _batches(8)
    data[5] = data[5] * 1e30  # finite inputs whose outputs overflow: the loss turns NaN at step 6
    config = DistillConfig(loss="mse", steps=8, lr=1e-2, every=2)
    student = copy.deepcopy(original)
    with pytest.raises(
        RecipeError, match=r"diverged: the loss became nan at step 6 .*weights of step 4 .*Lower lr"
    ):
        mp.distill(student, teacher, data, config)
    four = copy.deepcopy(original)
    mp.distill(four, teacher, data[:4], DistillConfig(loss="mse", steps=4, lr=1e-2, every=2))
    assert _same(four, student)
    assert all(torch.isfinite(p).all() for p in student.parameters())
    # in a recipe: the user's model is untouched (compress trains a copy); inplace, it keeps the last good weights
    user = copy.deepcopy(original)
    recipe = [mp.StructuredPruningConfig(ratio=0.5), config]
    with pytest.raises(RecipeError, match=r"diverged: the loss became nan at step 6 .*weights of step 4"):
        mp.compress(user, recipe, data)
    assert _same(original, user)
    with pytest.raises(RecipeError, match="diverged"):
        mp.compress(user, recipe, data, inplace=True)
    assert user[0].out_features == 4 and all(torch.isfinite(p).all() for p in user.parameters())
    bad = _batches(2)
    bad[0][0, 0] = float("nan")
    with pytest.raises(DataError, match="before any update"):
        mp.distill(copy.deepcopy(original), teacher, bad, config)


def test_early_stopping_keeps_the_best_weights(caplog):
    teacher, original = _mlp(32), _mlp(8, seed=1)
    student = copy.deepcopy(original)
    scores = iter([1.0, 0.5, 0.4, 0.3, 0.2])  # worse at every check after the start

    with caplog.at_level(logging.INFO, logger=LOGGER):
        mp.distill(
            student,
            teacher,
            _batches(8),
            DistillConfig(steps=40, lr=1e-2, every=2, patience=2),
            metric=lambda model: next(scores),
        )
    assert "kept the weights of step 0" in caplog.text
    assert _same(original, student)
    # on held-out distillation loss (the first 4 batches) training improves, so it runs to the end
    held = copy.deepcopy(original)
    mp.distill(held, teacher, _batches(12), DistillConfig(steps=16, lr=1e-2, every=4, patience=2))
    assert not _same(original, held)


def test_attention_maps_of_hugging_face_models_and_a_clear_error_elsewhere(caplog):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation="eager",
    )
    teacher = zoo.BertEncoderWrapper(BertModel(config, add_pooling_layer=False)).eval()
    ids = [torch.randint(1, 100, (2, 12), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    data = [(x, torch.ones_like(x)) for x in ids]
    student = mp.compress(teacher, [mp.DepthPruningConfig(blocks=2, importance="last")], data)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        mp.distill(student, teacher, data, DistillConfig(loss="mse", attention=True, steps=3, lr=1e-3))
    assert re.search(r"attention [0-9.e+-]+", caplog.text)
    with pytest.raises(RecipeError, match="attention probabilities.*attn_implementation='eager'"):
        mp.distill(Deep(16, 2, seed=1), Deep(32, 4, seed=0), _batches(2), DistillConfig(attention=True))
    with pytest.raises(RecipeError, match="no stack of repeated blocks"):
        mp.distill(_mlp(8), _mlp(32), _batches(2), DistillConfig(features="mse"))


def test_a_recipe_distills_from_the_model_before_it():
    teacher = Deep(16, 4, seed=0)
    before = _state(teacher)
    data = _batches(8)
    cut = mp.DepthPruningConfig(blocks=2, importance="last")
    plain = mp.compress(teacher, [cut], data)
    tuned = mp.compress(teacher, [cut, DistillConfig(loss="mse", features="mse", steps=40, lr=1e-2)], data)
    assert _same(before, teacher)  # the teacher was the user's model, untouched
    held = _batches(4, seed=9)
    with torch.no_grad():
        err = [sum(float((m(x) - teacher(x)).pow(2).mean()) for x in held) for m in (plain, tuned)]
    assert err[1] < 0.5 * err[0]
    # inplace: the teacher is a copy made before the recipe
    inplace = copy.deepcopy(teacher)
    mp.compress(inplace, [cut, DistillConfig(loss="mse", steps=40, lr=1e-2)], data, inplace=True)
    assert len(inplace.blocks) == 2
    # alone on an unchanged model it changes nothing: refused
    with pytest.raises(RecipeError, match="changed none of the model's"):
        mp.compress(teacher, [DistillConfig(loss="mse", steps=2)], data)
    with pytest.raises(RecipeError, match=r"modelpress.distill\(student, teacher, data, config\)"):
        mp.REGISTRY["distill"][1](teacher, DistillConfig(), data)


def test_recover_is_a_nested_distill_config_and_the_old_form_is_refused(tmp_path):
    config = mp.StructuredPruningConfig(ratio=0.5, recover={"loss": "kl", "steps": 200, "lr": 1e-4})
    assert config.recover == DistillConfig(loss="kl", steps=200, lr=1e-4)
    path = tmp_path / "recipe.yaml"
    path.write_text(mp.dump_recipe([config, mp.DepthPruningConfig(blocks=1), mp.SparsityConfig()]))
    assert mp.load_recipe(path) == [config, mp.DepthPruningConfig(blocks=1), mp.SparsityConfig()]
    path.write_text("- {type: structured, recover: distill, recover_distill: kl, recover_steps: 100}\n")
    with pytest.raises(
        RecipeError, match=r"write `recover: \{loss: kl, steps: 100\}` instead of `recover: distill"
    ):
        mp.load_recipe(path)
    path.write_text("- {type: depth, blocks: 1, recover: task, recover_epochs: 3, recover_lr: 0.001}\n")
    with pytest.raises(RecipeError, match=r"`recover: \{loss: task, epochs: 3, lr: 0.001\}`"):
        mp.load_recipe(path)
    with pytest.raises(RecipeError, match=r"recover has no field\(s\) \['step'\]"):
        mp.DepthPruningConfig(recover={"step": 3})


def _blobs(z: torch.Tensor) -> torch.Tensor:
    """The synthetic distribution: latents (N, 16, 1, 1) -> (N, 3, 16, 16) images in [-0.9, 0.9] of a coloured
    Gaussian blob whose place (latents 0, 1) and colour (latents 2-4) the latent sets."""
    grid = torch.linspace(-1, 1, 16)
    cx, cy = torch.tanh(z[:, 0, 0, 0]) * 0.6, torch.tanh(z[:, 1, 0, 0]) * 0.6
    blob = torch.exp(
        -((grid[None, None, :] - cx[:, None, None]) ** 2 + (grid[None, :, None] - cy[:, None, None]) ** 2)
        / 0.1
    )
    colour = torch.sigmoid(z[:, 2:5, 0, 0])
    return blob[:, None] * colour[:, :, None, None] * 1.8 - 0.9


def test_a_gan_generator_pruned_by_half_and_distilled_stays_close_to_the_original(tmp_path):
    """A DCGAN-style generator fitted to a synthetic distribution (seconds), half its channels removed, then
    distilled from the original on latents alone; the distilled generator exports with parity."""
    torch.manual_seed(0)
    generator = zoo.DCGANGenerator(nz=16, ngf=16)
    gen = torch.Generator().manual_seed(3)
    optimizer = torch.optim.Adam(generator.parameters(), lr=3e-3)
    generator.train()
    for _ in range(150):
        z = torch.randn(64, 16, 1, 1, generator=gen)
        loss = F.mse_loss(generator(z), _blobs(z))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    generator.eval()
    before = _state(generator)
    held = torch.randn(256, 16, 1, 1, generator=gen)
    with torch.no_grad():
        fit = float(F.mse_loss(generator(held), _blobs(held)))
    assert fit < 0.02, fit  # it learned the distribution (measured 0.009)

    latents = [(torch.randn(32, 16, 1, 1, generator=gen),) for _ in range(16)]
    cut = mp.StructuredPruningConfig(ratio=0.5)
    plain = mp.compress(generator, [cut], latents)
    recipe = [cut, DistillConfig(loss="mse", steps=100, lr=3e-3, every=50)]
    distilled = mp.compress(generator, recipe, latents)
    assert _same(before, generator)  # the teacher, the user's model, is untouched

    def distance(model: nn.Module) -> float:  # relative MSE of the images to the original's
        with torch.no_grad():
            want = generator(held)
            return float((model(held) - want).pow(2).mean() / want.pow(2).mean())

    kept = sum(p.numel() for p in distilled.parameters()) / sum(p.numel() for p in generator.parameters())
    far, near = distance(plain), distance(distilled)
    print(
        f"GAN generator, {kept:.2f}x parameters: relative MSE to the teacher {far:.4f} pruned, {near:.4f} distilled"
    )
    assert kept < 0.4, kept
    # measured: 0.051 pruned alone, 0.0021 distilled. Bound: 1/100 of the images' energy (20 dB SNR)
    assert near < 0.01, (far, near)
    assert near < 0.1 * far, (far, near)

    path = mp.export_onnx(distilled, (held[:2],), tmp_path / "generator.onnx", dynamic=False)
    for runtime in mp.available_runtimes():
        session = mp.open_session(path, runtime=runtime)
        report = mp.check_parity(
            distilled, session, [(held[i : i + 2],) for i in range(0, 8, 2)], max_abs=1e-4
        )
        assert report.passed, (runtime, report)


@pytest.mark.parametrize("arch", ["gpt_decoder", "inverted_residual_cnn"])
def test_depth_then_distill_exports_with_parity(arch, tmp_path):
    """The contract for distill (which alone changes nothing, see test_contract.NOTHING_TO_DO): after depth
    pruning, on a transformer and a CNN of the zoo, the distilled model exports and runs with parity in every
    runtime. Lean on purpose: one export, no benchmark (test_chains.py takes a recipe through more steps)."""
    model, inputs = zoo.ZOO[arch]()
    before = _state(model)
    data = mp.parity_inputs(inputs, count=4, seed=1)
    loss = "kl" if arch == "gpt_decoder" else "mse"
    small = mp.compress(
        model, [mp.DepthPruningConfig(blocks=1), DistillConfig(loss=loss, steps=2, lr=1e-3)], data
    )
    assert _same(before, model)
    assert not _same(mp.compress(model, [mp.DepthPruningConfig(blocks=1)], data), small)  # distill trained
    path = mp.export_onnx(
        small, inputs, tmp_path / f"{arch}.onnx", dynamic=False
    )  # 1/3 of a dynamic one's time
    for runtime in mp.available_runtimes():
        report = mp.check_parity(
            small, mp.open_session(path, runtime=runtime), data[:-1]
        )  # of the fixed shape
        assert report.passed, (runtime, report)
