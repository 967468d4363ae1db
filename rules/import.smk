# Published weights: with `<section>.checkpoint` set, an import stage writes the artifact the
# training stage would (same paths), and `ruleorder` makes Snakemake take it instead, so
# training and whatever only training needs are never scheduled. Downstream rules are unchanged.


if config["retriever"].get("checkpoint"):

    ruleorder: import_retriever > train_retriever

    rule import_retriever:
        """IRRA's checkpoint (or an earlier run's retriever) as this run's retriever, with
        its val/test retrieval metrics."""
        input:
            checkpoint=checkpoint_path("retriever"),
            annotations=out("data/annotations.parquet"),
        output:
            model=directory(out("retriever/model")),
            metrics=out("retriever/metrics.json"),
        log:
            out("logs/import_retriever.log"),
        benchmark:
            out("benchmarks/import_retriever.tsv")
        conda:
            "../envs/train.yaml"
        params:
            cfg=stage_config(
                "retriever.checkpoint",
                "retriever.pretrained",
                "retriever.temperature",
                "retriever.eval_batch_size",
            ),
            source=checkpoint_format("retriever"),
            image_root=image_root(),
        shell:
            "llava-reid import-retriever --config {params.cfg:q} --from {params.source}"
            " {input.checkpoint:q} --out {output.model} --metrics {output.metrics}"
            " --annotations {input.annotations} --image-root {params.image_root} > {log} 2>&1"


if config["questioner"].get("checkpoint"):

    ruleorder: import_questioner > train_questioner

    rule import_questioner:
        """The original's LoRA adapter (or an earlier run's) as this run's questioner adapter,
        checked against the base model's modules."""
        input:
            checkpoint=checkpoint_path("questioner"),
            model=questioner_model(),
        output:
            adapter=directory(out("questioner/adapter")),
            metrics=out("questioner/metrics.json"),
        log:
            out("logs/import_questioner.log"),
        benchmark:
            out("benchmarks/import_questioner.tsv")
        conda:
            "../envs/train.yaml"
        params:
            cfg=stage_config("questioner.checkpoint", "questioner.train_projector"),
            source=checkpoint_format("questioner"),
        shell:
            "llava-reid import-questioner --config {params.cfg:q} --from {params.source}"
            " {input.checkpoint:q} --model {input.model} --out {output.adapter}"
            " --metrics {output.metrics} > {log} 2>&1"


if config["selector"].get("checkpoint"):

    ruleorder: import_selector > train_joint

    rule import_selector:
        """The original's selector (or an earlier run's) in place of joint training; the joint
        adapter is the questioner adapter it was published with."""
        input:
            checkpoint=checkpoint_path("selector"),
            adapter=out("questioner/adapter"),
            retriever=out("retriever/model"),
        output:
            adapter=directory(out("joint/adapter")),
            selector=out("joint/selector.safetensors"),
            metrics=out("joint/metrics.json"),
        log:
            out("logs/import_selector.log"),
        benchmark:
            out("benchmarks/import_selector.tsv")
        conda:
            "../envs/train.yaml"
        params:
            cfg=stage_config(
                "selector.checkpoint", "selector.heads", "selector.dropout"
            ),
            source=checkpoint_format("selector"),
        shell:
            "llava-reid import-selector --config {params.cfg:q} --from {params.source}"
            " {input.checkpoint:q} --adapter {input.adapter} --retriever {input.retriever}"
            " --out {output.selector} --out-adapter {output.adapter}"
            " --metrics {output.metrics} > {log} 2>&1"
