"""Stand-in of NeMo-RL's examples/run_grpo.py: load the config, build MasterConfig, setup(), dispatch."""

import argparse

from omegaconf import OmegaConf

import nemo_rl
from nemo_rl.algorithms.grpo import MasterConfig, grpo_train, setup
from nemo_rl.utils.config import load_config, register_omegaconf_resolvers


def main():
    register_omegaconf_resolvers()
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    args, _ = parser.parse_known_args()
    config = OmegaConf.to_container(load_config(args.config), resolve=True)
    config = MasterConfig(**config) if nemo_rl.GENERATION == "main" else config
    (policy, policy_generation, _gym, cluster, dataloader, val_dataloader, loss_fn, logger, checkpointer,
     grpo_state, master_config, teachers, aliases) = setup(config, None, None, None)
    grpo_cfg = config.grpo.model_dump() if nemo_rl.GENERATION == "main" else config["grpo"]
    data_plane = (config.data_plane if nemo_rl.GENERATION == "main" else config.get("data_plane")) or {}
    if grpo_cfg.get("async_grpo", {}).get("enabled", False):
        from nemo_rl.algorithms.grpo import async_grpo_train

        async_grpo_train(policy=policy, policy_generation=policy_generation, dataloader=dataloader,
                         val_dataloader=val_dataloader, tokenizer=None, loss_fn=loss_fn, task_to_env={},
                         val_task_to_env={}, logger=logger, checkpointer=checkpointer, grpo_save_state=grpo_state,
                         master_config=master_config)
        return
    if data_plane.get("enabled", False):
        from nemo_rl.algorithms.grpo_sync import grpo_train_sync as trainer
    else:
        trainer = grpo_train
    trainer(policy, policy_generation, dataloader, val_dataloader, None, loss_fn, {}, {}, logger, checkpointer,
            grpo_state, master_config)


if __name__ == "__main__":
    main()
