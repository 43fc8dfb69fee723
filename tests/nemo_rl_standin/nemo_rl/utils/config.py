"""``load_config`` of NeMo-RL: a YAML file as an OmegaConf node."""

from omegaconf import OmegaConf


def load_config(path):
    return OmegaConf.load(path)
