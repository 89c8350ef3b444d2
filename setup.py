"""Only the compiled core lives here; metadata is in pyproject.toml.

SHMFABRIC_SANITIZE=1 builds the core with AddressSanitizer and UBSan (run the tests with
LD_PRELOAD=$(gcc -print-file-name=libasan.so) to use it).
"""
import os

from setuptools import Extension, setup

cflags = ["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers"]
ldflags: list[str] = []
if os.environ.get("SHMFABRIC_SANITIZE"):
    cflags += ["-O1", "-g", "-fsanitize=address,undefined", "-fno-omit-frame-pointer"]
    ldflags += ["-fsanitize=address,undefined"]

setup(
    ext_modules=[
        Extension(
            "shmfabric.core._fabric",
            sources=["src/shmfabric/core/_fabric.c"],
            depends=["src/shmfabric/core/fabric_layout.h"],
            extra_compile_args=cflags,
            extra_link_args=ldflags,
            libraries=["pthread"],
        )
    ]
)
