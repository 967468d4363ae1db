# Retriever: starting point, IRRA-style training, gallery/query features cached to Parquet.


rule init_retriever:
    """Build the retriever's starting point: a tiny CLIP + BPE, or a local CLIP."""
    input:
        out("data/annotations.parquet"),
    output:
        directory(out("models/retriever_init")),
    log:
        out("logs/init_retriever.log"),
    benchmark:
        out("benchmarks/init_retriever.tsv")
    conda:
        "../envs/train.yaml"
    params:
        cfg=stage_config("init-retriever"),
    shell:
        "llava-reid init-retriever --config {params.cfg:q} --annotations {input}"
        " --out {output} > {log} 2>&1"


rule train_retriever:
    """Train the IRRA-style retriever (SDM + ID + MLM); keep the best validation epoch."""
    input:
        annotations=out("data/annotations.parquet"),
        init=out("models/retriever_init"),
    output:
        model=directory(out("retriever/model")),
        metrics=out("retriever/metrics.json"),
    log:
        out("logs/train_retriever.log"),
    benchmark:
        out("benchmarks/train_retriever.tsv")
    conda:
        "../envs/train.yaml"
    threads: 2
    resources:
        gpu=1,
    params:
        cfg=stage_config("train-retriever"),
        image_root=image_root(),
        # Not an output: Snakemake would delete it on failure, and resuming needs it.
        checkpoints=out("retriever/checkpoints"),
    shell:
        "llava-reid --nproc {resources.gpu} train-retriever --config {params.cfg:q} --annotations {input.annotations}"
        " --image-root {params.image_root} --init {input.init} --out {output.model}"
        " --metrics {output.metrics} --checkpoints {params.checkpoints} > {log} 2>&1"


rule cache_features:
    """Encode one split's gallery images and text queries to Parquet."""
    input:
        annotations=out("data/annotations.parquet"),
        model=out("retriever/model"),
    output:
        gallery=out("features/{split}_gallery.parquet"),
        queries=out("features/{split}_queries.parquet"),
    log:
        out("logs/cache_features_{split}.log"),
    benchmark:
        out("benchmarks/cache_features_{split}.tsv")
    wildcard_constraints:
        split="train|val|test",
    conda:
        "../envs/train.yaml"
    resources:
        gpu=1,
    params:
        cfg=stage_config("cache-features"),
        image_root=image_root(),
    shell:
        "llava-reid cache-features --config {params.cfg:q} --annotations {input.annotations}"
        " --image-root {params.image_root} --model {input.model} --split {wildcards.split}"
        " --gallery-out {output.gallery} --queries-out {output.queries} > {log} 2>&1"


rule train_retriever_fold:
    """A cross-fitting retriever (prepare.cross_fit): the same recipe without one fold's
    training identities, so that the look-ahead labels of that fold come from unseen people.
    """
    input:
        annotations=out("data/annotations.parquet"),
        init=out("models/retriever_init"),
    output:
        model=directory(out("retriever/folds/{fold}/model")),
        metrics=out("retriever/folds/{fold}/metrics.json"),
    log:
        out("logs/train_retriever_fold_{fold}.log"),
    benchmark:
        out("benchmarks/train_retriever_fold_{fold}.tsv")
    wildcard_constraints:
        fold=r"\d+",
    conda:
        "../envs/train.yaml"
    threads: 2
    resources:
        gpu=1,
    params:
        cfg=stage_config("train-retriever"),
        image_root=image_root(),
        folds=config["prepare"]["cross_fit"],
        checkpoints=out("retriever/folds/{fold}/checkpoints"),
    shell:
        "llava-reid --nproc {resources.gpu} train-retriever --config {params.cfg:q} --annotations {input.annotations}"
        " --image-root {params.image_root} --init {input.init} --out {output.model}"
        " --metrics {output.metrics} --checkpoints {params.checkpoints}"
        " --fold {wildcards.fold}/{params.folds} > {log} 2>&1"


rule cache_fold_features:
    """Encode one fold's training images with the retriever that never saw them."""
    input:
        annotations=out("data/annotations.parquet"),
        model=out("retriever/folds/{fold}/model"),
    output:
        gallery=out("features/folds/{fold}/train_gallery.parquet"),
        queries=out("features/folds/{fold}/train_queries.parquet"),
    log:
        out("logs/cache_fold_features_{fold}.log"),
    benchmark:
        out("benchmarks/cache_fold_features_{fold}.tsv")
    wildcard_constraints:
        fold=r"\d+",
    conda:
        "../envs/train.yaml"
    resources:
        gpu=1,
    params:
        cfg=stage_config("cache-features"),
        image_root=image_root(),
        folds=config["prepare"]["cross_fit"],
    shell:
        "llava-reid cache-features --config {params.cfg:q} --annotations {input.annotations}"
        " --image-root {params.image_root} --model {input.model} --split train"
        " --fold {wildcards.fold}/{params.folds} --gallery-out {output.gallery}"
        " --queries-out {output.queries} > {log} 2>&1"
