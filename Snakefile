# LLaVA-ReID as one DAG of file artifacts. Wiring only: every rule calls one `llava-reid` stage.
import os
import sys

from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config.yaml"


report: "workflow/report/workflow.rst"


# The package's checks from this checkout (also where Snakemake's own Python lacks the package):
# schema and cross-field problems, one line each, before any job. Snakemake's validate then
# fills the schema's defaults.
sys.path.insert(0, os.path.join(workflow.current_basedir, "src"))
from llava_reid.config import ConfigError, check_workflow_config

try:
    check_workflow_config(config, "config")
except ConfigError as err:
    sys.exit(str(err))
validate(config, "workflow/schemas/config.schema.yaml")

# envs/*.post-deploy.sh install the project from here (Snakemake copies envs/*.yaml away).
os.environ.update(LLAVA_REID_WORKFLOW_DIR=str(workflow.current_basedir))
# Stop now, in one line, if the evaluate jobs would not find what the answerer needs.
from llava_reid.answerer.runtime_check import require_answerer_runtime

require_answerer_runtime(
    config["answerer"], workflow.deployment_settings.deployment_method
)


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/retriever.smk"
include: "rules/questioner.smk"
include: "rules/selector.smk"
include: "rules/evaluate.smk"
include: "rules/report.smk"
include: "rules/demo.smk"
include: "rules/import.smk"
include: "rules/transfer.smk"


rule all:
    """Every artifact of the run: retriever, features, questioner, evaluations and report."""
    default_target: True
    input:
        all_targets(),
