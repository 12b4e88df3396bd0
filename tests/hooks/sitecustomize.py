"""Imported at start-up by the Python processes tests start with this folder on PYTHONPATH (torchrun's workers
too): RNNGEN_TEST_NAN_AT_STEP="STEP[@RANK],..." installs nan_hook."""

import os

if os.environ.get("RNNGEN_TEST_NAN_AT_STEP"):
    import nan_hook

    nan_hook.install(os.environ["RNNGEN_TEST_NAN_AT_STEP"])
