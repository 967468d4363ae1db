# Data: the synthetic generator (embedded default) and validated annotations in Parquet.


rule synthesize_data:
    """Render the synthetic pedestrians and their Interactive-PEDES annotations."""
    output:
        annotations=out("data/synthetic/annotations.json"),
        images=directory(out("data/synthetic/images")),
    log:
        out("logs/synthesize_data.log"),
    benchmark:
        out("benchmarks/synthesize_data.tsv")
    conda:
        "../envs/train.yaml"
    params:
        cfg=stage_config("synthesize"),
        root=lambda wildcards, output: os.path.dirname(output.annotations),
    shell:
        "llava-reid synthesize --config {params.cfg:q} --out-dir {params.root} > {log} 2>&1"


rule load_annotations:
    """Validate the annotation JSON and its images; write annotations.parquet."""
    input:
        annotations=annotation_json(),
    output:
        out("data/annotations.parquet"),
    log:
        out("logs/load_annotations.log"),
    benchmark:
        out("benchmarks/load_annotations.tsv")
    conda:
        "../envs/train.yaml"
    params:
        cfg=stage_config("load-annotations"),
        image_root=lambda wildcards, input: annotation_image_root(input.annotations),
    shell:
        "llava-reid load-annotations --config {params.cfg:q} --annotations {input.annotations}"
        " --image-root {params.image_root} --out {output} > {log} 2>&1"
