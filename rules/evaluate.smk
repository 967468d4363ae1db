# Interactive evaluation: each method's test queries scattered over chunks (one job, one GPU
# each), then gathered by query id into dialogues and per-round metrics.


rule evaluate:
    input:
        unpack(method_models),
        annotations=out("data/annotations.parquet"),
        gallery=out("features/test_gallery.parquet"),
        queries=out("features/test_queries.parquet"),
        retriever=out("retriever/model"),
        auxiliary=auxiliary_similarity(),
    output:
        out("eval/{method}/chunks/{i}-of-{n}.parquet"),
    log:
        out("logs/evaluate_{method}_{i}-of-{n}.log"),
    benchmark:
        out("benchmarks/evaluate_{method}_{i}-of-{n}.tsv")
    wildcard_constraints:
        method="initial|random|oracle|questioner|selector",
        i=r"\d+",
        n=r"\d+",
    conda:
        "../envs/train.yaml"
    resources:
        gpu=1,
    params:
        cfg=evaluate_config,
        models=model_flags,
        # Not an output: kept across reruns so answers are never asked twice.
        answers=out("eval/{method}/answers/{i}-of-{n}.parquet"),
        images=answerer_images(),
    shell:
        "llava-reid evaluate --config {params.cfg:q} --method {wildcards.method}"
        " --chunk {wildcards.i} --chunks {wildcards.n} --annotations {input.annotations}"
        " --gallery {input.gallery} --queries {input.queries} --retriever {input.retriever}"
        " {params.models} {params.images} --answers-cache {params.answers} --out {output}"
        " > {log} 2>&1"


rule merge_eval:
    input:
        chunks=eval_chunks,
        gallery=out("features/test_gallery.parquet"),
        queries=out("features/test_queries.parquet"),
        auxiliary=auxiliary_similarity(),
    output:
        dialogues=out("eval/{method}/dialogues.parquet"),
        metrics=out("eval/{method}/metrics.json"),
    log:
        out("logs/merge_eval_{method}.log"),
    benchmark:
        out("benchmarks/merge_eval_{method}.tsv")
    conda:
        "../envs/train.yaml"
    params:
        cfg=stage_config(*auxiliary_keys()),
    shell:
        "llava-reid merge-eval --config {params.cfg:q} --method {wildcards.method}"
        " --chunks {input.chunks} --gallery {input.gallery} --queries {input.queries}"
        " --out {output.dialogues} --metrics {output.metrics} > {log} 2>&1"
