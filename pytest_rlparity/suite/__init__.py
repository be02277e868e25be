"""The built-in parity suite: ``pytest --rlparity --pyargs pytest_rlparity.suite`` from any repository."""
