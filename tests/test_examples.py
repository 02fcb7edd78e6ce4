"""The example scripts run end to end in their --smoke mode and write what they promise.

Each runs in a subprocess, as a user would start it, with tiny settings (seconds). The examples
need the `examples` extra (scikit-learn, matplotlib); without it these tests are skipped.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / 'examples'


def run_smoke(script: str, output: Path, *extra: str) -> dict:
    """Run `examples/<script> --smoke --output <output>`; return its metrics.json."""
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'MPLBACKEND': 'Agg'}
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), '--smoke', '--threads', '1', '--output', str(output), *extra],
        capture_output = True, text = True, timeout = 300, env = env,
    )
    assert result.returncode == 0, f'{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}'
    return json.loads((output / 'metrics.json').read_text())


def assert_finite(metrics: dict, keys: list[str]) -> None:
    for key in keys:
        assert key in metrics, f'metrics.json lacks {key!r}: {sorted(metrics)}'
        value = metrics[key]
        assert isinstance(value, (int, float)) and math.isfinite(value), f'{key} = {value!r} is not a finite number'


def assert_checkpoint(output: Path) -> None:
    assert (output / 'checkpoint' / 'config.json').is_file(), f'no save_pretrained checkpoint in {output}'


def test_train_digits_smoke(tmp_path):
    pytest.importorskip('sklearn')
    pytest.importorskip('matplotlib')
    metrics = run_smoke('train_digits.py', tmp_path)
    assert_finite(metrics, ['label_accuracy', 'caption_accuracy', 'classifier_test_accuracy', 'training_seconds',
                            'steps', 'flow_loss', 'caption_loss', 'frechet_distance_pca'])
    for key in ('label_accuracy', 'caption_accuracy', 'classifier_test_accuracy'):
        assert 0. <= metrics[key] <= 1.
    # the judge is a real classifier on real digits, whatever the tiny model learned
    assert metrics['classifier_test_accuracy'] > 0.9
    for name in ('samples.png', 'loss.png'):
        assert (tmp_path / name).stat().st_size > 0, name
    assert_checkpoint(tmp_path)


def test_train_text_smoke(tmp_path):
    pytest.importorskip('matplotlib')
    metrics = run_smoke('train_text.py', tmp_path)
    assert_finite(metrics, ['bits_per_char', 'unigram_bits_per_char', 'training_seconds', 'steps'])
    assert 0. < metrics['bits_per_char'] < 8.
    assert (tmp_path / 'loss.png').stat().st_size > 0
    assert (tmp_path / 'sample.txt').read_text().startswith('def ')
    assert_checkpoint(tmp_path)


def test_ablation_digits_smoke(tmp_path):
    pytest.importorskip('sklearn')
    pytest.importorskip('matplotlib')
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'MPLBACKEND': 'Agg'}
    table = tmp_path / 'results.md'
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / 'ablation_digits.py'), '--smoke', '--output', str(tmp_path), '--table', str(table)],
        capture_output = True, text = True, timeout = 300, env = env,
    )
    assert result.returncode == 0, f'ablation failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}'
    text = table.read_text()
    assert 'causal' in text and 'noise limit' in text
    runs = json.loads((tmp_path / 'ablation.json').read_text())
    assert len(runs) >= 3
    for run in runs:
        assert_finite(run['metrics'], ['label_accuracy', 'caption_accuracy', 'flow_loss'])


def test_train_images_modality_only_smoke(tmp_path):
    pytest.importorskip('sklearn')
    pytest.importorskip('matplotlib')
    metrics = run_smoke('train_images_modality_only.py', tmp_path)
    assert_finite(metrics, ['flow_loss_heldout', 'flow_loss_heldout_untrained', 'frechet_pca_generated',
                            'frechet_pca_untrained', 'frechet_pca_real', 'classifier_accuracy_generated',
                            'classifier_accuracy_untrained', 'training_seconds', 'steps'])
    # even 30 tiny steps of modality-only training beat the same network untrained on held-out patches
    assert metrics['flow_loss_heldout'] < metrics['flow_loss_heldout_untrained']
    for key in ('classifier_accuracy_generated', 'classifier_accuracy_untrained', 'classifier_accuracy_real'):
        assert 0. <= metrics[key] <= 1.
    for name in ('samples.png', 'loss.png'):
        assert (tmp_path / name).stat().st_size > 0, name
