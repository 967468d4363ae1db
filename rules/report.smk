# Report: per-round metric plots and tables of every evaluated method, and ranked-list pictures
# of a few dialogues per method, all flagged for `snakemake --report`.


rule plots:
    """Recall-vs-round and BRI plots and the metric tables of every method."""
    input:
        expand(out("eval/{method}/metrics.json"), method=eval_methods()),
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
        cfg=stage_config("report"),
        out_dir=lambda wildcards, output: os.path.dirname(output.tsv),
    shell:
        "llava-reid plots --config {params.cfg:q} --metrics {input:q}"
        " --out-dir {params.out_dir:q} > {log} 2>&1"


rule ranked_lists:
    """Pictures of a few dialogues: question, answer and the top-k per round."""
    input:
        dialogues=out("eval/{method}/dialogues.parquet"),
        gallery=out("features/test_gallery.parquet"),
    output:
        report(
            out("report/ranked_lists/{method}.png"),
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
        cfg=stage_config("report"),
        image_root=image_root(),
    shell:
        "llava-reid ranked-lists --config {params.cfg:q} --dialogues {input.dialogues}"
        " --gallery {input.gallery} --image-root {params.image_root} --out {output}"
        " > {log} 2>&1"
