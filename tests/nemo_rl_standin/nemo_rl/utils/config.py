"""``load_config`` and ``register_omegaconf_resolvers`` of NeMo-RL: a YAML file as an OmegaConf node, and the
resolvers its base configs use (``${mul:...}``; ``examples/run_grpo.py`` registers them before resolving)."""

from omegaconf import OmegaConf


def load_config(path):
    return OmegaConf.load(path)


def register_omegaconf_resolvers():
    for name, fn in {"add": lambda a, b: a + b, "mul": lambda a, b: a * b, "div": lambda a, b: a / b,
                     "max": lambda a, b: max(a, b)}.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
