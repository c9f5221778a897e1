import pytest
import torch

import modelpress as mp
from modelpress.loading import apply_state_dict, load_model, load_state_dict_file


def test_load_file_factory(tiny_model_file):
    model, inputs = load_model(f"{tiny_model_file}:build")
    assert isinstance(model, torch.nn.Module) and inputs[0].shape == (2, 3, 8, 8)


def test_load_module_factory():
    model, inputs = load_model("modelpress.demo:digits_cnn")
    assert model(*inputs).shape == (1, 10)


def test_state_dict_pt_and_safetensors(tiny_model_file, tmp_path):
    from safetensors.torch import save_file

    model, _ = load_model(f"{tiny_model_file}:build")
    with torch.no_grad():
        model.fc.bias.fill_(3.0)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    for name in ("w.pt", "w.safetensors"):
        loaded, _ = load_model(f"{tiny_model_file}:build", tmp_path / name)
        assert torch.all(loaded.fc.bias == 3.0)


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("nothing_here.py:build", "Model file 'nothing_here.py' does not exist"),
        ("{file}", "is not of the form 'path/to/file.py:factory'"),
        ("{file}:missing", "has no callable named 'missing'. Callables there: Tiny, broken, build"),
        ("{file}:broken", "Factory '.*:broken' raised RuntimeError: weights server unreachable"),
        ("{file}:wrong_inputs", r"fails on its example inputs \[\(2, 5, 8, 8\) float32\]"),
        ("{file}:no_pair", "returned Tiny; it must return a pair"),
        ("no_such_pkg_xyz.models:build", "Cannot import module 'no_such_pkg_xyz.models'"),
    ],
)
def test_bad_model_refs(tiny_model_file, ref, message):
    with pytest.raises(mp.ModelLoadError, match=message):
        load_model(ref.format(file=tiny_model_file))


def test_bad_checkpoints(tiny_model_file, tmp_path):
    ref = f"{tiny_model_file}:build"
    with pytest.raises(mp.ModelLoadError, match="Checkpoint '.*absent.pt' does not exist"):
        load_model(ref, tmp_path / "absent.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(mp.ModelLoadError, match="Cannot read checkpoint .*weights_only=True"):
        load_model(ref, tmp_path / "garbage.pt")
    model, _ = load_model(ref)
    state = model.state_dict()
    state["fc.weight"] = torch.zeros(5, 8)
    del state["conv.bias"]
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(
        mp.ModelLoadError,
        match=r"missing from the checkpoint: conv.bias; not in the model: extra.weight; "
        r"shape mismatch: fc.weight: checkpoint \(5, 8\) vs model \(4, 8\)",
    ):
        load_model(ref, tmp_path / "bad.pt")
    import argparse

    torch.save({"model": argparse.Namespace(x=1)}, tmp_path / "pickled.pt")  # arbitrary objects are refused
    with pytest.raises(mp.ModelLoadError, match="weights_only"):
        load_model(ref, tmp_path / "pickled.pt")


def test_shared_tensors_are_stored_once_and_come_back_on_load(tmp_path):
    from safetensors.torch import save_model

    from modelpress.pipeline.run import save_compressed, storable_state_dict

    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)
            self.head = torch.nn.Linear(4, 10, bias=False)
            self.head.weight = self.embed.weight  # tied, as in a language model
            self.register_buffer("table", torch.arange(12.0))
            self.register_buffer("tail", self.table[6:])  # part of another tensor's memory

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.embed(x)) + self.tail.sum()

    torch.manual_seed(0)
    model = Tied()
    tensors, aliases = storable_state_dict(model)
    assert aliases == {"head.weight": "embed.weight"} and "head.weight" not in tensors
    assert tensors["tail"].untyped_storage().data_ptr() != tensors["table"].untyped_storage().data_ptr()
    save_compressed(model, [mp.WeightOnlyConfig(bits=8)], tmp_path)
    assert mp.load_recipe(tmp_path / "recipe.yaml") == [mp.WeightOnlyConfig(bits=8)]
    fresh = Tied()
    state = load_state_dict_file(tmp_path / "model.compressed.safetensors")
    apply_state_dict(fresh, state, source="saved")  # strict: every name is there again
    x = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(fresh(x), model(x))
    # files written by safetensors' own save_model (which records dropped names the same way) load too
    save_model(model, str(tmp_path / "st.safetensors"))
    assert set(load_state_dict_file(tmp_path / "st.safetensors")) == set(model.state_dict())


def test_state_entries_that_are_not_tensors_are_refused():
    from modelpress.pipeline.run import storable_state_dict

    class Extra(torch.nn.Linear):
        def get_extra_state(self) -> dict[str, int]:
            return {"version": 2}

        def set_extra_state(self, state: dict[str, int]) -> None:
            del state

    with pytest.raises(mp.ExportError, match=r"State entry '_extra_state' is a dict, not a tensor"):
        storable_state_dict(Extra(2, 2))
