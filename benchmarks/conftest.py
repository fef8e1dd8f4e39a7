import os

import pytest
import torch


def pytest_configure(config):
    # Benchmarks compare implementations measured in the same run; pin the thread count so
    # figures from different machines or sessions are described by the same setting.
    threads = int(os.environ.get("FASTLORA_BENCH_THREADS", "2"))
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def device():
    return os.environ.get("FASTLORA_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
