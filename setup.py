"""Build hook: the wheel carries the default checkpoint (``checkpoints/fashion_realnvp``) inside the package, as
``flowcore/bundled/fashion_realnvp/``, so ``pip install flowcore`` scores and opens the dashboard without any
download. Everything else is declared in pyproject.toml."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
DEFAULT_MODEL = "fashion_realnvp"  # flowcore.zoo.checkpoints.DEFAULT_MODEL
FILES = ("model.safetensors", "config.json", "reference.npz", "README.md", "histogram.png")


class BuildWithDefaultModel(build_py):
    def run(self) -> None:
        super().run()
        source = ROOT / "checkpoints" / DEFAULT_MODEL
        if self.editable_mode or not (source / "model.safetensors").is_file():
            return  # an editable install finds checkpoints/ itself; an sdist without it ships none
        target = Path(self.build_lib) / "flowcore" / "bundled" / DEFAULT_MODEL
        target.mkdir(parents=True, exist_ok=True)
        for name in FILES:
            if (source / name).is_file():
                self.copy_file(str(source / name), str(target / name))


setup(cmdclass={"build_py": BuildWithDefaultModel})
