"""Project-specific pytest setup (none at the moment).

The Hypothesis profiles (``dev`` / ``ci`` / ``nightly``, chosen by
``HYPOTHESIS_PROFILE``) and the testing kit's fixtures come from the
``plateflow.testing.plugin`` pytest plugin, which the package registers
through its ``pytest11`` entry point.
"""
