import json
import os
from types import SimpleNamespace

from llava_reid.data import SPLITS
from llava_reid.stage_views import QUESTIONER_METHODS, stage_view_json
from llava_reid.witness import run_files

RESULTS = f"{config['results']}/{config['run']}"


def out(path):
    """Path of an artifact of this run."""
    return f"{RESULTS}/{path}"


def stage_config(stage, method=None):
    """JSON of exactly the config keys one stage reads (``llava_reid.stage_views``): a rule
    param, so editing a key reruns exactly the stages that read it and what follows."""
    return stage_view_json(config, stage, method)


def annotation_json():
    if config["data"]["source"] == "synthetic":
        return out("data/synthetic/annotations.json")
    return config["data"]["annotations"]


def annotation_image_root(annotations):
    """Folder the annotation records' file_path are relative to (synthetic: beside the JSON)."""
    if config["data"]["source"] == "synthetic":
        return os.path.dirname(annotations)
    return config["data"]["image_root"]


def image_root():
    if config["data"]["source"] == "synthetic":
        return out("data/synthetic")
    return config["data"]["image_root"]


def questioner_model():
    """The base questioner: a local LLaVA-OneVision checkpoint, or the tiny factory's."""
    return config["questioner"]["pretrained"] or out("models/questioner_tiny")


def method_adapter(method):
    """The questioner adapter a method evaluates: SFT alone, or after joint training."""
    return out(run_files.method_adapter(method))


def projector_adapter(wildcards):
    """When the projector trains, the SFT adapter's projector makes evaluation-time visual
    tokens (the training split's stay the base projector's: training encodes images online).
    """
    if config["questioner"]["train_projector"] and wildcards.split != "train":
        return out("questioner/adapter")
    return []


def method_visual_tokens(method):
    """The test split's visual tokens a method's questioner reads (with a trained projector,
    each evaluated adapter has its own)."""
    return out(run_files.method_visual_tokens(config, method))


def all_targets():
    return [
        out("retriever/metrics.json"),
        *expand(out("features/{split}_gallery.parquet"), split=feature_splits()),
        *expand(out("features/{split}_queries.parquet"), split=feature_splits()),
        out("questioner/metrics.json"),
        *expand(
            out("eval/{method}/metrics.json"), method=config["evaluate"]["methods"]
        ),
        *report_targets(),
        *intermediate_targets(),
    ]


def intermediate_targets():
    """Every other artifact the DAG consumes: a plain `snakemake` rebuilds whichever is
    missing (e.g. after an interrupted `--forcerun`), not only the final ones. What only a
    training stage reads is left out when that stage is replaced by an imported checkpoint.
    """
    methods = config["evaluate"]["methods"]
    n = config["evaluate"]["chunks"]
    targets = [
        out("data/annotations.parquet"),
        *expand(out("eval/{method}/dialogues.parquet"), method=methods),
        *expand(
            out("eval/{method}/chunks/{i}-of-{n}.parquet"),
            method=methods,
            i=range(n),
            n=n,
        ),
    ]
    if not imported("retriever"):
        targets.append(out("models/retriever_init"))
    if not imported("questioner"):
        targets += [
            out("prepare/oracle_plan.parquet"),
            out("prepare/conversations.parquet"),
            out("questioner/visual_tokens/train.safetensors"),
            *label_fold_paths("retriever/folds/{fold}/metrics.json"),
            *label_fold_paths("features/folds/{fold}/train_gallery.parquet"),
            *label_fold_paths("features/folds/{fold}/train_queries.parquet"),
        ]
    targets += sorted(
        {method_visual_tokens(m) for m in methods if m in QUESTIONER_METHODS}
    )
    if any(m in QUESTIONER_METHODS for m in methods):
        if not config["questioner"]["pretrained"]:
            targets.append(out("models/questioner_tiny"))
    if config["data"]["source"] == "synthetic":
        targets.append(annotation_json())
    if "selector" in methods:
        targets += [
            out("joint/adapter"),
            out("joint/selector.safetensors"),
            out("joint/metrics.json"),
        ]
        if not imported("selector"):
            targets += [
                out("selector/warmup.safetensors"),
                out("selector/warmup_metrics.json"),
            ]
    return targets


