# The witness demo: build what `llava-reid demo` loads, then print how to start the page.


rule demo:
    """Everything the witness page needs; then the command that starts it (no output file:
    the rule runs each time it is asked for)."""
    input:
        unpack(demo_inputs),
    log:
        out("logs/demo.log"),
    localrule: True
    conda:
        "../envs/train.yaml"
    params:
        method=demo_method(),
        cfg=json.dumps(config, sort_keys=True),
        run=RESULTS,
    shell:
        "llava-reid demo --config {params.cfg:q} --run {params.run:q}"
        " --method {params.method} --check 2>&1 | tee {log}"
