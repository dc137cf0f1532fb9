"""Build hook: the wheel carries the default checkpoint (``checkpoints/fashion_realnvp``) inside the package, as
``flowcore/bundled/fashion_realnvp/``, and every checkpoint its config names (its ``background`` model, for the
likelihood-ratio score), so ``pip install flowcore`` scores and opens the dashboard without any download and no
page meets a model it cannot find. Everything else is declared in pyproject.toml."""

import json
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
DEFAULT_MODEL = "fashion_realnvp"  # flowcore.zoo.checkpoints.DEFAULT_MODEL


class BuildWithDefaultModel(build_py):
    def run(self) -> None:
        super().run()
        source = ROOT / "checkpoints" / DEFAULT_MODEL
        if self.editable_mode or not (source / "model.safetensors").is_file():
            return  # an editable install finds checkpoints/ itself; an sdist without it ships none
        background = json.loads((source / "config.json").read_text()).get("background")
        for model in [DEFAULT_MODEL, *([background] if background else [])]:
            if not (ROOT / "checkpoints" / model / "model.safetensors").is_file():
                raise FileNotFoundError(f"{DEFAULT_MODEL} names {model}, which checkpoints/ lacks: the wheel would "
                                        "ship a model that cannot score")
            target = Path(self.build_lib) / "flowcore" / "bundled" / model
            target.mkdir(parents=True, exist_ok=True)
            # every file of the folder (flowcore.zoo.checkpoints.FOLDER_FILES names them; importing it here would
            # need torch at build time): hidden ones are work in progress
            for file in sorted((ROOT / "checkpoints" / model).iterdir()):
                if file.is_file() and not file.name.startswith("."):
                    self.copy_file(str(file), str(target / file.name))


setup(cmdclass={"build_py": BuildWithDefaultModel})