def label_fold_paths(pattern):
    """The cross-fitting folds' artifacts prepare-data labels with (none unless
    prepare.cross_fit)."""
    return expand(out(pattern), fold=range(config["prepare"]["cross_fit"]))


def fold_labellers(pattern):
    """prepare_data's input function for the folds' artifacts. Evaluated only when
    prepare_data is needed: a run that imports the retriever and the questioner never asks.
    """

    def inputs(wildcards):
        if config["prepare"]["cross_fit"] and imported("retriever"):
            raise WorkflowError(
                "prepare.cross_fit trains fold retrievers with this workflow's retriever "
                "recipe, but the retriever is imported (retriever.checkpoint): set "
                "prepare.cross_fit: 0 to label with the imported retriever"
            )
        return label_fold_paths(pattern)

    return inputs


# -- evaluation -----------------------------------------------------------------------------


def eval_chunks(wildcards):
    """A method's evaluation chunks: eval/{method}/chunks/{i}-of-{n}.parquet, i < n."""
    n = config["evaluate"]["chunks"]
    return expand(
        out("eval/{method}/chunks/{i}-of-{n}.parquet"),
        method=wildcards.method,
        i=range(n),
        n=n,
    )


def method_models(wildcards):
    """What a method needs beyond the retriever: the questioner, its adapter, the cached
    visual tokens, the selector."""
    if wildcards.method not in QUESTIONER_METHODS:
        return {}
    models = {
        "questioner": questioner_model(),
        "adapter": method_adapter(wildcards.method),
        "visual_tokens": method_visual_tokens(wildcards.method),
    }
    if wildcards.method == "selector":
        models["selector"] = out("joint/selector.safetensors")
    return models


def auxiliary_similarity():
    """The external retriever's scores fused into the ranking ([] when none is configured)."""
    aux = config["evaluate"].get("auxiliary_similarity") or {}
    return [aux["path"]] if aux.get("path") else []


def auxiliary_keys():
    return ["evaluate.auxiliary_similarity"] if auxiliary_similarity() else []


def evaluate_config(wildcards):
    """An evaluation chunk's view: the questioner's settings only for the methods that run it,
    so tuning the questioner never reruns the initial / random / oracle baselines."""
    return stage_config("evaluate", wildcards.method)


def sglang_python():
    """The file naming the SGLang server's Python, when the answerer is SGLang."""
    if config["answerer"]["kind"] == "sglang":
        return out("answerer/sglang_python.txt")
    return []


def sglang_env(wildcards, input):
    """Shell prefix that hands the evaluate job the SGLang server's Python."""
    if not input.sglang_python:
        return ""
    return f'LLAVA_REID_SGLANG_PYTHON="$(cat {input.sglang_python})" '


def answerer_images():
    """--image-root for a witness that looks at the target image (answerer.input: image)."""
    acfg = config["answerer"]
    if acfg["kind"] == "rendered" or acfg.get("input", "memory") == "image":
        return f"--image-root {image_root()}"
    return ""


def model_flags(wildcards, input):
    flags = []
    for name in ("questioner", "adapter", "visual_tokens", "selector"):
        if name in input.keys():
            flags.append(f"--{name.replace('_', '-')} {input[name]}")
    return " ".join(flags)


# -- report -------------------------------------------------------------------------------


def eval_methods():
    """The evaluated methods (eval/{method}/...), in the order the report shows them."""
    return list(config["evaluate"]["methods"])


