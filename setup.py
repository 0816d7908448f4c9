"""The part of the package layout pyproject.toml cannot say: templates/ and kernels/ stay top-level folders of the
repository, and the wheel ships them as package data under names of archgen's own, archgen.templates and
archgen_kernels (archgen/resources.py finds them in either place). Everything else is in pyproject.toml."""

from setuptools import find_namespace_packages, setup

setup(
    packages=[*find_namespace_packages(include=["archgen", "archgen.*"], exclude=["*.__pycache__"]),
              "archgen.templates", "archgen_kernels"],
    package_dir={"archgen.templates": "templates", "archgen_kernels": "kernels"},
    package_data={"archgen.templates": ["**/*.j2", "**/*.py"], "archgen_kernels": ["*.py"]},
    exclude_package_data={"archgen.templates": ["**/__pycache__/*"]},
)
