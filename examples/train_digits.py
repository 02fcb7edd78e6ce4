"""Train a Transfusion on scikit-learn's 8x8 handwritten digits, in both orders, and show it.

Each sample is a label (one text token) and an image (a grid of latent patches), as
`[label, image]` (generate an image from its label) or `[image, label]` (caption an image).
At the end, in the output folder (rank 0):

    samples.png      generated digits, one row per prompted label 0-9
    loss.png         the training loss curve
    metrics.json     label accuracy of generated images (judged by a classifier trained on real
                     digits, whose held-out accuracy is reported beside it), with and without
                     guidance; caption accuracy on held-out real images; a Fréchet distance in
                     PCA space; held-out flow and caption losses; training time and steps
    checkpoint/      `save_pretrained` output (`Transfusion.from_pretrained` loads it)

    python examples/train_digits.py                          # defaults: a few minutes on 2 cores
    torchrun --nproc_per_node=2 examples/train_digits.py     # DDP over gloo on CPU
    python examples/train_digits.py --smoke                  # seconds, tiny settings (CI)
    python examples/train_digits.py --causal-image-attention --no-noise-limit   # ablations
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling helpers, also under torchrun

from common import (Distributed, default_device, launch_and_report, plot_loss_curve, save_checkpoint,  # noqa: E402
                    parse_with_smoke, run_facts, train, training_parser, write_json)
from digits_data import Batches, load_splits, to_latents  # noqa: E402
from digits_eval import (caption, fit_judge, frechet_distance_pca, generate_by_label,  # noqa: E402
                         held_out_losses, judge_accuracy, save_grid)
from transfusion_pytorch import Transfusion  # noqa: E402

SMOKE = dict(steps = 30, batch_size = 16, dim = 32, depth = 1, per_label = 2, eval_images = 20, modality_steps = 2, warmup = 5)


def parse_args(argv = None) -> argparse.Namespace:
    p = training_parser(__doc__, steps = 1500, batch_size = 64, batch_unit = 'samples', lr = 1e-3)
    p.add_argument('--patch', type = int, default = 2, choices = (1, 2, 4), help = 'pixels per latent patch side')
    p.add_argument('--causal-image-attention', action = 'store_true',
                   help = 'ablation: attention inside an image causal (raster order) instead of bidirectional')
    p.add_argument('--noise-limit', action = argparse.BooleanOptionalAction, default = True,
                   help = 'noise limiting: an image followed by its label is noised only in the cleaner half of the path')
    p.add_argument('--condition-dropout', type = float, default = 0.1, help = 'for classifier-free guidance')
    p.add_argument('--cfg-scale', type = float, default = 3., help = 'classifier-free guidance at sampling')
    p.add_argument('--modality-steps', type = int, default = 16, help = 'midpoint ODE steps per image')
    p.add_argument('--per-label', type = int, default = 50, help = 'generated images per label for the metrics')
    p.add_argument('--eval-images', type = int, default = None, help = 'held-out images to caption (default: all)')
    return parse_with_smoke(p, argv, Path('outputs/digits'), SMOKE)


def build_model(args: argparse.Namespace) -> Transfusion:
    grid = 8 // args.patch
    return Transfusion(
        num_text_tokens = 10,                              # the labels 0-9
        dim_latent = args.patch * args.patch,
        modality_default_shape = (grid, grid),
        add_modality_shape_tokens = False,                 # every image has the same grid
        transformer = dict(dim = args.dim, depth = args.depth, heads = args.heads, dim_head = args.dim // args.heads),
        time_sampling = 'logit_normal',
        time_conditioning = 'adaptive',
        noise_limit_before_text = args.noise_limit,
        condition_dropout = args.condition_dropout,
        causal_modality_attention = args.causal_image_attention,
    )


def judge_generation(model: Transfusion, args: argparse.Namespace, judge, cfg_scale: float, real: torch.Tensor) -> dict:
    """Generate `per_label` images for each label 0-9 at this guidance scale; the judge's
    accuracy on them and their Fréchet distance to real held-out digits."""
    labels = list(range(10))
    start = time.perf_counter()
    generated = generate_by_label(model, labels, args.per_label, patch = args.patch, cfg_scale = cfg_scale,
                                  steps = args.modality_steps, seed = args.seed)
    flat = generated.reshape(-1, 8, 8)
    wanted = torch.tensor(labels).repeat_interleave(args.per_label)
    return dict(images = generated, label_accuracy = judge_accuracy(judge, flat, wanted),
                frechet_distance_pca = frechet_distance_pca(real, flat), seconds = time.perf_counter() - start)


def evaluate(model: Transfusion, args: argparse.Namespace, train_split, test_split) -> dict:
    """Generation judged by a classifier trained on real digits (with the chosen guidance and
    without any); captions of held-out digits; held-out losses."""
    model.eval()
    judge = fit_judge(train_split.images, train_split.labels, args.seed)
    guided = judge_generation(model, args, judge, args.cfg_scale, test_split.images)
    unguided = judge_generation(model, args, judge, 1., test_split.images)
    save_grid(guided['images'], args.output / 'samples.png', list(range(10)))

    test = test_split if args.eval_images is None else _head(test_split, args.eval_images)
    test_latents = to_latents(test.images, args.patch)
    start = time.perf_counter()
    captions = torch.tensor(caption(model, test_latents))
    caption_time = time.perf_counter() - start
    count = 10 * args.per_label
    return dict(
        label_accuracy = guided['label_accuracy'],
        classifier_test_accuracy = judge_accuracy(judge, test_split.images, test_split.labels),
        caption_accuracy = float((captions == test.labels).float().mean()),
        caption_non_label_fraction = float((captions < 0).float().mean()),
        frechet_distance_pca = guided['frechet_distance_pca'],
        # the same score for as many real training digits: the floor set by sample size
        frechet_distance_pca_real = frechet_distance_pca(test_split.images, _subset(train_split.images, count, args.seed)),
        label_accuracy_unguided = unguided['label_accuracy'],
        frechet_distance_pca_unguided = unguided['frechet_distance_pca'],
        **held_out_losses(model, test_latents, test.labels, args.seed),
        generated_images = count,
        captioned_images = len(test.labels),
        generation_seconds = guided['seconds'],
        caption_seconds = caption_time,
    )


def _subset(images: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    order = torch.randperm(len(images), generator = torch.Generator().manual_seed(seed))
    return images[order[:count]]


def _head(split, count: int):
    return type(split)(split.images[:count], split.labels[:count])


def run(args: argparse.Namespace, env: Distributed | None = None) -> dict | None:
    """Train, then (rank 0) evaluate and write the outputs; returns the metrics on rank 0."""
    env = env or Distributed()
    # per-worker flow noise and times; DDP broadcasts rank 0's initial weights to the others
    torch.manual_seed(args.seed * 1000 + env.rank)   # seeds' rank streams never overlap
    train_split, test_split = load_splits()
    model = build_model(args).to(default_device())
    batches = Batches(train_split, args.patch, args.batch_size, args.seed, env.rank, env.world_size)
    losses, seconds = train(model, batches, steps = args.steps, lr = args.lr, env = env, warmup = args.warmup)
    if not env.is_main:
        return None
    args.output.mkdir(parents = True, exist_ok = True)
    plot_loss_curve(losses, args.output / 'loss.png', 'Transfusion on 8x8 digits (text + flow loss)')
    checkpoint = save_checkpoint(model, args.output)
    metrics = dict(
        **evaluate(model, args, train_split, test_split), **run_facts(args, env, model, seconds, losses),
        config = dict(patch = args.patch, causal_image_attention = args.causal_image_attention,
                      noise_limit = args.noise_limit, cfg_scale = args.cfg_scale, modality_steps = args.modality_steps,
                      seed = args.seed, checkpoint = str(checkpoint)),
    )
    write_json(metrics, args.output / 'metrics.json')
    return metrics


def main(argv = None) -> None:
    args = parse_args(argv)
    launch_and_report(args, run, lambda metrics: (
        f"label accuracy {metrics['label_accuracy']:.3f} (classifier on real held-out digits "
        f"{metrics['classifier_test_accuracy']:.3f}), caption accuracy {metrics['caption_accuracy']:.3f}, "
        f"training {metrics['training_seconds']:.0f} s for {metrics['steps']} steps; outputs in {args.output}"))


if __name__ == '__main__':
    main()
