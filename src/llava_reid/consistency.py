"""Cross-field config checks: constraints between keys that a JSON schema cannot express.

One place for every such rule, run by the Snakefile right after schema validation (before any
job) and by every CLI stage on the sections it was given. Each check reads only keys that are
present, so a stage's view (seed, device and a few sections) is checked as far as it goes.
Every problem is one line that names the keys, their values and what would be valid.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

_MISSING = object()


def _get(cfg: dict[str, Any], dotted: str) -> Any:
    node: Any = cfg
    for name in dotted.split("."):
        if not isinstance(node, dict) or name not in node:
            return _MISSING
        node = node[name]
    return node


def _present(cfg: dict[str, Any], *keys: str) -> list[Any] | None:
    values = [_get(cfg, k) for k in keys]
    return None if any(v is _MISSING for v in values) else values


def _divides(cfg, whole_key: str, part_key: str, why: str) -> Iterator[str]:
    got = _present(cfg, whole_key, part_key)
    if got and got[1] and got[0] % got[1]:
        yield (f"{whole_key} ({got[0]}) must be divisible by {part_key} ({got[1]}): {why}")


def _dialogue(cfg) -> Iterator[str]:
    got = _present(cfg, "dialogue.num_candidates", "dialogue.pool_size")
    if got and got[0] > got[1]:
        yield (f"dialogue.num_candidates ({got[0]}) must be <= dialogue.pool_size ({got[1]}): "
               "the candidates are taken from the retrieval pool")
    got = _present(cfg, "evaluate.methods", "dialogue.num_candidates")
    if got and "selector" in got[0] and got[1] < 2:
        yield (f"dialogue.num_candidates ({got[1]}) must be >= 2 when evaluate.methods has "
               "'selector': the selector picks num_candidates - 1 images besides the top-1")


def _data(cfg) -> Iterator[str]:
    if _get(cfg, "data.source") == "annotations":
        for key in ("data.annotations", "data.image_root"):
            if _get(cfg, key) in (None, "", _MISSING):
                yield f"{key} must be set when data.source is 'annotations'"
    if _get(cfg, "data.source") != "synthetic":
        return
    syn = _get(cfg, "data.synthetic")
    if not isinstance(syn, dict) or "images_per_identity" not in syn:
        return
    per_id = syn["images_per_identity"]
    ids = syn.get("identities", {})
    train_images = ids.get("train", 0) * per_id
    test_images = ids.get("test", 0) * per_id
    got = _present(cfg, "retriever.batch_size")
    if got and "train" in ids and got[0] > train_images:
        yield (f"retriever.batch_size ({got[0]}) must be <= the synthetic training images "
               f"({train_images} = data.synthetic.identities.train x images_per_identity)")
    got = _present(cfg, "evaluate.chunks")
    if got and "test" in ids and got[0] > test_images:
        yield (f"evaluate.chunks ({got[0]}) must be <= the synthetic test queries "
               f"({test_images} = data.synthetic.identities.test x images_per_identity)")
    got = _present(cfg, "prepare.min_remaining", "data.synthetic.questions_per_image")
    if got and got[0] > got[1]:
        yield (f"prepare.min_remaining ({got[0]}) must be <= "
               f"data.synthetic.questions_per_image ({got[1]}): otherwise the look-ahead "
               "oracle stops every dialogue before its first question")


def _retriever(cfg) -> Iterator[str]:
    got = _present(cfg, "retriever.text_views.initial", "retriever.text_views.partial")
    if got and got[0] + got[1] > 1:
        yield (f"retriever.text_views.initial + partial ({got[0]} + {got[1]}) must be <= 1: "
               "they are probabilities of one draw")
    losses = _get(cfg, "retriever.losses")
    if isinstance(losses, dict) and losses and not any(v > 0 for v in losses.values()):
        yield "retriever.losses: at least one of sdm, id, mlm must be > 0"
    if _get(cfg, "retriever.pretrained") is None:
        yield from _divides(cfg, "retriever.tiny.hidden_size", "retriever.tiny.heads",
                            "attention heads split the width")
        yield from _divides(cfg, "retriever.tiny.embed_dim", "selector.heads",
                            "the selector attends over the retriever's features")


def _questioner(cfg) -> Iterator[str]:
    if _get(cfg, "questioner.pretrained") is not None:
        return
    t = "questioner.tiny."
    yield from _divides(cfg, t + "hidden_size", t + "heads", "attention heads split the width")
    yield from _divides(cfg, t + "heads", t + "kv_heads", "query heads share key/value heads")
    yield from _divides(cfg, t + "vision_hidden_size", t + "vision_heads",
                        "attention heads split the width")
    yield from _divides(cfg, t + "image_size", t + "patch_size",
                        "the vision tower cuts the image into whole patches")
    got = _present(cfg, t + "hidden_size", t + "heads")
    if got and got[1] and not got[0] % got[1] and (got[0] // got[1]) % 2:
        yield (f"{t}hidden_size / heads ({got[0]} / {got[1]}) must be even: rotary position "
               "embeddings rotate pairs of dimensions")


def _answerer(cfg) -> Iterator[str]:
    kind = _get(cfg, "answerer.kind")
    base_url, model = _get(cfg, "answerer.openai.base_url"), _get(cfg, "answerer.openai.model")
    if kind == "openai":
        if base_url in (None, ""):
            yield ("answerer.openai.base_url must be set when answerer.kind is 'openai' "
                   "(e.g. http://127.0.0.1:30000/v1)")
        if model in (None, ""):
            yield "answerer.openai.model must be set when answerer.kind is 'openai'"
    elif kind == "sglang" and _get(cfg, "answerer.sglang.model_path") in (None, "", _MISSING):
        if base_url in (None, "", _MISSING):
            yield ("answerer.sglang.model_path must be set when answerer.kind is 'sglang' and "
                   "answerer.openai.base_url is null (the job starts the server itself)")
        elif model in (None, "", _MISSING):
            yield ("answerer.openai.model (or answerer.sglang.model_path) must be set when "
                   "answerer.kind is 'sglang'")


CHECKS: tuple[Callable[[dict[str, Any]], Iterator[str]], ...] = (
    _data, _dialogue, _retriever, _questioner, _answerer)


def problems(cfg: dict[str, Any]) -> list[str]:
    """Every cross-field problem of ``cfg`` (empty when consistent)."""
    return [msg for check in CHECKS for msg in check(cfg)]
