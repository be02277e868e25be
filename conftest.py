"""Root conftest: the project's own tests drive pytest sessions through ``pytester``."""

pytest_plugins = ["pytester"]
