# The project's metadata is in pyproject.toml; this file only declares the optional C kernel of
# prepare's statistics (alexcli/data/_pixsums.c). optional=True: where it cannot be compiled (no
# C compiler or no Python headers) the install goes on and alexcli.data.stats uses numpy instead,
# with the same exact results; its statistics take three times as long.
from setuptools import Extension, setup

setup(ext_modules=[Extension("alexcli.data._pixsums", ["alexcli/data/_pixsums.c"], optional=True,
                             extra_compile_args=["-O3"])])
