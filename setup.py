from setuptools import setup

# The Triton kernels live in the top-level folder kernels/ but install as `fastmae.kernels`: a PyPI
# package already owns the import name `kernels`.
setup(
    name="fastmae",
    version="0.1.0",
    description="Masked Autoencoders for PyTorch with fused Triton kernels, drop-in for the official MAE",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["fastmae", "fastmae.model", "fastmae.ops", "fastmae.train", "fastmae.kernels", "fastmae.bench"],
    package_dir={"fastmae.kernels": "kernels"},
    # measured backend orders (fastmae bench ops --write-priority) and launch settings (fastmae bench tune --write)
    package_data={"fastmae.ops": ["priority.json"], "fastmae.kernels": ["*.json"]},
    install_requires=["torch>=2.11", "numpy", "pillow", "tqdm"],
    extras_require={
        "triton": ["triton>=3.6"],
        "xformers": ["xformers>=0.0.35"],
        "plots": ["matplotlib"],
        "train": ["matplotlib", "tensorboard"],
        "dev": ["pytest", "pytest-xdist", "pytest-benchmark", "matplotlib", "triton>=3.6"],
    },
    entry_points={"console_scripts": ["fastmae=fastmae.cli:main"]},
)
