"""Modality-only training on real photographs: patches of scikit-learn's two bundled sample photos.

`sklearn.datasets.load_sample_images()` ships two 427x640 RGB photos (a temple in China and a
flower) with scikit-learn, no download. They are average-pooled by `--downsample`, cut into
non-overlapping `--image-size` square RGB patches, and split at random into training and
held-out patches (no pixel is shared between the two). Each patch is one image: a grid of latent
tokens, each token a `--token-size` square of RGB pixels (8x8 patches, 2x2 tokens: a 4x4 grid of
12-d latents). The model sees no text at all: `model(images)` with a floating (b, h, w, c)
tensor is modality-only training of modality 0 (the flow loss plus the small cross-entropy of each
row's begin, shape and EOS tokens).

It has learned when, against the same network before training (same initial weights):
- the held-out flow loss (velocity MSE on held-out patches at t = 0.1 ... 0.9, fixed noise) falls;
- generated patches (`model.generate_modality_only`) come closer to held-out real patches:
  a Fréchet distance between Gaussians fitted in the real patches' leading principal components
  (lower is better; the same score for as many real training patches is the floor), and the
  cross-validated accuracy of a classifier (RBF SVM) telling generated from real patches
  (0.5: indistinguishable, 1: always told apart).

Outputs in `--output` (rank 0): samples.png (real held-out, generated, and untrained-model
patches), loss.png, metrics.json.

    python examples/train_images_modality_only.py              # defaults: minutes on 2 cores
    torchrun --nproc_per_node=2 examples/train_images_modality_only.py
    python examples/train_images_modality_only.py --smoke      # seconds, tiny settings (tests)
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling helpers, also under torchrun

from common import (Distributed, default_device, launch_and_report, parse_with_smoke, plot_loss_curve,  # noqa: E402
                    run_facts, train, training_parser, write_json)
from transfusion_pytorch import Transfusion  # noqa: E402

SMOKE = dict(steps = 30, batch_size = 16, dim = 32, depth = 1, heads = 2, samples = 48, modality_steps = 2, warmup = 5,
             eval_patches = 48)


def parse_args(argv = None) -> argparse.Namespace:
    p = training_parser(__doc__, steps = 1500, batch_size = 64, batch_unit = 'patches', lr = 1e-3)
    p.add_argument('--downsample', type = int, default = 2, help = 'average-pool the photos by this factor first')
    p.add_argument('--image-size', type = int, default = 8, help = 'patch side in (pooled) pixels: one training image')
    p.add_argument('--token-size', type = int, default = 2, help = 'pixels per latent token side')
    p.add_argument('--held-out', type = float, default = 0.2, help = 'fraction of patches held out')
    p.add_argument('--samples', type = int, default = 400, help = 'generated patches for the metrics')
    p.add_argument('--eval-patches', type = int, default = None, help = 'held-out patches for the flow loss (default: all)')
    p.add_argument('--modality-steps', type = int, default = 16, help = 'midpoint ODE steps per generated patch')
    args = parse_with_smoke(p, argv, Path('outputs/photo_patches'), SMOKE)
    if args.image_size % args.token_size:
        p.error('--image-size must be a multiple of --token-size')
    return args


# data

def load_patches(downsample: int, size: int, held_out: float, seed: int) -> tuple[Tensor, Tensor]:
    """Train and held-out patches Float['n 3 size size'] in [-1, 1] from both sample photos:
    non-overlapping tiles, split at random with a fixed seed (the same split for every run)."""
    from sklearn.datasets import load_sample_images
    tiles = []
    for photo in load_sample_images().images:                               # (427, 640, 3) uint8
        pixels = torch.tensor(photo, dtype = torch.float32).permute(2, 0, 1)[None] / 127.5 - 1
        pooled = F.avg_pool2d(pixels, downsample)                           # (1, 3, H, W)
        grid = F.unfold(pooled, size, stride = size)                        # (1, 3 * size * size, tiles)
        tiles.append(grid[0].T.reshape(-1, 3, size, size))
    tiles = torch.cat(tiles)
    order = torch.randperm(len(tiles), generator = torch.Generator().manual_seed(seed))
    count = int(round(held_out * len(tiles)))
    return tiles[order[count:]], tiles[order[:count]]


def to_latents(images: Tensor, token: int) -> Tensor:
    """Float['n 3 s s'] -> Float['n g g (token token 3)'], g = s / token, tokens in raster order."""
    n, c, s, _ = images.shape
    g = s // token
    blocks = images.reshape(n, c, g, token, g, token).permute(0, 2, 4, 3, 5, 1)   # n g g ty tx c
    return blocks.reshape(n, g, g, token * token * c)


def from_latents(latents: Tensor, token: int) -> Tensor:
    """Inverse of to_latents: Float['n g g (token token 3)'] -> Float['n 3 s s']."""
    n, g, _, _ = latents.shape
    blocks = latents.reshape(n, g, g, token, token, 3).permute(0, 5, 1, 3, 2, 4)   # n c g ty g tx
    return blocks.reshape(n, 3, g * token, g * token)


class Batches:
    """Batch `step` depends only on (seed, step): every torchrun worker draws the same global
    batch and takes its own slice. Random horizontal flips (in pixel space) double the data."""

    def __init__(self, images: Tensor, token: int, batch_size: int, seed: int, env: Distributed):
        if batch_size % env.world_size:
            raise ValueError(f'--batch-size {batch_size} must be divisible by the number of workers {env.world_size}')
        self.images, self.token, self.batch_size, self.seed, self.env = images, token, batch_size, seed, env

    def __call__(self, step: int) -> Tensor:
        """This worker's Float['b g g c'] latents."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        index = torch.randint(0, len(self.images), (self.batch_size,), generator = generator)
        flip = torch.rand(self.batch_size, generator = generator) < 0.5
        share = self.batch_size // self.env.world_size
        mine = slice(self.env.rank * share, (self.env.rank + 1) * share)
        images = self.images[index[mine]]
        images = torch.where(flip[mine, None, None, None], images.flip(-1), images)
        return to_latents(images, self.token).to(default_device())


