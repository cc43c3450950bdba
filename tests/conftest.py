import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
# Under make test's pytest-xdist each worker process gets one core's worth of threads: two OpenMP
# pools of two threads on two cores spin against each other and slow both (a real-model test 33 -> 97 s).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))


@pytest.fixture(scope="session")
def tiny():
    from tiny_model import tiny_llama
    return tiny_llama()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The tiny model as a Hugging Face directory, for a module's worker processes (a module that
    needs more in it, a tokenizer say, defines its own)."""
    from tiny_model import save_tiny
    return save_tiny(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(autouse=True, scope="module")
def no_process_outlives_its_module():
    """Every process a test module starts (deploy.procs.Proc) is stopped by the module's end; one
    left running is killed and fails the module, naming it."""
    from deploy import procs
    before = {id(p) for p in procs.running()}
    yield
    left = [p for p in procs.running() if id(p) not in before]
    for p in left:
        p.kill()
    assert not left, f"processes left running: {[(' '.join(p.args[:1]), p.pid) for p in left]}"


def pytest_collection_modifyitems(config, items):
    """Slow tests first, the longest first (`slow(seconds)`), stable otherwise: `make test`'s two
    pytest-xdist workers take whole files in this order, so the long files start at once and the
    many short ones fill in around them."""
    def seconds(item) -> float:
        mark = item.get_closest_marker("slow")
        return -(mark.args[0] if mark.args else 10) if mark else 0
    items.sort(key=seconds)
