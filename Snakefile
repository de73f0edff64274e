# Hinton et al. (2012), "Improving neural networks by preventing co-adaptation of feature
# detectors": the MNIST result. Data -> train -> aggregate -> figure -> report.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"


rule all:
    default_target: True
    input:
        get_final_output(),
