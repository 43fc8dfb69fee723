"""Stand-in package (tests/nemo_rl_standin/README.md)."""
