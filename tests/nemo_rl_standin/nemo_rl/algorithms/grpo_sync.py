"""The data-plane trainer (``data_plane.enabled``): the driver never holds the batch (``train_from_meta``)."""


def grpo_train_sync(policy, policy_generation, dataloader, val_dataloader, tokenizer, loss_fn, task_to_env,
                    val_task_to_env, logger, checkpointer, grpo_save_state, master_config):
    policy.train_from_meta(loss_fn=loss_fn)
