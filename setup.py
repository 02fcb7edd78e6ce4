import re
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
version = re.search(r"__version__ = '([^']+)'", (here / 'transfusion_pytorch' / 'version.py').read_text()).group(1)

setup(
    name = 'transfusion-pytorch',
    version = version,
    description = 'Transfusion with flow matching: one transformer for next-token text and flow-matched modalities',
    long_description = (here / 'README.md').read_text(),
    long_description_content_type = 'text/markdown',
    license = 'MIT',
    packages = find_packages(exclude = ('tests', 'tests.*', 'examples', 'benchmarks')),
    python_requires = '>=3.10',
    install_requires = [
        'torch>=2.5',          # flex attention and BlockMask
        'einops>=0.8',
        'beartype>=0.18',
        'jaxtyping>=0.2.30',
        'torchdiffeq>=0.2.4',
        'tqdm',
    ],
    extras_require = {
        # the example smoke tests train on scikit-learn's bundled data and draw with matplotlib
        'test': ['pytest>=8', 'hypothesis>=6', 'scikit-learn>=1.3', 'matplotlib>=3.7'],
        # the examples train on scikit-learn's bundled digits and draw their figures with matplotlib
        'examples': ['scikit-learn>=1.3', 'matplotlib>=3.7'],
    },
    classifiers = [
        'License :: OSI Approved :: MIT License',
        'Programming Language :: Python :: 3',
        'Topic :: Scientific/Engineering :: Artificial Intelligence',
    ],
)
