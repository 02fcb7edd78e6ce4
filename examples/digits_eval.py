"""Judging a Transfusion trained on the 8x8 digits: generation by label, captioning of held-out
images, a classifier trained on real digits as the judge, and the figures.

Everything here uses the library's public sampling API (`Transfusion.sample_many`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from digits_data import PIXEL_MAX, from_latents, to_pixels


@torch.no_grad()
def generate_by_label(model, labels: list[int], per_label: int, *, patch: int, cfg_scale: float, steps: int,
                      seed: int, batch: int = 200) -> Tensor:
    """Float['labels per_label 8 8'] images in [-1, 1], prompted with each label as text.

    Each prompt is the label token; sampling is forced to open an image right after it and the
    length budget ends the sample with that image (BOS, label, begin, latents, end)."""
    grid = 8 // patch
    prompts = [torch.tensor([label]) for label in labels for _ in range(per_label)]
    max_length = 3 + grid * grid + 1
    images = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        samples = model.sample_many(
            chunk, max_length = max_length, force_modality_at_start = (0, (grid, grid)), modality_steps = steps,
            cfg_scale = cfg_scale, seed = seed + start, text_temperature = 0., show_progress = False,
        )
        images += [from_latents(_first_modality(s), patch) for s in samples]
    return torch.stack(images).reshape(len(labels), per_label, 8, 8).clamp(-1, 1)


def _first_modality(sample: list) -> Tensor:
    return next(item[1] for item in sample if isinstance(item, tuple))


@torch.no_grad()
def caption(model, latents: Tensor, batch: int = 200) -> list[int]:
    """The model's greedy label (text temperature 0) for each image Float['n g g c'], prompted
    with the image alone; -1 where the first token it emits is not a label (EOS). The budget is
    the prompt (BOS, begin, latents, end) plus exactly one token, so the sampler offers no new
    image there: the choice is among the text tokens and EOS."""
    max_length = 2 + latents[0].shape[0] * latents[0].shape[1] + 1 + 1
    predictions = []
    for start in range(0, len(latents), batch):
        prompts = [[(0, x)] for x in latents[start:start + batch]]
        samples = model.sample_many(prompts, max_length = max_length, text_temperature = 0., show_progress = False)
        for sample in samples:
            text = [item for item in sample if torch.is_tensor(item) and not item.is_floating_point()]
            token = int(text[0][0]) if text and text[0].numel() else -1
            predictions.append(token if 0 <= token <= 9 else -1)
    return predictions


@torch.no_grad()
def held_out_losses(model, latents: Tensor, labels: Tensor, seed: int, batch: int = 200,
                    times: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)) -> dict:
    """Low-variance held-out measures from `Transfusion.predict`:

    flow_loss: velocity MSE of `[label, image]` samples, each image at every t in `times` with
        fixed noise (the generation objective, without sampling noise);
    caption_loss: cross-entropy of the true label after the clean image (t = 1) in `[image, label]`;
    caption_accuracy_label_logits: argmax over the ten label logits at that position."""
    generator = torch.Generator().manual_seed(seed)
    flow_total, flow_count, caption_total, correct = 0., 0, 0., 0
    for start in range(0, len(labels), batch):
        x, y = latents[start:start + batch], labels[start:start + batch]
        t = torch.tensor(times).repeat(len(y))
        noise = [torch.randn(x.shape[1:], generator = generator) for _ in range(len(t))]
        prediction = model.predict([[y[i:i + 1], x[i]] for i in range(len(y)) for _ in times], times = t, noise = noise)
        errors = [(v - target).pow(2).mean() for v, target in zip(prediction.velocities, prediction.targets)]
        flow_total += float(torch.stack(errors).sum())
        flow_count += len(errors)
        prediction = model.predict([[x[i], y[i:i + 1]] for i in range(len(y))], times = torch.ones(len(y)))
        # a closed caption sample ends `... end label EOS`: the label is predicted at index -3
        logits = torch.stack([row[-3, :10] for row in prediction.logits])
        full = torch.stack([row[-3] for row in prediction.logits])
        caption_total += float(torch.nn.functional.cross_entropy(full.float(), y, reduction = 'sum'))
        correct += int((logits.argmax(-1) == y).sum())
    return dict(flow_loss = flow_total / flow_count, caption_loss = caption_total / len(labels),
                caption_accuracy_label_logits = correct / len(labels))


def fit_judge(train_images: Tensor, train_labels: Tensor, seed: int):
    """An RBF support-vector classifier on real training digits (pixels 0-16, as sklearn ships
    them); it judges which digit a generated image shows."""
    from sklearn.svm import SVC
    judge = SVC(gamma = 'scale', C = 10., random_state = seed)
    judge.fit(to_pixels(train_images).reshape(len(train_images), -1), train_labels.numpy())
    return judge


def judge_accuracy(judge, images: Tensor, labels: Tensor) -> float:
    predicted = judge.predict(to_pixels(images).reshape(len(images), -1))
    return float((predicted == labels.numpy()).mean())


def frechet_distance_pca(real: Tensor, generated: Tensor, components: int = 16) -> float:
    """Fréchet distance between Gaussians fitted to real and generated images in the space of
    the real images' leading principal components: an FID-like score (lower is better) that sees
    both quality and diversity, with no pretrained network."""
    from scipy import linalg
    from sklearn.decomposition import PCA
    real_flat = to_pixels(real).reshape(len(real), -1) / PIXEL_MAX
    generated_flat = to_pixels(generated).reshape(len(generated), -1) / PIXEL_MAX
    pca = PCA(n_components = components, random_state = 0).fit(real_flat)
    a, b = pca.transform(real_flat), pca.transform(generated_flat)
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar = False), np.cov(b, rowvar = False)
    root = linalg.sqrtm(cov_a @ cov_b).real
    return float(((mean_a - mean_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def save_grid(images: Tensor, path: Path, labels: list[int] | None = None, columns: int = 8) -> None:
    """One row per prompted label (written at the left), `columns` samples per row, white digits
    on black."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    rows = images.shape[0]
    columns = min(columns, images.shape[1])
    figure, axes = plt.subplots(rows, columns, figsize = (columns * 0.5 + 0.3, rows * 0.5), dpi = 80)
    axes = np.asarray(axes).reshape(rows, columns)
    for r in range(rows):
        for c in range(columns):
            axes[r, c].imshow(images[r, c].numpy(), cmap = 'gray', vmin = -1, vmax = 1, interpolation = 'nearest')
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
        axes[r, 0].set_ylabel(str(labels[r]) if labels is not None else '', rotation = 0, labelpad = 8, va = 'center')
    figure.subplots_adjust(0.3 / (columns * 0.5 + 0.3), 0, 1, 1, 0.05, 0.05)
    figure.savefig(path)
    plt.close(figure)
