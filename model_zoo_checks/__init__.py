"""Model-zoo validation of srd_fx over timm's CNN architectures.

    python -m model_zoo_checks --all --jobs 2        # full sweep, writes REPORT.md + report.json
    python -m model_zoo_checks --ci-subset           # the fixed fast subset CI runs
    python -m model_zoo_checks.peers --all --jobs 2  # zennit / captum LRP on the same list

See docs/zoo.md."""
