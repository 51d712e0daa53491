import pytest
from stack import Stack


def pytest_collection_modifyitems(items):
    for item in items:
        if "/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture
def stack(ferry_process, kubectl, namespace):
    """The operator, agents and metadata endpoint of one test (tests/integration/stack.py)."""
    s = Stack(ferry_process, kubectl, namespace)
    yield s
    s.close()
