"""medvlm: a DeepSpeed training framework for medical vision-language models, with a MedBLIP recipe."""
from setuptools import find_packages, setup

setup(
    name="medvlm",
    version="0.1.0",
    description="DeepSpeed training framework for medical vision-language models (MedBLIP: DAPT, PSD, VQA-RAD)",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["framework", "framework.*", "recipes", "recipes.*", "corpora", "corpora.*"]),
    package_data={"recipes": ["**/*.yaml", "**/*.json", "**/assets/*"]},
    include_package_data=True,
    # Lower bounds only: torch is not pinned, so a user can install the build that has kernels for their GPU
    # (a P100 needs a CUDA 12.6-or-older build; see docs/troubleshooting.md).
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        # Pinned to the versions the suite passes with (docs/tests.md, "A new DeepSpeed or transformers"): the framework
        # patches DeepSpeed (framework/deepspeed_patches.py); transformers 5.17 fails 4 model tests (generate's
        # cache, beam scores, export)
        "deepspeed>=0.19.8,<0.20",
        "transformers>=5.25,<5.26",
        "timm>=0.9.16",
        "webdataset>=0.2.86",
        "tensorboard>=2.14",
        "pyyaml>=6.0",
        "Pillow>=10.0",
        "numpy>=1.24",
        "safetensors>=0.4",
        "pyarrow>=14",  # reads ROCOv2's parquet files in row batches
    ],
    # web: launch/ask.py --serve, the local question page; it is the standard library's http.server, so the extra
    # installs nothing more and exists so that `pip install -e ".[web]"` keeps working if the page ever needs more
    extras_require={"test": ["pytest>=7.4", "pytest-xdist>=3.5"], "web": []},
)
