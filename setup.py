"""Build hook: the wheel carries the workflow's config schema inside the package.

workflow/schemas/config.schema.yaml stays the one file (the Snakefile validates against it);
building copies it to llava_reid/config.schema.yaml so an installed package (a wheel, a
non-editable ``pip install .``) validates every stage's config against the same schema.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

SCHEMA = Path("workflow") / "schemas" / "config.schema.yaml"


class BuildWithSchema(build_py):
    def run(self):
        super().run()
        if not self.editable_mode:  # an editable install reads the checkout's file directly
            target = Path(self.build_lib) / "llava_reid" / SCHEMA.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(SCHEMA, target)

    def get_outputs(self, include_bytecode=True):
        outputs = super().get_outputs(include_bytecode)
        if not self.editable_mode:
            outputs.append(str(Path(self.build_lib) / "llava_reid" / SCHEMA.name))
        return outputs


setup(cmdclass={"build_py": BuildWithSchema})
