"""sparse_merge entry point: ``python run.py [group=option ...] [key=value ...]``."""

import atexit

import hydra
from omegaconf import DictConfig

from sparse_merge.app import register_resolvers, run
from sparse_merge.config import register_configs
from sparse_merge.evolution.distributed import leave_process_group

register_configs()
register_resolvers()
atexit.register(leave_process_group)  # once per process: a multirun's jobs share the group


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    return run(cfg)


if __name__ == "__main__":
    main()
