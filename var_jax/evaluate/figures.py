"""Pictures of a trained VAR: labelled class grids, coarse-to-fine strips, guidance sweeps and
tokenizer reconstructions, drawn with matplotlib (Agg, no display needed).

Each `*_figure` function takes images in [0, 1] (N, H, W, 3) and returns a matplotlib Figure;
`save_figure` writes it as a PNG and returns the rendered uint8 (H, W, 3) array, which is what
TensorBoard gets. `class_grid` is the one place where class-grid samples are drawn and tiled
(used by the VAR recipe, the demo and scripts/sample.py); `coarse_to_fine_images` decodes the
running feature map after each scale from sampled token maps.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np

from var_jax import quantizer


def tile(images_NxHxWx3, rows: int, value_range=(0.0, 1.0), pad: int = 2) -> np.ndarray:
    """N images tiled row-major into `rows` rows -> uint8 (H', W', 3), white gaps of `pad`."""
    lo, hi = value_range
    x = (np.asarray(images_NxHxWx3, np.float32) - lo) / (hi - lo)
    x = (np.clip(x, 0, 1) * 255).round().astype(np.uint8)
    n, h, w, c = x.shape
    cols = -(-n // rows)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        r, col = divmod(i, cols)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[top:top + h, left:left + w] = x[i]
    return grid


def class_grid(sample_fn: Callable[[np.ndarray, int], np.ndarray], classes: Sequence[int],
               per_class: int, batch_size: int = 250) -> tuple[np.ndarray, np.ndarray]:
    """Samples `per_class` images of each class and tiles them one class per row.

    `sample_fn(labels_B, batch_index)` returns images (B, H, W, 3) in [0, 1]; it is called on
    consecutive batches of at most `batch_size` labels (the batch index lets it derive a seed).
    Returns (images (N, H, W, 3) float32 in [0, 1], grid uint8 (H', W', 3)).
    """
    labels = np.repeat(np.asarray(classes, np.int32), per_class)
    parts = [np.asarray(sample_fn(labels[b:b + batch_size], i), np.float32)
             for i, b in enumerate(range(0, len(labels), batch_size))]
    images = np.concatenate(parts)
    return images, tile(images, rows=len(classes))


def coarse_to_fine_images(vqvae, token_maps, batch_size: int = 100) -> np.ndarray:
    """(B, K, H, W, 3) in [0, 1]: the image decoded from the running f_hat after scales 1..k.

    `token_maps` are the K sampled maps (B, pn, pn); f_hat after k scales is the partial sum
    sum_{i <= k} Phi_i(up(e(r_i))) of the quantizer, so the last column is the sample itself.
    """
    from flax import nnx

    maps = [np.asarray(m) for m in token_maps]

    @nnx.jit
    def decode_all(vq, maps_chunk):
        f_hat, out = None, []
        for k, idx in enumerate(maps_chunk):
            f_hat, _ = vq.next_scale_input(k, f_hat, quantizer.embed(idx, vq.codebook))
            out.append(vq.decode_features(f_hat))
        return out

    chunks = []
    for b in range(0, len(maps[0]), batch_size):
        decoded = decode_all(vqvae, [m[b:b + batch_size] for m in maps])
        chunks.append(np.stack([np.asarray(d) for d in decoded], axis=1))
    return np.clip(np.concatenate(chunks) * 0.5 + 0.5, 0, 1).astype(np.float32)


def _figure(grid_uint8: np.ndarray, *, row_labels: Sequence[str] = (),
            col_labels: Sequence[str] = (), title: str = "", scale: float = 3.0):
    """A figure showing `grid_uint8` at `scale` screen pixels per image pixel, with labels
    centred on its rows (left) and columns (top)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    h, w = grid_uint8.shape[:2]
    dpi = 100
    left = 1.3 if row_labels else 0.15
    top = (0.45 if col_labels else 0.1) + (0.35 if title else 0.0)
    img_w, img_h = w * scale / dpi, h * scale / dpi
    fig = Figure(figsize=(img_w + left + 0.15, img_h + top + 0.15), dpi=dpi)
    ax = fig.add_axes((left / (img_w + left + 0.15), 0.15 / (img_h + top + 0.15),
                       img_w / (img_w + left + 0.15), img_h / (img_h + top + 0.15)))
    ax.imshow(grid_uint8, interpolation="nearest", extent=(0, w, h, 0))
    ax.set_xticks([(i + 0.5) * w / len(col_labels) for i in range(len(col_labels))])
    ax.set_xticklabels(col_labels, fontsize=9)
    ax.xaxis.tick_top()
    ax.set_yticks([(i + 0.5) * h / len(row_labels) for i in range(len(row_labels))])
    ax.set_yticklabels(row_labels, fontsize=9)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=10, y=1 - 0.08 / (img_h + top + 0.15), va="top")
    return fig


def class_grid_figure(grid_uint8: np.ndarray, class_names: Sequence[str], title: str = ""):
    """The class grid (one class per row) with the class names on the rows."""
    return _figure(grid_uint8, row_labels=class_names, title=title)


def coarse_to_fine_figure(steps_BxKxHxWx3: np.ndarray, patch_nums: Sequence[int],
                          row_labels: Sequence[str] = (), title: str = ""):
    """One row per sample, one column per scale: the image after scales 1x1 .. nxn."""
    b, k = steps_BxKxHxWx3.shape[:2]
    grid = tile(steps_BxKxHxWx3.reshape(b * k, *steps_BxKxHxWx3.shape[2:]), rows=b)
    return _figure(grid, row_labels=row_labels, col_labels=[f"{p}x{p}" for p in patch_nums],
                   title=title)


def guidance_sweep_figure(images_by_cfg: dict[float, np.ndarray], per_class: int,
                          class_names: Sequence[str], title: str = ""):
    """The same seeds at each guidance scale: rows are classes, one block of `per_class`
    columns per cfg. `images_by_cfg[cfg]` is (num_classes * per_class, H, W, 3), class-major."""
    cfgs = list(images_by_cfg)
    n_classes = len(class_names)
    blocks = []
    for cfg in cfgs:
        x = np.asarray(images_by_cfg[cfg])[:n_classes * per_class]
        blocks.append(x.reshape(n_classes, per_class, *x.shape[1:]))
    rows = np.concatenate(blocks, axis=1)  # (classes, cfgs * per_class, H, W, 3)
    grid = tile(rows.reshape(-1, *rows.shape[2:]), rows=n_classes)
    return _figure(grid, row_labels=class_names, col_labels=[f"cfg {c:g}" for c in cfgs],
                   title=title)


def reconstruction_figure(real_Nx: np.ndarray, reconstructed_Nx: np.ndarray, title: str = ""):
    """Real images (top row) above their tokenizer reconstructions (bottom row)."""
    grid = tile(np.concatenate([real_Nx, reconstructed_Nx]), rows=2)
    return _figure(grid, row_labels=["real", "reconstructed"], title=title)


def save_figure(fig, path: str) -> np.ndarray:
    """Writes `fig` as a PNG at `path`; returns the rendered image uint8 (H, W, 3)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    rgb = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    fig.savefig(path, dpi=fig.dpi)
    return rgb
