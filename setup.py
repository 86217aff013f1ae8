"""Swin Transformer V2 at scale: a faithful model library and a DeepSpeed/Hydra trainer."""
import os

from setuptools import setup

# installed name -> folder in this repository, for the top-level packages
ROOTS = {
    "swinv2": "swinv2",
    "swinv2_train": "train",
    "swinv2_train.configs": "configs",   # Hydra finds them as pkg://swinv2_train.configs
    "swinv2_launch": "launch",
    "swinv2_tools": "scripts",
}


def _with_subpackages(roots: dict) -> dict:
    """Every folder holding an __init__.py under each root, by its installed name, so that a new
    subpackage (swinv2.kernels, swinv2_train.tasks, ...) cannot be left out of the wheel."""
    found = {}
    for name, folder in roots.items():
        for path, dirs, files in os.walk(folder):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            if "__init__.py" in files:
                rel = os.path.relpath(path, folder)
                found[name if rel == "." else ".".join([name, *rel.split(os.sep)])] = path
    return found


PACKAGE_DIR = _with_subpackages(ROOTS)

setup(
    name="swinv2-scale",
    version="0.1.0",
    description="Swin Transformer V2 (T/S/B/L/H/G) with a Hydra + DeepSpeed ZeRO-1 trainer, "
    "webdataset streaming and SLURM launch",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The repository keeps its plain top-level folders; installed, they get distinctive names so
    # nothing lands in site-packages as `train`, `launch`, `scripts` or `configs`.
    packages=list(PACKAGE_DIR),
    package_dir=PACKAGE_DIR,
    package_data={"swinv2_train.configs": ["*.yaml", "*/*.yaml"], "swinv2_launch.slurm": ["*.sbatch"]},
    # torch>=2.4: 2.13.0 satisfies it, so a pre-installed CPU build is kept (an unpinned
    # newer torch would pull several GB of CUDA wheels on a CPU machine).
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.16",
        "webdataset>=0.2.100",
        "hydra-core>=1.3",
        "omegaconf>=2.3",
        "wandb>=0.17",
        "tensorboard>=2.14",
        "matplotlib>=3.7",
        "pillow>=10",
        "numpy",
        "tqdm",
    ],
    extras_require={
        # transformers is a test-only, independent reference implementation of SwinV2.
        "dev": ["pytest>=8", "transformers>=4.40"],
    },
    entry_points={
        "console_scripts": [
            "swinv2-train=swinv2_train.main:main_and_exit",
            "swinv2-make-shards=swinv2_tools.make_shards:main",
            "swinv2-amplitude-report=swinv2_tools.amplitude_report:main",
            "swinv2-submit=swinv2_launch.submit:main",
            "swinv2-eval=swinv2_train.eval_command:main",
        ],
    },
)