def report_targets():
    """Every report artifact: the plots and tables, one ranked-list picture per method and the
    training curves."""
    return [
        out("report/recall_vs_round.png"),
        out("report/bri.png"),
        out("report/metrics.tsv"),
        out("report/metrics.html"),
        *expand(out("report/ranked_lists/{method}.jpg"), method=eval_methods()),
        *([out("report/training_curves.png")] if training_metrics() else []),
    ]


def imported(section):
    """Whether ``section`` (retriever, questioner, selector) comes from a checkpoint."""
    return bool((config.get(section) or {}).get("checkpoint"))


def training_metrics():
    """The metrics.json (with a history) of every stage this run trains: an imported
    checkpoint (rules/import.smk) has no training history to draw."""
    stages = {}
    if not imported("retriever"):
        stages["retriever"] = out("retriever/metrics.json")
    if not imported("questioner"):
        stages["questioner"] = out("questioner/metrics.json")
    if "selector" in config["evaluate"]["methods"] and not imported("selector"):
        stages["warmup"] = out("selector/warmup_metrics.json")
        stages["joint"] = out("joint/metrics.json")
    return stages


# -- witness demo ---------------------------------------------------------------------------


def demo_method():
    return "selector" if "selector" in config["evaluate"]["methods"] else "questioner"


def demo_inputs(wildcards):
    """What `llava-reid demo` loads: the retriever, the test features, the questioner with its
    adapter, visual tokens and selector, and the simulated answerer's dialogues that replay
    mode compares with."""
    method = demo_method()
    return {
        "annotations": out("data/annotations.parquet"),
        "gallery": out("features/test_gallery.parquet"),
        "queries": out("features/test_queries.parquet"),
        "retriever": out("retriever/model"),
        "simulated": out(f"eval/{method}/dialogues.parquet"),
        **method_models(SimpleNamespace(method=method)),
    }


# -- published weights (rules/import.smk) --------------------------------------------------


def checkpoint_path(section):
    """The configured checkpoint's path; it must exist now, or Snakemake would quietly fall
    back to the training rule."""
    path = config[section]["checkpoint"]["path"]
    if not os.path.exists(path):
        raise WorkflowError(f"{section}.checkpoint.path: {path} does not exist")
    return path


def checkpoint_format(section):
    return config[section]["checkpoint"]["format"]


# -- transfer (rules/transfer.smk) ---------------------------------------------------------

CAPTION_FORMATS = ("cuhk-pedes", "icfg-pedes", "rstpreid")


def transfer_run():
    return config["data"].get("format", "interactive-pedes") in CAPTION_FORMATS


def feature_splits():
    """The splits whose features a run needs: a transfer run evaluates the test split only."""
    return ["test"] if transfer_run() else list(SPLITS)


def check_transfer_config():
    """A caption benchmark has no Q/A pairs and no written memory: say so before anything runs."""
    if not transfer_run():
        return
    fmt = config["data"]["format"]
    methods = config["evaluate"]["methods"]
    problems = []
    if config["data"]["source"] != "annotations":
        problems.append(f"data.source must be 'annotations' (the {fmt} JSON)")
    annotated = [m for m in methods if m in ("random", "oracle")]
    if annotated:
        problems.append(
            f"evaluate.methods {annotated} ask annotated questions, which {fmt} does not have"
        )
    needed = ["retriever"]
    if {"questioner", "selector"} & set(methods):
        needed.append("questioner")
    if "selector" in methods:
        needed.append("selector")
    for section in needed:
        if not config[section].get("checkpoint"):
            problems.append(
                f"{section}.checkpoint is not set (a transfer run trains nothing)"
            )
    acfg = config["answerer"]
    if acfg["kind"] != "rendered" and acfg.get("input", "memory") != "image":
        problems.append(
            "answerer.input must be 'image' (or answerer.kind 'rendered'): caption "
            "benchmarks have no written memory, the witness looks at the target image"
        )
    if problems:
        raise WorkflowError(
            f"data.format {fmt}: "
            + "; ".join(problems)
            + " (see workflow/presets/transfer-*)"
        )


check_transfer_config()
