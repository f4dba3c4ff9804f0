"""Builds the optional C++ packer (csrc/packer.cpp -> fastdpo._packer); all other metadata is in pyproject.toml.

Without a C++ compiler or pybind11 the extension is skipped with one warning and the install still succeeds:
fastdpo.data.packer then uses its Python backend (same output, slower).
"""

from __future__ import annotations

import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """build_ext that turns a missing compiler or pybind11 into a warning instead of a failed install."""

    def build_extensions(self) -> None:
        try:
            import pybind11
        except ImportError:
            self._skip("pybind11 is not installed")
            return
        unix = self.compiler.compiler_type != "msvc"
        flags = ["-O3", "-g0", "-std=c++17", "-fvisibility=hidden"] if unix else ["/O2", "/std:c++17"]
        for ext in self.extensions:
            ext.include_dirs.append(pybind11.get_include())
            ext.extra_compile_args.extend(flags)
        try:
            super().build_extensions()
        except Exception as error:  # CompileError, LinkError, a missing compiler binary (DistutilsExecError, OSError)
            self._skip(f"{type(error).__name__}: {error}")

    def _skip(self, reason: str) -> None:
        names = ", ".join(ext.name for ext in self.extensions)
        print(f"WARNING: not building {names} ({reason}); fastdpo uses its Python packer instead", file=sys.stderr)
        # Forget the extensions so that the install (and an editable install's copy into the source tree) skips them
        self.extensions = []


setup(
    ext_modules=[Extension("fastdpo._packer", ["csrc/packer.cpp"], language="c++")],
    cmdclass={"build_ext": OptionalBuildExt},
)
