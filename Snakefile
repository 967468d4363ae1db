# LLaVA-ReID as one DAG of file artifacts. Wiring only: every rule calls one `llava-reid` stage.
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config.yaml"


report: "workflow/report/workflow.rst"


validate(config, "workflow/schemas/config.schema.yaml")


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/retriever.smk"
include: "rules/questioner.smk"
include: "rules/selector.smk"
include: "rules/evaluate.smk"
include: "rules/report.smk"
include: "rules/import.smk"
include: "rules/transfer.smk"


rule all:
    default_target: True
    input:
        all_targets(),
