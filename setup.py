"""Build of qsbr's optional C kernel (everything else is in pyproject.toml).

The extensions qsbr._kernel and qsbr._shared are optional: where it cannot be built (no C
compiler, no Python headers) the install still succeeds and qsbr runs on its
pure-Python kernel (qsbr.implementation == "python"). Environment:

* QSBR_NO_EXTENSION=1  build nothing: a pure-Python install (and wheel);
* QSBR_STRICT_BUILD=1  -Wall -Wextra -Werror, and a failed build fails the
                       install (CI and `make test` use it);
* QSBR_SANITIZE=1      build with AddressSanitizer and UBSan (`make sanitize`).
"""

from __future__ import annotations

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def _fallback(exc: Exception) -> None:
    reason = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
    print(f"qsbr: C kernel not built ({reason}); installing the pure-Python kernel", file=sys.stderr)


class OptionalBuildExt(build_ext):
    """build_ext that says, in one line, when it falls back to pure Python."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:
            if _flag("QSBR_STRICT_BUILD"):
                raise
            _fallback(exc)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:
            if _flag("QSBR_STRICT_BUILD"):
                raise
            _fallback(exc)


def extensions() -> list[Extension]:
    if _flag("QSBR_NO_EXTENSION"):
        return []
    compile_args = ["-std=c11"]
    link_args: list[str] = []
    if _flag("QSBR_STRICT_BUILD"):
        compile_args += ["-Wall", "-Wextra", "-Werror"]
    if _flag("QSBR_SANITIZE"):
        sanitizers = "-fsanitize=address,undefined"
        compile_args += [sanitizers, "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer", "-g", "-O1"]
        link_args += [sanitizers]
    return [
        Extension(name, sources=[source], extra_compile_args=compile_args, extra_link_args=link_args)
        for name, source in (
            ("qsbr._kernel", "src/qsbr/_kernel.c"),
            # Atomics on a shared segment, for SharedDomain (shared_domain.py).
            ("qsbr._shared", "src/qsbr/_shared.c"),
        )
    ]


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
