"""A picture of push-pull inhibition: `python -m pushpull_ext.demo [--out PATH] [--size N]`.

A real photograph (scikit-image's `camera`, shipped inside the scikit-image wheel) gets Gaussian noise
of increasing strength. An oriented edge filter (the x-derivative of a Gaussian, as the papers' figures
use an edge-selective push kernel) is applied as a plain convolution and as the push kernel of the
push-pull layers, and the PNG shows the responses with a signal-to-noise figure per noise level.

Responses are compared after rectification (what a following ReLU passes on; the push-pull output
is negative where inhibition wins). The signal-to-noise ratio of an operator R at noise level s is

    SNR = 10 log10( mean over edge pixels E of R(clean)^2 / mean over all pixels of (R(noisy) - R(clean))^2 )

the energy of its response to the clean image's edges against the energy of the change that the
noise causes in its response. E is the same for every operator: the 10 % of pixels where the plain
convolution responds most to the clean image.

Needs the `demo` extra: pip install "pushpull_ext[demo]" (scikit-image, matplotlib).
"""

from __future__ import annotations

import argparse
import io
import math

import torch
import torch.nn.functional as F

from .functional import push_pull_conv2d

NOISE_LEVELS = (0.0, 0.1, 0.2, 0.3)  # standard deviations, for intensities in [0, 1]
EDGE_FRACTION = 0.1
KERNEL_SIZE, KERNEL_SIGMA = 5, 1.0


def photograph(size: int) -> torch.Tensor:
    """scikit-image's `camera` (512 x 512, grey), area-resized to size x size, intensities in [0, 1]."""
    from skimage import data

    image = torch.tensor(data.camera(), dtype=torch.float32)[None, None] / 255
    return F.interpolate(image, size=(size, size), mode="area")


def edge_kernel(size: int = KERNEL_SIZE, sigma: float = KERNEL_SIGMA) -> torch.Tensor:
    """[1, 1, size, size]: -x * exp(-(x^2 + y^2) / 2 sigma^2), responding to dark-to-bright vertical edges;
    unit L1 norm."""
    r = torch.arange(size, dtype=torch.float32) - size // 2
    y, x = torch.meshgrid(r, r, indexing="ij")
    kernel = x * torch.exp(-(x**2 + y**2) / (2 * sigma**2))
    return (kernel / kernel.abs().sum())[None, None]


def operators(kernel: torch.Tensor) -> dict:
    """name -> rectified response of an image [1, 1, H, W] to `kernel`."""
    pad = kernel.shape[-1] // 2
    return {
        "convolution": lambda x: F.relu(F.conv2d(x, kernel, padding=pad)),
        "push-pull 2020 (scale 2)": lambda x: F.relu(push_pull_conv2d(x, kernel, padding=pad, pull="upsample")),
        "push-pull 2024 (invert, PP5)": lambda x: F.relu(
            push_pull_conv2d(x, kernel, padding=pad, pull="invert", avg_kernel=5)
        ),
    }


def snr_db(clean: torch.Tensor, noisy: torch.Tensor, edges: torch.Tensor) -> float:
    """The module docstring's SNR: edge response energy on the clean image over the noise-caused change."""
    signal = clean[edges].square().mean()
    noise = (noisy - clean).square().mean()
    return math.inf if noise == 0 else 10 * math.log10(signal / noise)


def run(size: int = 256, noise_levels=NOISE_LEVELS, seed: int = 0) -> dict:
    """{"noisy": [images], "responses": {name: [responses]}, "snr": {name: [dB]}}, one entry per noise level."""
    clean = photograph(size)
    ops = operators(edge_kernel())
    clean_responses = {name: op(clean) for name, op in ops.items()}
    plain = clean_responses["convolution"]
    edges = plain >= plain.flatten().quantile(1 - EDGE_FRACTION)
    generator = torch.Generator().manual_seed(seed)
    result = {"noise": list(noise_levels), "noisy": [], "responses": {n: [] for n in ops}, "snr": {n: [] for n in ops}}
    for level in noise_levels:
        noisy = clean + level * torch.randn(clean.shape, generator=generator)
        result["noisy"].append(noisy)
        for name, op in ops.items():
            response = op(noisy)
            result["responses"][name].append(response)
            result["snr"][name].append(snr_db(clean_responses[name], response, edges))
    return result


def _png_bytes(figure) -> bytes:
    """The figure as a 256-colour palette PNG (grey pictures and a few line colours: no visible loss, small file)."""
    from PIL import Image

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    buffer.seek(0)
    palette = Image.open(buffer).convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=256)
    out = io.BytesIO()
    palette.save(out, format="PNG", optimize=True)
    return out.getvalue()


def plot(result: dict, path: str, dpi: int = 72) -> None:
    """Rows: noise levels; columns: the noisy photograph and each operator's response (grey scale fixed per
    operator by its clean-image response), then the SNR of every operator against the noise level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["responses"])
    rows, cols = len(result["noise"]), 1 + len(names)
    figure = plt.figure(figsize=(2.6 * cols, 2.6 * rows + 3.2), dpi=dpi)
    grid = figure.add_gridspec(rows + 1, cols, height_ratios=[1] * rows + [1.2])
    for row, level in enumerate(result["noise"]):
        _image_panel(figure.add_subplot(grid[row, 0]), result["noisy"][row], f"noise sd {level:g}", vmax=1.0)
        for col, name in enumerate(names, start=1):
            vmax = result["responses"][name][0].flatten().quantile(0.995).item()
            title = f"{name}\nSNR {result['snr'][name][row]:.1f} dB" if level else f"{name}\n(clean)"
            _image_panel(figure.add_subplot(grid[row, col]), result["responses"][name][row], title, vmax=vmax)
    _snr_panel(figure.add_subplot(grid[rows, :]), result)
    figure.tight_layout()
    with open(path, "wb") as file:
        file.write(_png_bytes(figure))
    plt.close(figure)


def _image_panel(axes, image: torch.Tensor, title: str, vmax: float) -> None:
    axes.imshow(image[0, 0].numpy(), cmap="gray", vmin=0, vmax=vmax, interpolation="nearest")
    axes.set_title(title, fontsize=8)
    axes.axis("off")


def _snr_panel(axes, result: dict) -> None:
    noisy_levels = [i for i, level in enumerate(result["noise"]) if level > 0]
    for name, values in result["snr"].items():
        axes.plot([result["noise"][i] for i in noisy_levels], [values[i] for i in noisy_levels], marker="o", label=name)
    axes.set_xlabel("noise standard deviation (intensities in [0, 1])")
    axes.set_ylabel("SNR (dB)")
    axes.set_title("edge response energy / energy of the change caused by noise (rectified responses)", fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m pushpull_ext.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="pushpull_demo.png", help="PNG to write (default: %(default)s)")
    parser.add_argument(
        "--size", type=int, default=256, help="photograph resized to SIZE x SIZE (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    if args.size < 16:
        parser.error(f"--size must be at least 16, got {args.size}")
    result = run(args.size)
    plot(result, args.out)
    for name, values in result["snr"].items():
        print(f"{name:30s} " + "  ".join(f"sd {lv:g}: {v:5.1f} dB" for lv, v in zip(result["noise"], values) if lv))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
