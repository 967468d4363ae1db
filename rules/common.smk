import json
import os

RESULTS = f"{config['results']}/{config['run']}"
SPLITS = ["train", "val", "test"]


def out(path):
    """Path of an artifact of this run."""
    return f"{RESULTS}/{path}"


def stage_config(*keys):
    """JSON of what one stage reads: seed, device and the named sections or dotted sub-keys
    ("questioner.tiny"). A rule param, so editing a key reruns exactly the stages that read
    it (the CLI checks the view's types against the schema)."""
    view = {"seed": config["seed"], "device": config["device"]}
    for key in keys:
        *parents, leaf = key.split(".")
        source, target = config, view
        for name in parents:
            source = source[name]
            target = target.setdefault(name, {})
        target[leaf] = source[leaf]
    return json.dumps(view, sort_keys=True)


# What the questioner's inference stages read: image preprocessing and visual-token pooling.
QUESTIONER_INPUT = (
    "questioner.pool_ratio",
    "questioner.image_mean",
    "questioner.image_std",
)


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
    return out("joint/adapter") if method == "selector" else out("questioner/adapter")


def final_adapter():
    """The adapter whose trained projector evaluation-time visual tokens come from."""
    methods = config["evaluate"]["methods"]
    return method_adapter("selector" if "selector" in methods else "questioner")


def projector_adapter(wildcards):
    """When the projector trains, evaluation-time visual tokens come from the trained one."""
    if config["questioner"]["train_projector"] and wildcards.split != "train":
        return final_adapter()
    return []


def all_targets():
    return [
        out("retriever/metrics.json"),
        *expand(out("features/{split}_gallery.parquet"), split=SPLITS),
        *expand(out("features/{split}_queries.parquet"), split=SPLITS),
        out("questioner/metrics.json"),
        *expand(
            out("eval/{method}/metrics.json"), method=config["evaluate"]["methods"]
        ),
        *report_targets(),
        *intermediate_targets(),
    ]


def intermediate_targets():
    """Every other artifact the DAG consumes: a plain `snakemake` rebuilds whichever is
    missing (e.g. after an interrupted `--forcerun`), not only the final ones."""
    methods = config["evaluate"]["methods"]
    n = config["evaluate"]["chunks"]
    targets = [
        out("data/annotations.parquet"),
        out("models/retriever_init"),
        out("prepare/oracle_plan.parquet"),
        out("prepare/conversations.parquet"),
        out("questioner/visual_tokens/train.safetensors"),
        *expand(out("eval/{method}/dialogues.parquet"), method=methods),
        *expand(
            out("eval/{method}/chunks/{i}-of-{n}.parquet"),
            method=methods,
            i=range(n),
            n=n,
        ),
    ]
    if any(m in QUESTIONER_METHODS for m in methods):
        targets.append(out("questioner/visual_tokens/test.safetensors"))
    if config["data"]["source"] == "synthetic":
        targets.append(annotation_json())
    if not config["questioner"]["pretrained"]:
        targets.append(out("models/questioner_tiny"))
    if "selector" in methods:
        targets += [
            out("selector/warmup.safetensors"),
            out("selector/warmup_metrics.json"),
            out("joint/adapter"),
            out("joint/selector.safetensors"),
            out("joint/metrics.json"),
        ]
    return targets


# -- evaluation -----------------------------------------------------------------------------

QUESTIONER_METHODS = ("questioner", "selector")


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
        "visual_tokens": out("questioner/visual_tokens/test.safetensors"),
    }
    if wildcards.method == "selector":
        models["selector"] = out("joint/selector.safetensors")
    return models


def evaluate_config(wildcards):
    """An evaluation chunk's view: the questioner's settings only for the methods that run it,
    so tuning the questioner never reruns the initial / random / oracle baselines."""
    keys = ["features", "dialogue", "answerer"]
    if wildcards.method in QUESTIONER_METHODS:
        keys += [*QUESTIONER_INPUT, "evaluate.generation"]
    return stage_config(*keys)


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
    """Every report artifact: the plots and tables, and one ranked-list picture per method."""
    return [
        out("report/recall_vs_round.png"),
        out("report/bri.png"),
        out("report/metrics.tsv"),
        out("report/metrics.html"),
        *expand(out("report/ranked_lists/{method}.png"), method=eval_methods()),
    ]
