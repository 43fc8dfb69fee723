"""The float64 oracle and stated tolerances of the entropy tests (they live in the package, so that
``nemo-entropy check-kernels`` holds an installed build to the same bar): nemo_entropy/entropy/oracle.py."""

from nemo_entropy.entropy.oracle import GRAD_TOL, VALUE_ATOL, VALUE_RTOL, assert_close, oracle

__all__ = ["GRAD_TOL", "VALUE_ATOL", "VALUE_RTOL", "assert_close", "oracle"]
