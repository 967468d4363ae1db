# Selector: warm-up to imitate plain top-k, then joint training with the questioner.


rule warmup_selector:
    """Warm the candidate selector up to imitate plain top-k."""
    input:
        conversations=out("prepare/conversations.parquet"),
        gallery=out("features/train_gallery.parquet"),
        retriever=out("retriever/model"),
    output:
        selector=out("selector/warmup.safetensors"),
        metrics=out("selector/warmup_metrics.json"),
    log:
        out("logs/warmup_selector.log"),
    benchmark:
        out("benchmarks/warmup_selector.tsv")
    conda:
        "../envs/train.yaml"
    resources:
        gpu=1,
    params:
        cfg=stage_config("warmup-selector"),
    shell:
        "llava-reid warmup-selector --config {params.cfg:q}"
        " --conversations {input.conversations} --gallery {input.gallery}"
        " --retriever {input.retriever} --out {output.selector}"
        " --metrics {output.metrics} > {log} 2>&1"


rule train_joint:
    """Train the selector and the questioner's adapter together (Gumbel top-k)."""
    input:
        model=questioner_model(),
        adapter=out("questioner/adapter"),
        selector=out("selector/warmup.safetensors"),
        conversations=out("prepare/conversations.parquet"),
        gallery=out("features/train_gallery.parquet"),
        retriever=out("retriever/model"),
        visual_tokens=out("questioner/visual_tokens/train.safetensors"),
        annotations=out("data/annotations.parquet"),
    output:
        adapter=directory(out("joint/adapter")),
        selector=out("joint/selector.safetensors"),
        metrics=out("joint/metrics.json"),
    log:
        out("logs/train_joint.log"),
    benchmark:
        out("benchmarks/train_joint.tsv")
    conda:
        "../envs/train.yaml"
    threads: 2
    resources:
        gpu=1,
    params:
        cfg=stage_config("train-joint"),
        image_root=image_root(),
        # Not an output: Snakemake would delete it on failure, and resuming needs it.
        checkpoints=out("joint/checkpoints"),
    shell:
        "llava-reid --nproc {resources.gpu} train-joint --config {params.cfg:q}"
        " --model {input.model} --adapter {input.adapter} --selector {input.selector}"
        " --conversations {input.conversations} --gallery {input.gallery}"
        " --retriever {input.retriever} --visual-tokens {input.visual_tokens}"
        " --annotations {input.annotations} --image-root {params.image_root}"
        " --out-adapter {output.adapter} --out-selector {output.selector}"
        " --metrics {output.metrics} --checkpoints {params.checkpoints} > {log} 2>&1"
