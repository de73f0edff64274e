# Hinton et al. (2012), "Improving neural networks by preventing co-adaptation of feature
# detectors": the MNIST result. Data -> train (and the recipe study) -> aggregate -> figure ->
# report.
from snakemake.utils import min_version

min_version("9.0")


# The quick default; a config given with --configfile replaces it rather than merging into it,
# so config/paper.yaml or config/test.yaml define exactly their own variants.
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"


# Light jobs stay on the submitting machine under a cluster profile (compute nodes often have no
# internet for the download).
localrules:
    download_mnist,
    aggregate,
    figure,
    report,


include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/study.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        get_final_output(),
