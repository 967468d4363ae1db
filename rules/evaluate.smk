# Interactive evaluation: each method's test queries scattered over chunks (one job, one GPU
# each), then gathered by query id into dialogues and per-round metrics.


rule sglang_python:
    """The Python that runs the SGLang answerer's server (answerer.kind: sglang) and proof that it
    imports sglang: envs/serve.yaml's under --sdm conda, else $LLAVA_REID_SGLANG_PYTHON or python.
    """
    output:
        out("answerer/sglang_python.txt"),
    log:
        out("logs/sglang_python.log"),
    benchmark:
        out("benchmarks/sglang_python.tsv")
    priority: 100
    localrule: True
    conda:
        "../envs/serve.yaml"
    shell:
        # Not the CLI: this environment holds SGLang, which pins versions the project cannot use.
        '"${{LLAVA_REID_SGLANG_PYTHON:-python}}" -c "import sglang, sys; print(sys.executable)"'
        " > {output} 2> {log}"


rule evaluate:
    """Interactive dialogues of one chunk of the test queries for one method."""
    input:
        unpack(method_models),
        sglang_python=sglang_python(),
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
        sglang_env=sglang_env,
        images=answerer_images(),
    shell:
        "{params.sglang_env}llava-reid evaluate --config {params.cfg:q} --method {wildcards.method}"
        " --chunk {wildcards.i} --chunks {wildcards.n} --annotations {input.annotations}"
        " --gallery {input.gallery} --queries {input.queries} --retriever {input.retriever}"
        " {params.models} {params.images} --answers-cache {params.answers} --out {output}"
        " > {log} 2>&1"


rule merge_eval:
    """Join a method's evaluation chunks; per-round R@k, mAP, mINP and BRI."""
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
        cfg=stage_config("merge-eval"),
    shell:
        "llava-reid merge-eval --config {params.cfg:q} --method {wildcards.method}"
        " --chunks {input.chunks} --gallery {input.gallery} --queries {input.queries}"
        " --out {output.dialogues} --metrics {output.metrics} > {log} 2>&1"
