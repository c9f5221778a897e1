"""TFLite Micro (issue 29): the arena measured in its interpreter, the MCU budget, the C array."""

import re

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip(
    "litert_torch", reason="the litert extra is not installed (pip install modelpress[litert])"
)
pytest.importorskip("tflite_micro", reason="the tflm extra is not installed (pip install modelpress[tflm])")

import modelpress as mp
from modelpress.deploy.tflm import (
    McuBudget,
    TflmSession,
    _interpreter,
    check_budget,
    export_tflm,
    measure_arena,
    write_c_array,
)


def _tiny():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10),
    ).eval()
    gen = torch.Generator().manual_seed(1)
    calib = [(torch.rand(16, 1, 16, 16, generator=gen),) for _ in range(2)]
    return model, mp.compress(model, [mp.StaticInt8Config(observer="minmax")], calib), calib


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    _, small, calib = _tiny()
    folder = tmp_path_factory.mktemp("tflm")
    art = export_tflm(small, (calib[0][0][:1],), folder / "tiny.tflite", data=calib, budget="64KB/16KB")
    return small, calib, art


def test_budget_parsing():
    assert McuBudget.parse("256KB/64KB") == McuBudget(262144, 65536)
    assert McuBudget.parse("1MB / 320kb") == McuBudget(1024**2, 320 * 1024)
    assert McuBudget.parse("200000/50000") == McuBudget(200000, 50000)
    for bad in ("256KB", "256GB/64KB", "lots/64KB", "0/64KB"):
        with pytest.raises(mp.ExportError, match="budget|not a size"):
            McuBudget.parse(bad)


def test_export_measures_arena_and_writes_the_c_array(exported):
    _, _, art = exported
    data = art.path.read_bytes()
    assert art.flash_bytes == len(data) < 64 * 1024
    assert 0 < art.arena_bytes <= 16 * 1024 and art.arena_bytes % 16 == 0
    # the measured arena allocates; a quarter of it does not
    assert _interpreter(data, art.arena_bytes)[0] is not None
    assert _interpreter(data, art.arena_bytes // 4)[0] is None
    assert measure_arena(art.path) == art.arena_bytes
    source, header = art.source.read_text(), art.header.read_text()
    assert art.source.name == "tiny_model.cc" and art.header.name == "tiny_model.h"
    assert "alignas(16) const unsigned char tiny_model[] = {" in source
    assert f"const unsigned int tiny_model_len = {len(data)};" in source
    assert '#include "tiny_model.h"' in source
    assert "extern const unsigned char tiny_model[];" in header
    assert f"constexpr unsigned int tiny_model_arena_size = {art.arena_bytes};" in header
    body = source.split("= {", 1)[1].split("};", 1)[0]
    assert bytes(int(b, 16) for b in re.findall(r"0x([0-9a-f]{2})", body)) == data


def test_runs_in_tflm_like_the_int8_torch_model(exported):
    small, calib, art = exported
    session = TflmSession(art.path, arena_bytes=art.arena_bytes)
    assert session.runtime == "tflite-micro" and session.input_shapes == [(1, 1, 16, 16)]
    samples = [(calib[1][0][i : i + 1],) for i in range(16)]
    report = mp.check_parity(small, session, samples, min_cosine=0.995)
    assert report.passed and report.outputs[0].top1_agreement >= 0.9
    x = np.asarray(calib[1][0][:1])
    from modelpress.deploy.litert import open_litert

    litert = open_litert(art.path).run([x])[0]  # the same file in LiteRT: the same int8 kernels' maths
    np.testing.assert_allclose(session.run([x])[0], litert, atol=2 * session._outputs[0]["quantization"][0])


def test_budget_that_does_not_fit_names_it_and_writes_nothing(tmp_path):
    _, small, calib = _tiny()
    with pytest.raises(
        mp.ExportError, match=r"RAM: the tensor arena needs .* over the 1\.0 KB budget"
    ) as err:
        export_tflm(small, (calib[0][0][:1],), tmp_path / "m.tflite", data=calib, budget="64KB/1KB")
    assert "flash: the model" not in str(err.value)  # the flash budget holds
    assert not list(tmp_path.iterdir())
    with pytest.raises(mp.ExportError, match=r"flash: the model is .* \(\d+ bytes\) over the 1\.0 KB budget"):
        check_budget(5000, 100, "1KB/1KB")
    check_budget(1024, 1024, McuBudget(1024, 1024))  # exactly at the budget fits


def test_float_model_and_bad_paths(tmp_path):
    model, small, calib = _tiny()
    x = calib[0][0][:1]
    with pytest.raises(mp.ExportError, match="no statically quantized layer"):
        export_tflm(model, (x,), tmp_path / "f.tflite", data=calib)
    with pytest.raises(mp.ExportError, match=r"must end in \.tflite"):
        export_tflm(small, (x,), tmp_path / "f.bin", data=calib)
    with pytest.raises(mp.ExportError, match=r"must end in \.cc"):
        write_c_array(b"\x00", tmp_path / "model.txt")
    (tmp_path / "m.cc").write_text("keep")
    with pytest.raises(mp.ExportError, match="already exists"):
        write_c_array(b"\x00", tmp_path / "m.cc")
    assert (tmp_path / "m.cc").read_text() == "keep" and not (tmp_path / "m.h").exists()


def test_hybrid_model_is_refused(tmp_path):
    """A LayerNorm stays float in litert-torch's int8 graph: TFLM would need float kernels."""

    class Normed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(16, 16)
            self.norm = nn.LayerNorm(16)
            self.head = nn.Linear(16, 4)

        def forward(self, x):
            return self.head(self.norm(self.fc(x)))

    torch.manual_seed(0)
    model = Normed().eval()
    calib = [(torch.randn(8, 16),)]
    small = mp.compress(model, [mp.StaticInt8Config(observer="minmax")], calib)
    with pytest.raises(mp.ExportError, match="full-integer model, but these ops compute in float"):
        export_tflm(small, (calib[0][0][:1],), tmp_path / "n.tflite", data=calib)
    assert not list(tmp_path.iterdir())
