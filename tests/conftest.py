import os
import uuid

import pytest

try:
    from django.conf import settings
except ImportError:  # Client and agent tests run without Django.
    settings = None


@pytest.fixture(autouse=True, scope="session")
def isolated_redis_prefix():
    """Give this test session its own Redis key and channel prefix.

    Settings are read before conftest files load, so the prefix is changed on
    the settings object itself, before any channel layer is created.
    """
    if settings is None or not settings.configured:
        yield None
        return
    prefix = f"gridtest{os.getpid()}{uuid.uuid4().hex[:6]}"
    settings.CHANNEL_LAYERS["default"]["CONFIG"]["prefix"] = prefix
    yield prefix


@pytest.fixture(scope="session")
def django_db_modify_db_settings(django_db_modify_db_settings_parallel_suffix):
    """Name the test database after this run's process, so concurrent runs on one PostgreSQL never collide."""
    if settings is None:
        return
    test_settings = settings.DATABASES["default"].setdefault("TEST", {})
    test_settings["NAME"] = f"test_{settings.DATABASES['default']['NAME']}_{os.getpid()}"
