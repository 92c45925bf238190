"""The paper's pipeline on real models, as one resumable experiment (experiments/chasing_the_tail.py).

    config     the experiment's JSON config, parsed and validated (ExperimentConfig)
    stages     pools -> rubrics -> rtd -> grpo -> export -> responses -> winrate -> healthbench -> report
    runner     runs the stages in order, skipping complete ones; cost ledger
    calls      --dry-run: endpoint calls and RL steps per stage from the config alone
    report     report.md (Table 1 analogue) and PNG curves
"""

from rubrax.pipeline.config import STAGES, ConfigError, ExperimentConfig, load_config, parse_config

__all__ = ["STAGES", "ConfigError", "ExperimentConfig", "load_config", "parse_config"]
