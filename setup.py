"""Build the demo native extension; all other metadata lives in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "native_demo._native",
            sources=["workers/native_demo/_native.c"],
            extra_compile_args=["-O2", "-Wall"],
        )
    ]
)
