from setuptools import find_packages, setup

setup(
    name="compactfusion-xdit",
    version="0.1.0",
    description="Residual-compressed communication for xDiT (xfuser 0.7.0) parallel diffusion inference",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["compactfusion_xdit", "compactfusion_xdit.*"]),
    include_package_data=True,
    package_data={"compactfusion_xdit": ["models/weights/*", "models/weights/*/*", "models/weights/*/*/*"]},
    install_requires=[
        "torch>=2.5",
        "xfuser==0.7.0",
        "yunchang==0.6.4",
        "diffusers>=0.33",
        "transformers>=4.45",
        "sentencepiece",
        "protobuf",
        "pyyaml",
        "numpy",
        "pillow",
        "numba>=0.60",  # the compiled CPU codecs (codecs/cpu), on by default; wheels, no compiler
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout", "hypothesis>=6", "numba>=0.60", "scikit-image", "scikit-learn", "matplotlib",
                 "triton>=3.0; platform_machine == 'x86_64'"],
        "triton": ["triton>=3.0"],
        "cpu-kernels": ["numba>=0.60"],  # an alias kept for old install lines: numba is now a core requirement
        "video": ["av"],
        "flash": ["flash-attn"],
        "bench": ["matplotlib", "scikit-image", "scikit-learn"],
        "ray": ["ray>=2.40"],  # ray_support: ranks as Ray actors (CPU or GPU), xfuser's RayDiffusionPipeline hook
    },
    entry_points={"console_scripts": ["xfuser=compactfusion_xdit.cli.launcher:main", "cfx-xdit=compactfusion_xdit.cli.xdit_command:main"]},
)
