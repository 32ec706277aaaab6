"""Builds the optional C part of the row codec (``cfn_checkpoint._rows``).

Everything else is in ``pyproject.toml``. Without a C compiler the build goes on
without it, and the rows are decoded and written by the same code in Python
(``cfn_checkpoint.image.native`` is then None).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "cfn_checkpoint._rows",
            ["src/cfn_checkpoint/_rows.c"],
            extra_compile_args=["-O2"],
            optional=True,
        )
    ]
)
