"""Loads the compiled op library. Importing it registers the C++ schemas and CPU kernels of
every torch.ops.fastlora op with the dispatcher."""
try:
    from fastlora import _C  # noqa: F401
except ImportError as e:  # pragma: no cover - only on a broken install
    raise ImportError(
        "fastlora's compiled op library (fastlora._C) could not be loaded. It must be built "
        "against the installed torch: reinstall with `pip install --no-build-isolation .` "
        f"after installing torch. Original error: {e}"
    ) from e
