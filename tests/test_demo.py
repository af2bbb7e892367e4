"""The demo picture: a photograph with noise, a convolution's and the push-pull layers' responses, SNR."""

import math

import pytest
import torch

pytest.importorskip("skimage", reason="the demo extra (scikit-image) is not installed")
pytest.importorskip("matplotlib", reason="the demo extra (matplotlib) is not installed")

from pushpull_ext import demo  # noqa: E402


def test_snr_definition():
    clean = torch.zeros(1, 1, 4, 4)
    clean[..., 0] = 2.0  # the edge pixels respond 2
    edges = clean > 0
    noisy = clean + torch.tensor([1.0, -1.0]).repeat(8).view(1, 1, 4, 4)  # a change of energy 1 everywhere
    assert demo.snr_db(clean, noisy, edges) == pytest.approx(10 * math.log10(4))
    assert demo.snr_db(clean, clean, edges) == math.inf


def test_demo_writes_the_picture_and_push_pull_has_the_better_snr(tmp_path, capsys):
    out = tmp_path / "demo.png"
    result = demo.main(["--out", str(out), "--size", "64"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size < 500_000
    assert "wrote" in capsys.readouterr().out
    for name, values in result["snr"].items():
        noisy = values[1:]  # the first level is the clean image
        assert all(a > b for a, b in zip(noisy, noisy[1:])), (name, values)  # more noise, lower SNR
    plain, push_pull = result["snr"]["convolution"], result["snr"]["push-pull 2020 (scale 2)"]
    assert all(pp > conv for pp, conv in zip(push_pull[1:], plain[1:])), (push_pull, plain)


def test_demo_refuses_a_tiny_size(tmp_path):
    with pytest.raises(SystemExit):
        demo.main(["--out", str(tmp_path / "x.png"), "--size", "4"])
