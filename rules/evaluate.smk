# Interactive evaluation: each method's test queries scattered over chunks (one job, one GPU
# each), then gathered by query id into dialogues and per-round metrics.

EVAL_CHUNKS = config["evaluate"]["chunks"]
QUESTIONER_METHODS = ("questioner", "selector")


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


def model_flags(wildcards, input):
    flags = []
    for name in ("questioner", "adapter", "visual_tokens", "selector"):
        if name in input.keys():
            flags.append(f"--{name.replace('_', '-')} {input[name]}")
    return " ".join(flags)


rule evaluate:
    input:
        unpack(method_models),
        annotations=out("data/annotations.parquet"),
        gallery=out("features/test_gallery.parquet"),
        queries=out("features/test_queries.parquet"),
        retriever=out("retriever/model"),
    output:
        out("eval/{method}/chunks/{i}-of-{n}.parquet"),
    wildcard_constraints:
        method="initial|random|oracle|questioner|selector",
        i=r"\d+",
        n=r"\d+",
    params:
        cfg=stage_config(
            "features", "dialogue", "questioner", "answerer", "evaluate", "retriever"
        ),
        models=model_flags,
        # Not an output: kept across reruns so answers are never asked twice.
        answers=out("eval/{method}/answers/{i}-of-{n}.parquet"),
    resources:
        gpu=1,
    log:
        out("logs/evaluate_{method}_{i}-of-{n}.log"),
    benchmark:
        out("benchmarks/evaluate_{method}_{i}-of-{n}.tsv")
    conda:
        "../envs/train.yaml"
    shell:
        "llava-reid evaluate --config {params.cfg:q} --method {wildcards.method}"
        " --chunk {wildcards.i} --chunks {wildcards.n} --annotations {input.annotations}"
        " --gallery {input.gallery} --queries {input.queries} --retriever {input.retriever}"
        " {params.models} --answers-cache {params.answers} --out {output} > {log} 2>&1"


rule merge_eval:
    input:
        chunks=expand(
            out("eval/{{method}}/chunks/{i}-of-{n}.parquet"),
            i=range(EVAL_CHUNKS),
            n=EVAL_CHUNKS,
        ),
        gallery=out("features/test_gallery.parquet"),
        queries=out("features/test_queries.parquet"),
    output:
        dialogues=out("eval/{method}/dialogues.parquet"),
        metrics=out("eval/{method}/metrics.json"),
    params:
        cfg=stage_config("evaluate"),
    log:
        out("logs/merge_eval_{method}.log"),
    benchmark:
        out("benchmarks/merge_eval_{method}.tsv")
    conda:
        "../envs/train.yaml"
    shell:
        "llava-reid merge-eval --config {params.cfg:q} --method {wildcards.method}"
        " --chunks {input.chunks} --gallery {input.gallery} --queries {input.queries}"
        " --out {output.dialogues} --metrics {output.metrics} > {log} 2>&1"