def build_model(args: argparse.Namespace) -> Transfusion:
    grid = args.image_size // args.token_size
    return Transfusion(
        num_text_tokens = 1,                                 # no text: the vocabulary is unused
        dim_latent = 3 * args.token_size ** 2,
        modality_default_shape = (grid, grid),
        add_modality_shape_tokens = False,                   # every patch has the same grid
        transformer = dict(dim = args.dim, depth = args.depth, heads = args.heads, dim_head = args.dim // args.heads),
        time_sampling = 'logit_normal',
        time_conditioning = 'adaptive',
    )


# judging

@torch.no_grad()
def held_out_flow_loss(model: Transfusion, latents: Tensor, seed: int, times: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9),
                       batch: int = 16) -> float:
    """Velocity MSE (`Transfusion.predict`) of every held-out latent at every t in `times`, with
    noise from a fixed seed: the training objective without its sampling noise. Small batches:
    a packed batch attends over all its tokens, so the cost grows with the batch size."""
    generator = torch.Generator().manual_seed(seed)
    total, count = 0., 0
    for start in range(0, len(latents), batch):
        x = latents[start:start + batch].repeat_interleave(len(times), 0)   # instance k*T + j at times[j]
        t = torch.tensor(times).repeat(len(x) // len(times))
        noise = list(torch.randn(x.shape, generator = generator).unbind(0))
        prediction = model.predict(x.to(model.device), times = t, noise = noise)
        errors = [(v - target).float().pow(2).mean() for v, target in zip(prediction.velocities, prediction.targets)]
        total += float(torch.stack(errors).sum())
        count += len(errors)
    return total / count


@torch.no_grad()
def generate(model: Transfusion, count: int, steps: int, seed: int, token: int, batch: int = 200) -> Tensor:
    """Float['count 3 s s'] patches in [-1, 1] from `generate_modality_only` (row r seeded seed + r)."""
    images = []
    for start in range(0, count, batch):
        latents = model.generate_modality_only(min(batch, count - start), modality_steps = steps, seed = seed + start)
        images.append(from_latents(latents.float().cpu(), token))
    return torch.cat(images).clamp(-1, 1)


def frechet_pca(reference: Tensor, a: Tensor, b: Tensor, components: int = 16) -> float:
    """Fréchet distance between Gaussians fitted to a and b in the leading principal components
    of `reference` (the training patches): an FID-like score without a pretrained network."""
    import numpy as np
    from scipy import linalg
    from sklearn.decomposition import PCA
    pca = PCA(n_components = components, random_state = 0).fit(reference.flatten(1).numpy())
    x, y = pca.transform(a.flatten(1).numpy()), pca.transform(b.flatten(1).numpy())
    cov_x, cov_y = np.cov(x, rowvar = False), np.cov(y, rowvar = False)
    root = linalg.sqrtm(cov_x @ cov_y).real
    return float(((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(cov_x + cov_y - 2 * root))


def classifier_accuracy(real: Tensor, other: Tensor, seed: int) -> float:
    """5-fold cross-validated accuracy of an RBF support-vector classifier telling `other` from
    `real` (equal numbers of each): 0.5 when they are indistinguishable, 1 when always told apart.
    (A 1-nearest-neighbour test was tried first: it scores over-dispersed samples near 0.5, because
    their nearest neighbours are real patches.)"""
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.svm import SVC
    n = min(len(real), len(other))
    points = torch.cat((real[:n], other[:n])).flatten(1).numpy()
    labels = torch.arange(2).repeat_interleave(n).numpy()
    folds = StratifiedKFold(5, shuffle = True, random_state = seed)
    return float(cross_val_score(SVC(gamma = 'scale'), points, labels, cv = folds).mean())


def save_samples(panels: dict[str, Tensor], path: Path, columns: int = 12, rows: int = 4) -> None:
    """One mosaic per panel (real, generated, untrained), patches in [-1, 1] shown as RGB."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(panels), 1, figsize = (columns * 0.45, len(panels) * rows * 0.5 + 0.3), dpi = 100)
    for axis, (title, images) in zip(axes, panels.items()):
        images = images[:columns * rows]
        images = F.pad((images + 1) / 2, (1, 1, 1, 1), value = 1.)              # white gaps between patches
        _, c, h, w = images.shape
        mosaic = images.reshape(-1, columns, c, h, w).permute(0, 3, 1, 4, 2).reshape(-1, columns * w, c)
        axis.imshow(mosaic.clamp(0, 1).numpy(), interpolation = 'nearest')
        axis.set_title(title, fontsize = 9)
        axis.axis('off')
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def evaluate(model: Transfusion, untrained: Transfusion, args: argparse.Namespace, train_images: Tensor,
             test_images: Tensor) -> dict:
    """Trained against untrained (the same initial weights), on held-out real patches."""
    model.eval()
    token, test_latents = args.token_size, to_latents(test_images[:args.eval_patches], args.token_size)
    start = time.perf_counter()
    generated = generate(model, args.samples, args.modality_steps, args.seed, token)
    generation_seconds = time.perf_counter() - start
    baseline = generate(untrained, args.samples, args.modality_steps, args.seed, token)
    floor = train_images[torch.randperm(len(train_images), generator = torch.Generator().manual_seed(args.seed))[:args.samples]]
    save_samples({'real held-out patches': test_images, 'generated (trained)': generated,
                  'generated (same network before training)': baseline}, args.output / 'samples.png')
    trained_loss = held_out_flow_loss(model, test_latents, args.seed)
    untrained_loss = held_out_flow_loss(untrained, test_latents, args.seed)
    return dict(
        flow_loss_heldout = trained_loss, flow_loss_heldout_untrained = untrained_loss,
        flow_loss_ratio = trained_loss / untrained_loss,
        frechet_pca_generated = frechet_pca(train_images, test_images, generated),
        frechet_pca_untrained = frechet_pca(train_images, test_images, baseline),
        frechet_pca_real = frechet_pca(train_images, test_images, floor),          # the floor at this sample size
        classifier_accuracy_generated = classifier_accuracy(test_images, generated, args.seed),
        classifier_accuracy_untrained = classifier_accuracy(test_images, baseline, args.seed),
        classifier_accuracy_real = classifier_accuracy(test_images, floor, args.seed),
        generated_patches = len(generated), scored_held_out_patches = len(test_latents), generation_seconds = generation_seconds,
    )


def run(args: argparse.Namespace, env: Distributed | None = None) -> dict | None:
    """Train, then (rank 0) evaluate and write the outputs; returns the metrics on rank 0."""
    env = env or Distributed()
    torch.manual_seed(args.seed)                      # the same initial weights on every worker
    train_images, test_images = load_patches(args.downsample, args.image_size, args.held_out, seed = 0)
    model = build_model(args).to(default_device())
    untrained = copy.deepcopy(model)
    torch.manual_seed(args.seed * 1000 + env.rank)    # per-worker flow noise and times; seeds never share a stream
    batches = Batches(train_images, args.token_size, args.batch_size, args.seed, env)
    losses, seconds = train(model, batches, steps = args.steps, lr = args.lr, env = env, warmup = args.warmup)
    if not env.is_main:
        return None
    args.output.mkdir(parents = True, exist_ok = True)
    plot_loss_curve(losses, args.output / 'loss.png', 'Transfusion, modality-only on photo patches (training loss)')
    metrics = dict(
        **evaluate(model, untrained, args, train_images, test_images),
        **run_facts(args, env, model, seconds, losses),
        train_patches = len(train_images), held_out_patches = len(test_images),
        config = dict(downsample = args.downsample, image_size = args.image_size, token_size = args.token_size,
                      dim = args.dim, depth = args.depth, modality_steps = args.modality_steps, seed = args.seed),
    )
    write_json(metrics, args.output / 'metrics.json')
    return metrics


def main(argv = None) -> None:
    args = parse_args(argv)
    launch_and_report(args, run, lambda metrics: (
        f"held-out flow loss {metrics['flow_loss_heldout']:.4f} (untrained {metrics['flow_loss_heldout_untrained']:.4f}); "
        f"Fréchet PCA distance {metrics['frechet_pca_generated']:.2f} (untrained {metrics['frechet_pca_untrained']:.2f}, "
        f"real floor {metrics['frechet_pca_real']:.2f}); real-vs-generated classifier accuracy "
        f"{metrics['classifier_accuracy_generated']:.3f} (untrained {metrics['classifier_accuracy_untrained']:.3f}, "
        f"real vs real {metrics['classifier_accuracy_real']:.3f}); "
        f"training {metrics['training_seconds']:.0f} s for {metrics['steps']} steps; outputs in {args.output}"))


if __name__ == '__main__':
    main()
