# Report: per-round metric plots and tables of every evaluated method (with bootstrap intervals
# over the test queries), ranked-list pictures of a few dialogues per method and the training
# curves, all flagged for `snakemake --report`.


rule plots:
    """R@k-vs-round and BRI figures and the metrics tables of every evaluated method, with
    seeded bootstrap intervals over the test queries."""
    input:
        metrics=expand(out("eval/{method}/metrics.json"), method=eval_methods()),
        dialogues=expand(out("eval/{method}/dialogues.parquet"), method=eval_methods()),
    output:
        recall=report(
            out("report/recall_vs_round.png"),
            caption="../workflow/report/recall_vs_round.rst",
            category="Evaluation",
            subcategory="Metrics",
            labels={"figure": "R@k vs round"},
        ),
        bri=report(
            out("report/bri.png"),
            caption="../workflow/report/bri.rst",
            category="Evaluation",
            subcategory="Metrics",
            labels={"figure": "BRI"},
        ),
        tsv=report(
            out("report/metrics.tsv"),
            caption="../workflow/report/metrics_tsv.rst",
            category="Evaluation",
            subcategory="Metrics",
            labels={"figure": "table (TSV)"},
        ),
        html=report(
            out("report/metrics.html"),
            caption="../workflow/report/metrics_html.rst",
            category="Evaluation",
            subcategory="Metrics",
            labels={"figure": "table"},
        ),
    log:
        out("logs/report_plots.log"),
    benchmark:
        out("benchmarks/report_plots.tsv")
    conda:
        "../envs/train.yaml"
    params:
        cfg=stage_config("plots"),
        out_dir=lambda wildcards, output: os.path.dirname(output.tsv),
    shell:
        "llava-reid plots --config {params.cfg:q} --metrics {input.metrics:q}"
        " --dialogues {input.dialogues:q} --out-dir {params.out_dir:q} > {log} 2>&1"


rule ranked_lists:
    """Ranked-list pictures (JPEG) of a few test dialogues of one method, round by round."""
    input:
        dialogues=out("eval/{method}/dialogues.parquet"),
        gallery=out("features/test_gallery.parquet"),
    output:
        report(
            out("report/ranked_lists/{method}.jpg"),
            caption="../workflow/report/ranked_lists.rst",
            category="Evaluation",
            subcategory="Ranked lists",
            labels={"method": "{method}"},
        ),
    log:
        out("logs/report_ranked_lists_{method}.log"),
    benchmark:
        out("benchmarks/report_ranked_lists_{method}.tsv")
    wildcard_constraints:
        method="[A-Za-z0-9_.-]+",
    conda:
        "../envs/train.yaml"
    params:
        cfg=stage_config("ranked-lists"),
        image_root=image_root(),
    shell:
        "llava-reid ranked-lists --config {params.cfg:q} --dialogues {input.dialogues}"
        " --gallery {input.gallery} --image-root {params.image_root} --out {output}"
        " > {log} 2>&1"


rule training_curves:
    """Loss and validation curves of every training stage, from their metrics histories."""
    input:
        **training_metrics(),
    output:
        report(
            out("report/training_curves.png"),
            caption="../workflow/report/training_curves.rst",
            category="Training",
            labels={"figure": "training curves"},
        ),
    log:
        out("logs/report_training_curves.log"),
    benchmark:
        out("benchmarks/report_training_curves.tsv")
    conda:
        "../envs/train.yaml"
    params:
        cfg=stage_config("training-curves"),
        stages=lambda wildcards, input: " ".join(
            f"--{stage} {path}" for stage, path in input.items()
        ),
    shell:
        "llava-reid training-curves --config {params.cfg:q} {params.stages}"
        " --out {output} > {log} 2>&1"
