"""Where a trained run keeps what the witness demo loads, and which of it is missing.

The paths are the workflow's (rules/common.smk): the retriever, the test split's gallery and
query features, the questioner with its adapter and cached visual tokens, the selector, and
the simulated answerer's dialogues for replay mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The config `snakemake demo` saw (presets merged), saved in the run for `llava-reid demo`.
RUN_CONFIG = "witness/config.yaml"


def default_config(run: str | Path | None) -> str:
    """The config a demo on ``run`` loads when none is given: the run's saved one, else the
    repository's config.yaml."""
    if run is not None and (Path(run) / RUN_CONFIG).exists():
        return str(Path(run) / RUN_CONFIG)
    return "config.yaml"


def method_adapter(method: str) -> str:
    """The questioner adapter a method evaluates, in a run: SFT alone, or after joint
    training. The workflow's evaluation (rules/common.smk) and the demo both read it here."""
    return "joint/adapter" if method == "selector" else "questioner/adapter"


def method_visual_tokens(cfg: dict[str, Any], method: str) -> str:
    """The test split's visual tokens a method's questioner reads, in a run: one cache from
    the base projector, or, when the projector trains, one from each evaluated adapter's
    projector (the joint adapter's differs from the SFT adapter's)."""
    if cfg.get("questioner", {}).get("train_projector") and method == "selector":
        return "joint/visual_tokens/test.safetensors"
    return "questioner/visual_tokens/test.safetensors"


class RunNotReady(FileNotFoundError):
    """The run lacks artifacts the demo needs."""


@dataclass(frozen=True)
class RunFiles:
    run: Path
    method: str  # "selector" (questioner + selector) or "questioner" (plain top-k)
    annotations: Path
    gallery: Path
    queries: Path
    retriever: Path
    questioner: Path
    adapter: Path
    visual_tokens: Path
    selector: Path | None
    simulated: Path  # eval/{method}/dialogues.parquet (optional: replay compares with it)
    image_root: Path

    @classmethod
    def locate(cls, run: str | Path, cfg: dict[str, Any], method: str | None = None,
               image_root: str | Path | None = None) -> RunFiles:
        """The run's files for ``method``; by default the selector when the run trained it
        (``joint/``) or the config evaluates it, else the plain questioner."""
        run = Path(run)
        if method is None:
            wanted = "selector" in cfg.get("evaluate", {}).get("methods", ["selector"])
            method = "selector" if wanted or (run / "joint/selector.safetensors").exists() \
                else "questioner"
        if method not in ("selector", "questioner"):
            raise ValueError(f"method {method!r}: the demo runs 'selector' or 'questioner'")
        pretrained = cfg.get("questioner", {}).get("pretrained")
        if image_root is None:
            data = cfg.get("data", {})
            image_root = (run / "data/synthetic" if data.get("source", "synthetic") == "synthetic"
                          else data.get("image_root"))
        return cls(
            run=run, method=method,
            annotations=run / "data/annotations.parquet",
            gallery=run / "features/test_gallery.parquet",
            queries=run / "features/test_queries.parquet",
            retriever=run / "retriever/model",
            questioner=Path(pretrained) if pretrained else run / "models/questioner_tiny",
            adapter=run / method_adapter(method),
            visual_tokens=run / method_visual_tokens(cfg, method),
            selector=run / "joint/selector.safetensors" if method == "selector" else None,
            simulated=run / f"eval/{method}/dialogues.parquet",
            image_root=Path(image_root or "."),
        )

    def required(self) -> dict[str, Path]:
        files = {"annotations": self.annotations, "gallery": self.gallery,
                 "queries": self.queries, "retriever": self.retriever,
                 "questioner": self.questioner, "adapter": self.adapter,
                 "visual_tokens": self.visual_tokens}
        if self.selector is not None:
            files["selector"] = self.selector
        return files

    def missing(self) -> list[str]:
        return [f"{name}: {path}" for name, path in self.required().items() if not path.exists()]

    def check(self) -> None:
        missing = self.missing()
        if missing:
            raise RunNotReady(
                f"{self.run}: the {self.method} demo needs artifacts this run lacks:\n  "
                + "\n  ".join(missing)
                + "\nBuild them with `snakemake demo` (same config), then start again.")

    def models(self) -> dict[str, str | None]:
        """The model paths as evaluate.build_asker takes them."""
        return {"questioner": str(self.questioner), "adapter": str(self.adapter),
                "visual_tokens": str(self.visual_tokens),
                "selector": str(self.selector) if self.selector else None}
