# Transfer: evaluating trained models on a caption benchmark (CUHK-PEDES, ICFG-PEDES,
# RSTPReid; data.format). Nothing is trained: the models come from `<section>.checkpoint`
# (rules/import.smk), only the test split is encoded, and the witness looks at the target image.

CAPTION_FORMATS = ("cuhk-pedes", "icfg-pedes", "rstpreid")


def transfer_run():
    return config["data"].get("format", "interactive-pedes") in CAPTION_FORMATS


def feature_splits():
    """The splits whose features a run needs: a transfer run evaluates the test split only."""
    return ["test"] if transfer_run() else SPLITS


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
            f"data.format {fmt}: " + "; ".join(problems) + " (see workflow/presets/transfer-*)"
        )


check_transfer_config()


rule export_similarity:
    """Our retriever's score of every query against every gallery image, in the
    auxiliary-similarity shape (evaluate.auxiliary_similarity)."""
    input:
        gallery=out("features/{split}_gallery.parquet"),
        queries=out("features/{split}_queries.parquet"),
    output:
        out("features/{split}_similarity.parquet"),
    log:
        out("logs/export_similarity_{split}.log"),
    benchmark:
        out("benchmarks/export_similarity_{split}.tsv")
    wildcard_constraints:
        split="train|val|test",
    conda:
        "../envs/train.yaml"
    params:
        cfg=stage_config(),
    shell:
        "llava-reid export-similarity --config {params.cfg:q} --gallery {input.gallery}"
        " --queries {input.queries} --out {output} > {log} 2>&1"
