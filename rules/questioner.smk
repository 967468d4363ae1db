# Questioner: look-ahead training data, the model (tiny factory or a local checkpoint), cached
# visual tokens and LoRA SFT.


rule prepare_data:
    """Look-ahead oracle plan and the questioner's SFT conversations."""
    input:
        annotations=out("data/annotations.parquet"),
        gallery=out("features/train_gallery.parquet"),
        retriever=out("retriever/model"),
        label_retrievers=fold_labellers("retriever/folds/{fold}/model"),
        label_galleries=fold_labellers("features/folds/{fold}/train_gallery.parquet"),
    output:
        plan=out("prepare/oracle_plan.parquet"),
        conversations=out("prepare/conversations.parquet"),
    log:
        out("logs/prepare_data.log"),
    benchmark:
        out("benchmarks/prepare_data.tsv")
    conda:
        "../envs/train.yaml"
    resources:
        gpu=1,
    params:
        cfg=stage_config("prepare-data"),
    shell:
        "llava-reid --nproc {resources.gpu} prepare-data --config {params.cfg:q}"
        " --annotations {input.annotations} --gallery {input.gallery}"
        " --retriever {input.retriever} --oracle-plan {output.plan}"
        " --conversations {output.conversations}"
        " --label-retrievers {input.label_retrievers}"
        " --label-galleries {input.label_galleries} > {log} 2>&1"


rule build_tiny_questioner:
    """Build the tiny LLaVA-OneVision and its BPE tokenizer (embedded default)."""
    input:
        out("data/annotations.parquet"),
    output:
        directory(out("models/questioner_tiny")),
    log:
        out("logs/build_tiny_questioner.log"),
    benchmark:
        out("benchmarks/build_tiny_questioner.tsv")
    conda:
        "../envs/train.yaml"
    params:
        cfg=stage_config("build-tiny-questioner"),
    shell:
        "llava-reid build-tiny-questioner --config {params.cfg:q} --annotations {input}"
        " --out {output} > {log} 2>&1"


rule cache_visual_tokens:
    """Encode one split's images to the questioner's visual tokens, once."""
    input:
        annotations=out("data/annotations.parquet"),
        model=questioner_model(),
        adapter=projector_adapter,
    output:
        out("questioner/visual_tokens/{split}.safetensors"),
    log:
        out("logs/cache_visual_tokens_{split}.log"),
    benchmark:
        out("benchmarks/cache_visual_tokens_{split}.tsv")
    wildcard_constraints:
        split="train|val|test",
    conda:
        "../envs/train.yaml"
    resources:
        gpu=1,
    params:
        cfg=stage_config("cache-visual-tokens"),
        image_root=image_root(),
        adapter=lambda wildcards, input: (
            f"--adapter {input.adapter}" if input.adapter else ""
        ),
    shell:
        "llava-reid cache-visual-tokens --config {params.cfg:q}"
        " --annotations {input.annotations} --image-root {params.image_root}"
        " --model {input.model} {params.adapter} --split {wildcards.split} --out {output}"
        " > {log} 2>&1"


use rule cache_visual_tokens as cache_joint_visual_tokens with:
    # questioner.train_projector only: the jointly trained adapter's projector differs from
    # the SFT adapter's, so the selector method reads tokens of its own.
    input:
        annotations=out("data/annotations.parquet"),
        model=questioner_model(),
        adapter=out("joint/adapter"),
    output:
        out("joint/visual_tokens/{split}.safetensors"),
    log:
        out("logs/cache_joint_visual_tokens_{split}.log"),
    benchmark:
        out("benchmarks/cache_joint_visual_tokens_{split}.tsv")


rule train_questioner:
    """LoRA SFT of the questioner on the look-ahead conversations."""
    input:
        model=questioner_model(),
        conversations=out("prepare/conversations.parquet"),
        visual_tokens=out("questioner/visual_tokens/train.safetensors"),
        annotations=out("data/annotations.parquet"),
    output:
        adapter=directory(out("questioner/adapter")),
        metrics=out("questioner/metrics.json"),
    log:
        out("logs/train_questioner.log"),
    benchmark:
        out("benchmarks/train_questioner.tsv")
    conda:
        "../envs/train.yaml"
    threads: 2
    resources:
        gpu=1,
    params:
        cfg=stage_config("train-questioner"),
        image_root=image_root(),
        # Not an output: Snakemake would delete it on failure, and resuming needs it.
        checkpoints=out("questioner/checkpoints"),
    shell:
        "llava-reid --nproc {resources.gpu} train-questioner --config {params.cfg:q} --model {input.model}"
        " --conversations {input.conversations} --visual-tokens {input.visual_tokens}"
        " --annotations {input.annotations} --image-root {params.image_root}"
        " --out {output.adapter} --metrics {output.metrics}"
        " --checkpoints {params.checkpoints} > {log} 2>&1"
