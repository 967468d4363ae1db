# Transfer: evaluating trained models on a caption benchmark (CUHK-PEDES, ICFG-PEDES,
# RSTPReid; data.format). Nothing is trained: the models come from `<section>.checkpoint`
# (rules/import.smk), only the test split is encoded, and the witness looks at the target image.


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
        cfg=stage_config("export-similarity"),
    shell:
        "llava-reid export-similarity --config {params.cfg:q} --gallery {input.gallery}"
        " --queries {input.queries} --out {output} > {log} 2>&1"
